"""The event store against a real nats-server: signed, chained, durable, and in the stream exactly once.

Crashes are simulated faithfully: a WAL holding events that were never published (the daemon died between the
fdatasync and the publish), events stored whose ack never reached the WAL (died before recording it), a stream
that vanishes and comes back, and a nats-server stopped and restarted on the same port and store mid-append.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from numerusd.errors import StoreError, StreamMismatch
from numerusd.event_caps import CUT_MARK
from numerusd.event_store import EventStore
from numerusd.keys import Keyring
from numerusd.protocol.envelope import Sealed, digest, open_event, seal
from numerusd.protocol.events import (
    AgentMessageReceived,
    ClaimViolated,
    JobSubmitted,
    KillRequested,
    TaskCreated,
    Truncated,
)
from numerusd.protocol.ids import new_ulid
from numerusd.stream_reader import read_stream
from numerusd.streams import DLQ, EVENTS, LOGS, check_server_version, ensure_streams, stream_specs
from numerusd.wal import WalEntry, WriteAheadLog
from tests.conftest import eventually, restartable

# --- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.load_or_create(tmp_path / "state" / "keys.json")


@pytest.fixture
async def js(nc):
    js = nc.jetstream()
    await ensure_streams(js)
    return js


async def open_store(nc, js, tmp_path: Path, keyring: Keyring, **options) -> tuple[EventStore, list[Sealed]]:
    """What the daemon does at startup: open the WAL, replay the stream into the store, recover."""
    wal = WriteAheadLog.open(tmp_path / "state" / "events.wal")
    store = EventStore(nc, js, wal, keyring, **options)
    recovered = await store.catch_up()
    return store, recovered


async def stored(nc) -> list[tuple[int, str, bytes]]:
    out = []
    async for batch in read_stream(nc, EVENTS):
        out.extend((m.seq, m.subject, m.data) for m in batch)
    return out


def verify(
    messages: list[tuple[int, str, bytes]], keys: dict[str, bytes], heads: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """Check what an auditor checks: signatures, subjects, unique ids, unbroken chains. Return ids per job."""
    heads = dict(heads or {})
    ids: dict[str, list[str]] = {}
    seen: set[str] = set()
    for _seq, subject, wire in messages:
        envelope = open_event(wire, keys)
        assert envelope.subject == subject
        assert envelope.id not in seen, f"event {envelope.id} stored twice"
        seen.add(envelope.id)
        assert envelope.prev == heads.get(envelope.job, ""), f"chain of job {envelope.job} broken at {envelope.id}"
        heads[envelope.job] = digest(wire)
        ids.setdefault(envelope.job, []).append(envelope.id)
    return ids


def seal_by_hand(keyring: Keyring, job: str, prev: str, texts: list[str]) -> list[Sealed]:
    """Events sealed on a job's chain exactly as `append` would, for building crash states."""
    out = []
    for text in texts:
        one = seal(
            AgentMessageReceived(text=text),
            id=new_ulid(),
            job=job,
            task="t1",
            time=datetime.now(UTC),
            actor="numerusd",
            correlation_id="c",
            causation_id=None,
            prev=prev,
            kid=keyring.current_kid,
            key=keyring.current_key,
        )
        prev = one.digest
        out.append(one)
    return out


def wal_entries(events: list[Sealed]) -> list[WalEntry]:
    return [WalEntry(s.envelope.id, s.envelope.subject, s.wire) for s in events]


# --- streams -------------------------------------------------------------------------------------------------


async def test_streams_are_created_idempotently_with_their_invariants(nc, js):
    await ensure_streams(js)  # a second time changes nothing
    events = (await js.stream_info(EVENTS)).config
    assert events.subjects == ["numerus.job.>"]
    assert events.deny_delete and events.deny_purge and not events.allow_rollup_hdrs
    assert events.storage == "file" and events.duplicate_window == 600
    assert (await js.stream_info(LOGS)).config.max_bytes == 1 << 30
    assert (await js.stream_info(DLQ)).config.subjects == ["numerus.dlq.>"]
    check_server_version(nc)


async def test_harmless_differences_are_updated(nc):
    js = nc.jetstream()
    await ensure_streams(js, stream_specs(duplicate_window=60))
    await ensure_streams(js)
    assert (await js.stream_info(EVENTS)).config.duplicate_window == 600


async def test_a_dead_letter_stream_bounded_by_age_only_is_bounded_in_bytes_and_message_size_at_start(nc):
    js = nc.jetstream()
    dlq = stream_specs()[2]
    # As an older numerusd made it: bounded by age only.
    unbounded = {key: value for key, value in dlq.desired.items() if key not in ("max_bytes", "max_msg_size")}
    await js.add_stream(StreamConfig(name=DLQ, subjects=list(dlq.subjects), **unbounded))
    await js.publish("numerus.dlq.cmd.bad_request", b"x" * 300_000)
    await ensure_streams(js, stream_specs(dlq_max_bytes=2 << 20))
    config = (await js.stream_info(DLQ)).config
    assert (config.max_bytes, config.max_msg_size) == (2 << 20, 128 << 10)
    with pytest.raises(nats.js.errors.BadRequestError):  # the server itself now refuses a dead letter that big
        await js.publish("numerus.dlq.cmd.bad_request", b"x" * 300_000)


async def test_a_stream_that_breaks_an_invariant_is_refused(nc):
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=EVENTS, subjects=["numerus.job.>"], deny_delete=True))
    with pytest.raises(StreamMismatch, match="deny_purge is False") as caught:
        await ensure_streams(js)
    assert caught.value.fields["stream"] == EVENTS
    await js.add_stream(StreamConfig(name=LOGS, subjects=["numerus.log.x"]))
    with pytest.raises(StreamMismatch, match="subjects are"):
        await ensure_streams(js, stream_specs()[1:])


# --- appending -----------------------------------------------------------------------------------------------


async def test_appended_events_are_stored_signed_and_chained(nc, js, tmp_path, keyring):
    store, _ = await open_store(nc, js, tmp_path, keyring)
    jobs = [new_ulid() for _ in range(3)]
    for job in jobs:
        await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="codex"))], correlation_id="c")

    async def worker(job: str, n: int) -> list[Sealed]:
        out = []
        for i in range(n):
            batch = [("t1", AgentMessageReceived(text=f"{i}.{k}")) for k in range(1 + i % 3)]
            out.extend(await store.append(job, batch, correlation_id="c", causation_id="x"))
        return out

    results = await asyncio.gather(*(worker(job, 30) for job in jobs for _ in range(2)))
    await store.flush(timeout=10)
    messages = await stored(nc)
    ids = verify(messages, keyring.keys)
    assert len(messages) == 3 + sum(len(r) for r in results)
    by_id = {wire: subject for _, subject, wire in messages}
    for sealed in (s for r in results for s in r):
        assert by_id[sealed.wire] == sealed.envelope.subject  # the returned bytes are the stored bytes
        assert sealed.digest == digest(sealed.wire)
    for job in jobs:
        assert store.chain_head(job) == digest(next(w for _, _, w in reversed(messages) if job.encode() in w))
        assert len(ids[job]) == 1 + 2 * sum(1 + i % 3 for i in range(30))
    assert len(store._wal) == 0 and store.unacknowledged == 0
    await store.close()


async def test_decisions_submitted_together_share_a_sync_and_land_in_order(nc, js, tmp_path, keyring):
    # What the daemon's `record` relies on: a job's decisions are sealed and queued one after another without
    # waiting for each other's fdatasync, and each one's `on_durable` runs in order, before its future resolves.
    store, _ = await open_store(nc, js, tmp_path, keyring)
    job = new_ulid()
    await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="codex"))], correlation_id="c")
    syncs = store._wal.syncs
    landed: list[int] = []
    futures = []
    for n in range(20):
        _, durable = store.submit(
            job, [("t1", AgentMessageReceived(text=str(n)))], correlation_id="c", on_durable=partial(landed.append, n)
        )
        futures.append(durable)
    await futures[0]
    assert landed[0] == 0
    await asyncio.gather(*futures)
    assert landed == list(range(20))
    assert store._wal.syncs - syncs <= 2, f"{store._wal.syncs - syncs} fdatasyncs for 20 queued decisions"
    await store.flush(timeout=10)
    messages = await stored(nc)
    assert len(verify(messages, keyring.keys)[job]) == 21  # one unbroken chain, in submission order
    texts = [open_event(wire, keyring.keys).data.text for _, _, wire in messages[1:]]
    assert texts == [str(n) for n in range(20)]
    await store.close()


async def test_append_needs_recovery_and_refuses_oversized_events(nc, js, tmp_path, keyring):
    wal = WriteAheadLog.open(tmp_path / "events.wal")
    store = EventStore(nc, js, wal, keyring)
    with pytest.raises(StoreError, match="recover"):
        await store.append("j", [(None, KillRequested())], correlation_id="c")
    await store.recover()
    # Nothing to cut: thousands of short strings cannot be made to fit, and the server would refuse the event.
    uncuttable = ClaimViolated(violations=("ab",) * nc.max_payload)
    with pytest.raises(StoreError, match="max_payload"):
        await store.append("j", [("t1", uncuttable)], correlation_id="c")
    with pytest.raises(ValueError, match="needs task id"):
        await store.append("j", [(None, uncuttable)], correlation_id="c")
    assert len(wal) == 0 and store.chain_head("j") == ""
    await store.close()


async def test_an_oversized_text_is_stored_cut_with_its_size_and_hash(nc, js, tmp_path, keyring):
    store, _ = await open_store(nc, js, tmp_path, keyring)
    text = "é" * (nc.max_payload + 1)
    [sealed] = await store.append("j", [("t1", AgentMessageReceived(text=text))], correlation_id="c")
    await store.flush()
    assert len(sealed.wire) <= store.payload_cap() + 2048
    stored = open_event(sealed.wire, keyring.keys).data
    assert stored.text.endswith(CUT_MARK) and text.startswith(stored.text.removesuffix(CUT_MARK))
    whole = text.encode()
    assert stored.truncated == (Truncated(field="text", size=len(whole), sha256=hashlib.sha256(whole).hexdigest()),)
    # An event that fits is sealed as it always was: no `truncated` member.
    [small] = await store.append("j", [("t1", AgentMessageReceived(text="hi"))], correlation_id="c")
    assert b"truncated" not in small.wire
    await store.close()


# --- crashes -------------------------------------------------------------------------------------------------


async def test_events_in_the_wal_but_never_published_are_republished_once(nc, js, tmp_path, keyring):
    store, _ = await open_store(nc, js, tmp_path, keyring)
    job = new_ulid()
    await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="a"))], correlation_id="c")
    await store.append(job, [("t1", TaskCreated(title="t", instructions="i", agent="a"))], correlation_id="c")
    await store.flush(5)
    # The crash: three more events sealed on the chain and made durable, the daemon dies before publishing.
    lost = seal_by_hand(keyring, job, store.chain_head(job), ["a", "b", "c"])
    await store._wal.append(wal_entries(lost))
    await store.close()

    restarted, recovered = await open_store(nc, js, tmp_path, keyring)
    assert [s.envelope.id for s in recovered] == [s.envelope.id for s in lost]
    assert [s.wire for s in recovered] == [s.wire for s in lost]
    assert restarted.chain_head(job) == lost[-1].digest
    more = await restarted.append(job, [("t1", AgentMessageReceived(text="after"))], correlation_id="c")
    assert more[0].envelope.prev == lost[-1].digest
    await restarted.flush(5)
    await restarted.close()

    ids = verify(await stored(nc), keyring.keys)
    assert ids[job][2:] == [s.envelope.id for s in lost] + [more[0].envelope.id]
    again, recovered = await open_store(nc, js, tmp_path, keyring)
    assert recovered == [] and again.stats["republished"] == 0
    await again.close()


async def test_events_stored_without_a_recorded_ack_are_not_stored_again(nc, js, tmp_path, keyring):
    """Proved through the stream, not JetStream's duplicate window: the copies go out without Nats-Msg-Id."""
    store, _ = await open_store(nc, js, tmp_path, keyring)
    job = new_ulid()
    await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="a"))], correlation_id="c")
    await store.flush(5)
    published = seal_by_hand(keyring, job, store.chain_head(job), ["p1", "p2"])
    unpublished = seal_by_hand(keyring, job, published[-1].digest, ["u1"])
    await store._wal.append(wal_entries(published + unpublished))
    for event in published:
        # Stored, but the ack was never recorded: the daemon died right after this publish.
        await js.publish(event.envelope.subject, event.wire)
    await store.close()

    restarted, recovered = await open_store(nc, js, tmp_path, keyring)
    await restarted.flush(5)
    assert [s.envelope.id for s in recovered] == [unpublished[0].envelope.id]
    assert len(restarted._wal) == 0
    await restarted.close()
    ids = verify(await stored(nc), keyring.keys)
    assert ids[job][1:] == [s.envelope.id for s in published + unpublished]


async def test_acks_of_duplicates_count_as_acknowledged(nc, js, tmp_path, keyring):
    store, _ = await open_store(nc, js, tmp_path, keyring)
    job = new_ulid()
    await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="a"))], correlation_id="c")
    await store.flush(5)
    sent = seal_by_hand(keyring, job, store.chain_head(job), ["d1", "d2"])
    await store._wal.append(wal_entries(sent))
    for event in sent:
        await js.publish(event.envelope.subject, event.wire, headers={"Nats-Msg-Id": event.envelope.id})
    await store.close()

    # Restarted without the replay (no observe): only JetStream's duplicate window keeps the copies out.
    wal = WriteAheadLog.open(tmp_path / "state" / "events.wal")
    restarted = EventStore(nc, js, wal, keyring)
    assert len(await restarted.recover()) == 2
    await restarted.flush(5)
    assert restarted.stats["duplicates"] == 2 and len(wal) == 0
    await restarted.close()
    assert len(verify(await stored(nc), keyring.keys)[job]) == 3


async def test_events_left_without_an_ack_are_looked_up_in_the_stream(nc, tmp_path, keyring):
    js = nc.jetstream()  # a stream that never acknowledges: every event looks lost until checked
    await js.add_stream(
        StreamConfig(name=EVENTS, subjects=["numerus.job.>"], deny_delete=True, deny_purge=True, no_ack=True)
    )
    store, _ = await open_store(nc, js, tmp_path, keyring, resend_after=0.3)
    job = new_ulid()
    events = [("t1", AgentMessageReceived(text=str(i))) for i in range(5)]
    appended = await store.append(
        job, [(None, JobSubmitted(goal="g", repo="/r", agent="a")), *events], correlation_id="c"
    )
    await store.flush(5)
    assert store.stats["resyncs"] >= 1 and store.stats["republished"] == 0
    ids = verify(await stored(nc), keyring.keys)
    assert ids[job] == [s.envelope.id for s in appended]
    await store.close()


async def test_a_stream_that_vanishes_and_returns_gets_every_event_in_order(nc, js, tmp_path, keyring):
    store, _ = await open_store(nc, js, tmp_path, keyring, resend_after=0.5)
    job = new_ulid()
    first = await store.append(job, [(None, JobSubmitted(goal="g", repo="/r", agent="a"))], correlation_id="c")
    await store.flush(5)
    await js.delete_stream(EVENTS)
    appended = list(first)
    for i in range(20):
        appended += await store.append(job, [("t1", AgentMessageReceived(text=str(i)))], correlation_id="c")
    await eventually(lambda: store.stats["errors"] > 0)
    with pytest.raises(StoreError, match="not yet acknowledged"):
        await store.flush(0.1)
    await ensure_streams(js)
    await store.flush(10)
    assert store.stats["resyncs"] >= 1
    # The first event went with the deleted stream; the chain goes on from it.
    ids = verify(await stored(nc), keyring.keys, heads={job: first[0].digest})
    assert ids[job] == [s.envelope.id for s in appended[1:]]
    await store.close()


# --- a nats-server restart mid-append ------------------------------------------------------------------------


async def test_server_restart_while_appending_loses_and_duplicates_nothing(nats_server, tmp_path, keyring):
    holder: list[EventStore] = []

    async def reconnected() -> None:
        if holder:
            await holder[0].on_reconnected()

    nc = await nats.connect(
        nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
        reconnected_cb=reconnected,
    )
    js = nc.jetstream()
    await ensure_streams(js)
    store, _ = await open_store(nc, js, tmp_path, keyring, resend_after=1.0)
    holder.append(store)
    jobs = [new_ulid() for _ in range(4)]
    appended: dict[str, list[str]] = {job: [] for job in jobs}
    count = 0
    stop = asyncio.Event()

    async def appender(job: str) -> None:
        nonlocal count
        i = 0
        while not stop.is_set():
            events = [(None, KillRequested(reason=f"r{i}"))] + [("t1", AgentMessageReceived(text=str(i)))] * (i % 3)
            for sealed in await store.append(job, events, correlation_id="c"):
                appended[job].append(sealed.envelope.id)
            count += len(events)
            i += 1
            await asyncio.sleep(0.001)  # a steady flow rather than a flood, so each phase sees many appends

    with restartable(nats_server) as (stop_server, start_server):
        tasks = [asyncio.create_task(appender(job)) for job in jobs for _ in range(2)]
        await eventually(lambda: count > 300)
        await stop_server()
        await eventually(lambda: not nc.is_connected)
        during = count
        await eventually(lambda: count > during + 300)  # appends go on while NATS is down: the WAL has them
        assert store.unacknowledged > 0
        await start_server()
        await eventually(lambda: nc.is_connected, timeout=10)
        after = count
        await eventually(lambda: count > after + 300)
        stop.set()
        await asyncio.gather(*tasks)
        await store.flush(timeout=15)
        messages = await stored(nc)
        await store.close()
        await nc.close()

    ids = verify(messages, keyring.keys)
    assert ids == appended  # every event exactly once, each job's in the order it was appended
    assert store.stats["resyncs"] >= 1  # the reconnect was noticed and checked against the stream
    assert len(messages) == sum(len(v) for v in appended.values())
