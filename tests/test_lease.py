"""One writer per stream: the lease in NUMERUS_LEASE, the epoch on every event, and every reader's refusal of an event
written by a daemon that had lost its lease.

In-process tests take the lease against a real nats-server; the others run real daemons on one server: a second
one refused in one line, a standby taking over a killed holder (its job going on there) and a stopped one, a frozen
holder fenced when it wakes, and a client trying to write the lease bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.api import KeyValueConfig

from numerusd.errors import LeaseHeld, StoreError
from numerusd.event_store import EventStore
from numerusd.keys import Keyring
from numerusd.lease import BUCKET, Holder, Lease
from numerusd.protocol.audit import verify
from numerusd.protocol.connection import inbox_prefix
from numerusd.protocol.envelope import Sealed, decode_wire, open_event, seal
from numerusd.protocol.events import EventData, JobFailed, JobSubmitted, KillRequested
from numerusd.protocol.exit_codes import DaemonExit
from numerusd.protocol.subjects import DLQ, EVENTS
from numerusd.stream_reader import read_stream
from numerusd.streams import ensure_streams
from numerusd.views.dump import dump
from numerusd.views.projector import Projector
from numerusd.wal import WriteAheadLog
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git_repo, login, refused

KEYS = {"k1": b"k" * 32}
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


class Writer:
    """Seals events as a daemon holding the lease at `epoch` would: each job's events chained."""

    def __init__(self) -> None:
        self.heads: dict[str, str] = {}
        self.count = 0

    def __call__(self, job: str, data: EventData, epoch: int) -> Sealed:
        self.count += 1
        sealed = seal(
            data,
            id=f"E{self.count:04d}",
            job=job,
            task=None,
            time=T0,
            actor="numerusd",
            epoch=epoch,
            correlation_id=job,
            causation_id=None,
            prev=self.heads.get(job, ""),
            kid="k1",
            key=KEYS["k1"],
        )
        self.heads[job] = sealed.digest
        return sealed


def submitted(goal: str) -> JobSubmitted:
    return JobSubmitted(goal=goal, repo="/repo", agent="codex")


# --- the envelope and the readers ---------------------------------------------------------------------------------


def test_the_epoch_comes_after_the_actor_and_is_left_out_when_0():
    write = Writer()
    old = write("J1", submitted("g"), epoch=0)
    assert b'"epoch"' not in old.wire and b'"actor":"numerusd","correlation_id"' in old.wire
    new = write("J2", submitted("g"), epoch=7)
    assert b'"actor":"numerusd","epoch":7,"correlation_id"' in new.wire
    assert open_event(new.wire, KEYS).epoch == 7
    assert open_event(old.wire, KEYS).epoch == 0
    # Written before epochs existed: the same bytes, so they verify as they always did.
    fixture = Path(__file__).parent / "data" / "events_v1.jsonl"
    assert all(decode_wire(line).epoch == 0 for line in fixture.read_bytes().splitlines() if line.strip())


def stale_history() -> tuple[list[tuple[int, str, bytes]], list[int]]:
    """Two holders' events, then two of the first holder's written after the second took over: the stale ones'
    stream sequences."""
    write = Writer()
    events = [
        write("J1", submitted("one"), epoch=1),
        write("J1", KillRequested(by="alice"), epoch=1),
        write("J2", submitted("two"), epoch=2),  # the standby took over
        write("J3", submitted("a new job of the old holder"), epoch=1),
        write("J1", JobFailed(reason="the old holder went on"), epoch=1),
        write("J2", KillRequested(by="bob"), epoch=2),
    ]
    return [(seq, s.envelope.subject, s.wire) for seq, s in enumerate(events, 1)], [4, 5]


def test_the_audit_names_each_event_of_a_lower_epoch():
    records, stale = stale_history()
    report = verify(records, KEYS)
    assert [(p.kind, p.seq) for p in report.problems] == [("stale_epoch", seq) for seq in stale]
    assert "written under epoch 1, after epoch 2 had begun" in report.problems[0].line()


async def test_the_views_refuse_events_of_a_lower_epoch_and_remember_the_epoch_across_restarts(tmp_path: Path):
    records, stale = stale_history()
    path = tmp_path / "views.db"
    async with Projector(path, KEYS) as projector:
        rejected = await projector.apply(records[:4])
        assert [(r.seq, r.reason) for r in rejected] == [(4, "stale_epoch")]
    async with Projector(path, KEYS) as projector:  # the highest epoch was stored with the position
        rejected = await projector.apply(records[4:])
        assert [(r.seq, r.reason) for r in rejected] == [(5, "stale_epoch")]
    # What the views hold is what they hold without the stale events: J3 never existed, J1 did not fail.
    async with Projector(tmp_path / "without.db", KEYS) as projector:
        assert await projector.apply([record for record in records if record[0] not in stale]) == []
    views, without = await dump(path), await dump(tmp_path / "without.db")
    assert {table: views[table] for table in ("jobs", "tasks")} == {
        table: without[table] for table in ("jobs", "tasks")
    }
    assert [row[0] for row in views["jobs"]] == ["J1", "J2"]


# --- the lease itself ------------------------------------------------------------------------------------------------


@pytest.fixture
async def js(nc):
    js = nc.jetstream()
    await ensure_streams(js)
    return js


async def test_of_two_daemons_starting_at_once_one_takes_the_lease_and_the_other_isrefused(js, tmp_path: Path):
    stop = asyncio.Event()
    starts = [asyncio.create_task(Lease.take(js, state_dir=tmp_path / name, ttl_s=2, stop=stop)) for name in ("a", "b")]
    done, _ = await asyncio.wait(starts, return_when=asyncio.FIRST_COMPLETED)
    first = done.pop()
    winner = first.result()
    assert winner is not None and winner.epoch == 1
    kept = asyncio.create_task(winner.keep(lambda why: None, stop))
    loser = next(task for task in starts if task is not first)
    with pytest.raises(LeaseHeld) as refused:
        await asyncio.wait_for(loser, 5)
    assert f"numerusd pid {os.getpid()} on {socket.gethostname()}" in refused.value.message
    assert "--standby" in refused.value.message and "\n" not in refused.value.message

    # A standby waits while the holder renews (longer than the lease time), and takes over as soon as it lets go.
    waiting = asyncio.Event()
    standby = asyncio.create_task(Lease.take(js, state_dir=tmp_path / "c", ttl_s=2, standby=True, stop=waiting))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(standby), 3)
    stop.set()
    await kept
    released = time.monotonic()
    await winner.release()
    successor = await asyncio.wait_for(standby, 5)
    assert successor is not None and successor.epoch == 2
    assert time.monotonic() - released < 1.5
    assert not winner.may_append() and not winner.may_publish()
    await successor.release()


async def test_a_holder_that_stops_renewing_is_taken_over_after_the_lease_time_and_knows_it_lost(
    nc, js, tmp_path: Path
):
    stop = asyncio.Event()
    frozen = await Lease.take(js, state_dir=tmp_path / "a", ttl_s=2, stop=stop)
    assert frozen is not None
    began = time.monotonic()
    successor = await asyncio.wait_for(
        Lease.take(js, state_dir=tmp_path / "b", ttl_s=2, standby=True, stop=stop), timeout=10
    )
    assert successor is not None and successor.epoch == frozen.epoch + 1
    assert 2 <= time.monotonic() - began < 4
    assert not frozen.may_publish()  # not renewed for the lease time: publishes nothing, even before it knows
    assert frozen.may_append()
    await frozen.renew()  # it wakes: the renewal's compare-and-set fails
    assert frozen.lost is not None and "is now held by numerusd pid" in frozen.lost
    assert not frozen.may_append()
    keyring = Keyring.load_or_create(tmp_path / "keys.json")
    store = EventStore(nc, js, WriteAheadLog.open(tmp_path / "a.wal"), keyring, lease=frozen)
    await store.catch_up()
    with pytest.raises(StoreError, match="no longer holds the lease"):
        await store.append("J1", [(None, submitted("late"))], correlation_id="c")
    await store.close()
    await successor.release()


async def test_a_value_nobody_can_read_is_waited_out_not_taken_at_once(js, tmp_path: Path):
    kv = await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1))
    await kv.put(EVENTS, b"not a holder")
    began = time.monotonic()
    lease = await Lease.take(js, state_dir=tmp_path / "a", ttl_s=2, stop=asyncio.Event())
    assert lease is not None and time.monotonic() - began >= 2
    holder = msgspec.json.decode((await kv.get(EVENTS)).value, type=Holder)
    assert (holder.pid, holder.epoch, holder.state) == (os.getpid(), 1, "held")


# --- the event store under a lease -----------------------------------------------------------------------------------


class FixedLease:
    """A lease as the store sees it, its answers set by the test."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.appending = True
        self.publishing = True

    def may_append(self) -> bool:
        return self.appending

    def may_publish(self) -> bool:
        return self.publishing


async def test_the_store_stamps_its_epoch_publishes_only_under_a_proven_lease_and_drops_stale_wal_entries(
    nc, js, tmp_path: Path
):
    keyring = Keyring.load_or_create(tmp_path / "keys.json")
    keys = keyring.keys
    lease = FixedLease(epoch=5)
    store = EventStore(nc, js, WriteAheadLog.open(tmp_path / "old.wal"), keyring, lease=lease)
    await store.catch_up()
    await store.append("J1", [(None, submitted("first"))], correlation_id="c")
    await store.flush(5)
    lease.publishing = False  # its renewals fail: a standby may be taking over
    await store.append("J1", [(None, KillRequested(by="alice"))], correlation_id="c")
    with pytest.raises(StoreError):
        await store.flush(1)
    stored = [open_event(m.data, keys) async for batch in read_stream(nc, EVENTS) for m in batch]
    assert [(e.type, e.epoch) for e in stored] == [("JobSubmitted", 5)]
    await store.close()  # the KillRequested stays in the WAL, unpublished

    # Another holder, epoch 6, wrote meanwhile; the old one starts again later: its WAL entry is stale.
    newer = EventStore(nc, js, WriteAheadLog.open(tmp_path / "new.wal"), keyring, lease=FixedLease(epoch=6))
    await newer.catch_up()
    await newer.append("J2", [(None, submitted("second"))], correlation_id="c")
    await newer.flush(5)
    await newer.close()
    again = EventStore(nc, js, WriteAheadLog.open(tmp_path / "old.wal"), keyring, lease=FixedLease(epoch=7))
    async for batch in read_stream(nc, EVENTS):
        for m in batch:
            again.fence.admit(decode_wire(m.data))
            again.observe(m.seq, m.data)
    assert await again.recover() == []  # not republished, not folded
    await again.flush(5)
    stored = [open_event(m.data, keys) async for batch in read_stream(nc, EVENTS) for m in batch]
    assert [(e.type, e.epoch) for e in stored] == [("JobSubmitted", 5), ("JobSubmitted", 6)]
    await again.close()
    assert WriteAheadLog.open(tmp_path / "old.wal").pending() == []


# --- real daemons -----------------------------------------------------------------------------------------------------

AGENT = [{"say": "working"}, {"sleep": 4}, {"write": "HELLO.md", "content": "# Hello\n"}, {"say": "done"}]
LONG = [{"say": "working"}, {"sleep": 60}]


def launch(daemon: Daemon, *args: str) -> Daemon:
    """Start numerusd as `Daemon.start` does, with more arguments, without waiting for it to serve."""
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    (daemon.state_dir / "connection.json").unlink(missing_ok=True)
    if daemon.agents or daemon.config:
        daemon._configure_agents()
    daemon.log = open(daemon.state_dir / "numerusd.stderr", "ab")  # noqa: SIM115 - closed by stop()
    daemon.process = subprocess.Popen(
        [str(BIN / "numerusd"), "--state-dir", str(daemon.state_dir), "--log-level", "debug", *args],
        env={**os.environ, **daemon.env},
        stdout=daemon.log,
        stderr=daemon.log,
    )
    return daemon


def serving(daemon: Daemon) -> bool:
    """Whether the daemon answers commands (a standby writes its connection file once it has taken over)."""
    assert daemon.alive, daemon.stderr()
    return (daemon.state_dir / "connection.json").exists() and daemon.ctl("status", timeout=10).returncode == 0


def shared(nats_server, tmp_path: Path) -> dict[str, str]:
    """What two hosts' daemons share: the bus, and the signing keys (one key file, copied to each host)."""
    return {
        "NUMERUS_NATS_URL": nats_server.url,
        "NUMERUS_NATS_USER": nats_server.user,
        "NUMERUS_NATS_PASSWORD": nats_server.password,
        "NUMERUS_KEY_FILE": str(tmp_path / "keys.json"),
    }


async def stream_epochs(nats_server) -> list[int]:
    """The epoch of each event in the stream, in stream order."""
    nc = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    try:
        return [decode_wire(m.data).epoch async for batch in read_stream(nc, EVENTS) for m in batch]
    finally:
        await nc.close()


async def taken_over(nats_server) -> bool:
    """Whether the second holder (epoch 2) has written to the stream."""
    return 2 in await stream_epochs(nats_server)


@pytest.mark.slow
def test_a_second_daemon_on_the_same_streams_is_refused_in_one_line_and_clients_cannot_touch_the_lease(
    tmp_path: Path,
):
    with Daemon(tmp_path / "first").start() as first:
        bus = first.connection()  # the daemon's own login: what a second daemon on this server would be given
        env = {
            "NUMERUS_NATS_URL": bus["url"],
            "NUMERUS_NATS_USER": bus["user"],
            "NUMERUS_NATS_PASSWORD": bus["password"],
            "NUMERUS_KEY_FILE": str(first.state_dir / "keys.json"),
        }
        began = time.monotonic()
        second = subprocess.run(
            [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "second")],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == DaemonExit.LOCKED
        assert time.monotonic() - began < 8  # one renewal seen is enough
        (line,) = [line for line in second.stderr.splitlines() if line.startswith("numerusd: ")]
        pid = first.process.pid if first.process else 0
        assert line == (
            f"numerusd: NUMERUS_EVENTS is written by numerusd pid {pid} on {socket.gethostname()} (state "
            f"{first.state_dir}, epoch 1, since {_holder(first).since}); stop that one first, or start this one "
            "with --standby to take over when it stops"
        )
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "second" / "connection.json").exists()
        assert first.ctl("status").returncode == 0  # the first still answers
        asyncio.run(_clients_cannot_write_the_lease(first))
        assert _holder(first).pid == pid and first.ctl("status").returncode == 0
        assert first.stop() == 0


def _holder(daemon: Daemon) -> Holder:
    return asyncio.run(_read_holder(daemon.connection()))


async def _read_holder(bus: dict) -> Holder:
    nc = await nats.connect(bus["url"], user=bus["user"], password=bus["password"])
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        return msgspec.json.decode((await kv.get(EVENTS)).value, type=Holder)
    finally:
        await nc.close()


async def _clients_cannot_write_the_lease(daemon: Daemon) -> None:
    """The operator's login (and the viewer's) cannot take, release, remove or purge the lease, nor its bucket."""
    for role in ("operator", "viewer"):
        await _role_cannot_write_the_lease(daemon, role)


async def _role_cannot_write_the_lease(daemon: Daemon, role: str) -> None:
    client_login = login(daemon, role)
    refusals: list[str] = []

    async def record(error: Exception) -> None:
        if "permissions violation" in str(error):
            refusals.append(str(error))

    client = await nats.connect(
        client_login["url"],
        user=client_login["user"],
        password=client_login["password"],
        error_cb=record,
        inbox_prefix=inbox_prefix(role),
    )
    try:
        js = client.jetstream(timeout=0.5)
        forged = Holder(instance="attacker", host="elsewhere", pid=1, state_dir="/", epoch=99, state="released")
        subject = f"$KV.{BUCKET}.{EVENTS}"
        for attempt in (
            lambda: client.publish(subject, msgspec.json.encode(forged)),
            lambda: js.publish(subject, msgspec.json.encode(forged)),
            lambda: js.purge_stream(f"KV_{BUCKET}"),
            lambda: js.delete_stream(f"KV_{BUCKET}"),
            lambda: js.key_value(BUCKET),
        ):
            await refused(client, refusals, attempt)
    finally:
        await client.close()


@pytest.mark.slow
def test_a_standby_takes_over_a_killed_holder_within_10_s_and_its_job_goes_on_there(nats_server, tmp_path: Path):
    env = shared(nats_server, tmp_path)
    repo = git_repo(tmp_path / "repo")
    holder = Daemon(tmp_path / "host-a", env=env, agents={"scripted": AGENT}).start()
    standby = launch(Daemon(tmp_path / "host-b", env=env, agents={"scripted": AGENT}), "--standby")
    successor: Daemon | None = None
    try:
        asyncio.run(eventually(lambda: "standing by" in standby.stderr(), timeout=30))
        assert not (standby.state_dir / "connection.json").exists()  # it answers nothing meanwhile
        run = holder.ctl("--json", "run", "--no-plan", "Greet", "--repo", str(repo), "--agent", "scripted")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout)["job"]
        asyncio.run(eventually(lambda: holder.status(job)["tasks"][0]["status"] == "running", timeout=30))

        holder.stop(signal.SIGKILL)
        killed = time.monotonic()
        asyncio.run(eventually(lambda: serving(standby), timeout=15, interval=0.1))
        assert time.monotonic() - killed < 10
        assert "took the lease of NUMERUS_EVENTS: epoch 2" in standby.stderr()

        # The job goes on there: interrupted with the holder, resumed by the standby, done.
        asyncio.run(eventually(lambda: standby.status(job)["status"] == "completed", timeout=60, interval=0.2))
        assert (repo / "HELLO.md").read_text() == "# Hello\n"
        assert standby.ctl("audit", "verify", job, "--key-file", env["NUMERUS_KEY_FILE"]).returncode == 0
        epochs = asyncio.run(stream_epochs(nats_server))
        assert epochs == sorted(epochs) and set(epochs) == {1, 2}

        # A graceful stop hands the lease over at once.
        successor = launch(Daemon(tmp_path / "host-c", env=env, agents={"scripted": AGENT}), "--standby")
        asyncio.run(eventually(lambda: "standing by" in successor.stderr(), timeout=30))
        stopped = time.monotonic()
        assert standby.stop() == 0
        asyncio.run(eventually(lambda: serving(successor), timeout=10, interval=0.1))
        assert time.monotonic() - stopped < 5
        assert "(released)" in successor.stderr()
        assert successor.status(job)["status"] == "completed"
    finally:
        for daemon in (holder, standby, successor):
            if daemon is not None:
                daemon.stop()


@pytest.mark.slow
def test_a_frozen_holder_that_wakes_after_a_takeover_stops_and_its_writes_arerefused(nats_server, tmp_path: Path):
    env = shared(nats_server, tmp_path)
    repo = git_repo(tmp_path / "repo")
    config = "lease_ttl_s = 3"
    holder = Daemon(tmp_path / "host-a", env=env, agents={"scripted": LONG}, config=config).start()
    standby = launch(Daemon(tmp_path / "host-b", env=env, agents={"scripted": LONG}, config=config), "--standby")
    try:
        run = holder.ctl("--json", "run", "--no-plan", "Work long", "--repo", str(repo), "--agent", "scripted")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout)["job"]
        asyncio.run(eventually(lambda: holder.status(job)["tasks"][0]["status"] == "running", timeout=30))
        assert holder.process is not None
        holder.process.send_signal(signal.SIGSTOP)  # frozen: it renews nothing, and knows nothing of it
        try:
            # Not asked over the bus: the frozen holder is still in the service's queue group (its connection
            # lives until the server's pings time out), so some requests would go to it, unanswered.
            asyncio.run(eventually(lambda: "numerusd ready" in standby.stderr(), timeout=20, interval=0.1))
            asyncio.run(eventually(lambda: taken_over(nats_server), timeout=20))  # it took the job on
        finally:
            holder.process.send_signal(signal.SIGCONT)
        assert holder.process.wait(timeout=30) == DaemonExit.UNAVAILABLE
        log = holder.stderr()
        assert log.count("is now held by numerusd pid") == 1, log
        assert "ERROR numerusd.daemon: the lease of NUMERUS_EVENTS (epoch 1) is now held by numerusd pid" in log
        assert log.endswith("numerusd: stopped: the lease of the event stream (epoch 1) passed to another numerusd\n")
        epochs = asyncio.run(stream_epochs(nats_server))
        assert epochs == sorted(epochs), "the frozen holder published after the takeover"
        assert standby.ctl("audit", "verify", "--key-file", env["NUMERUS_KEY_FILE"]).returncode == 0

        # An event it had managed to publish late (made here directly, with its epoch) is refused by every reader.
        stale = asyncio.run(_publish_late(nats_server, tmp_path / "keys.json", job, epoch=1))
        audit = standby.ctl("audit", "verify", "--key-file", env["NUMERUS_KEY_FILE"])
        assert audit.returncode == 1
        assert f"id={stale} job={job} type=JobFailed: stale_epoch:" in audit.stdout
        asyncio.run(eventually(lambda: _dead_lettered(nats_server, stale), timeout=20))
        assert standby.stop() == 0
        restarted = Daemon(standby.state_dir, env=env, agents={"scripted": LONG}, config=config).start()
        try:
            assert "written under epoch 1, after epoch 2 had begun" in restarted.stderr()
            assert restarted.status(job)["status"] != "failed"  # the late JobFailed was not folded
        finally:
            restarted.stop()
    finally:
        for daemon in (holder, standby):
            if daemon.process is not None and daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
            daemon.stop()


async def _publish_late(nats_server, key_file: Path, job: str, epoch: int) -> str:
    """What the old holder would have published had it got past its lease: a JobFailed at its epoch, chained to the
    job's head as it knew it (here: the head now, which is kinder to it than the truth)."""
    nc = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    try:
        js = nc.jetstream()
        store = EventStore(
            nc, js, WriteAheadLog.open(key_file.parent / "late.wal"), Keyring.load(key_file), lease=FixedLease(epoch)
        )
        await store.catch_up()
        [sealed] = await store.append(job, [(None, JobFailed(reason="the old holder went on"))], correlation_id=job)
        await store.flush(5)
        await store.close()
        return sealed.envelope.id
    finally:
        await nc.close()


async def _dead_lettered(nats_server, id: str) -> bool:
    """Whether the views dead-lettered the event `id` as stale_epoch (the last one they did)."""
    nc = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    try:
        message = await nc.jetstream().get_last_msg(DLQ, "numerus.dlq.projector.stale_epoch")
        return decode_wire(message.data or b"").id == id
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


def test_a_standby_on_the_embedded_server_is_refused_in_one_line(tmp_path: Path):
    result = subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "state"), "--standby"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == DaemonExit.CONFIG
    assert result.stderr == (
        "numerusd: --standby needs the shared NATS server of the daemon it stands by for (nats_url)\n"
    )
