"""The event store: seal, write ahead, publish, and keep publishing until JetStream has every event exactly once.

    append ──seal (sign, chain)──> WAL (group commit, fdatasync) ──> caller returns
                                                   └──> outbox ──publish, Nats-Msg-Id = event id──> JetStream
                                                                            acks ──> WAL ack records

`append` returns as soon as the events are durable in the write-ahead log: from then on they are the store's
responsibility, and "nothing acknowledged is lost" holds across NATS outages and daemon crashes.

Chain order. An event's `prev` is the digest of the previous event of its job. The events of one `append` are
sealed and handed to the WAL in one synchronous step, with no await in between, so for each job the order of the
chain, the order in the WAL and the order of publication are the same, without a per-job lock that would keep
two appends of one job out of the same group commit.

Publication. Events are published in WAL order with plain `nc.publish` and a reply subject of our own,
`<inbox>.<event id>`; one subscription takes every ack (no future per message, which is what makes nats-py's
`publish_async` slow). While the connection is down nothing is published (so nats-py never buffers events that
could overtake the ones lost with the old connection). After a reconnect, an error reply, or an event left
unacknowledged for `resend_after` seconds, the store *resyncs*: it reads the stream from just before the oldest
unacknowledged event, counts as acknowledged every one it finds there, republishes the others in order (the
first alone, until the stream takes writes again), then carries on. Because presence is checked in the stream
itself, an event is never stored twice even when the outage outlasted JetStream's duplicate window; within the
window the `Nats-Msg-Id` header catches the rest (acks with `duplicate: true` count as acknowledged).

Startup. The daemon replays the stream and passes each stored event to `observe(seq, wire)`, which rebuilds the
chain heads and notes which WAL entries are already stored; `recover()` then republishes the WAL entries the
stream lacks and returns them, so the daemon folds them in after the stream's own events. A job restored from its
snapshot gives its head with `restore`, and the events of the tail its snapshot already holds pass `covered`.

What is stored, per job. The store knows, for each job, the last of its events the stream is known to hold (its
id, stream sequence and digest: `stored_head`), and since which sequence it has events that no snapshot holds yet
(`unsnapshotted`); with `stable_position`, the highest sequence up to which every event of ours is known stored,
that is what `numerusd.snapshots` needs to say where a replay may begin.

One writer (numerusd/lease.py). A store given the daemon's lease stamps its epoch on every event it seals, appends
nothing once the lease has passed to another numerusd, and publishes nothing while the lease is not proven (not
renewed for its whole time: a standby may have taken over), keeping new events in the WAL. The replay admits each
event through `fence` (the highest epoch seen along the stream); `recover()` drops, unpublished, the WAL entries
that fence refuses: events this daemon wrote under an epoch another holder has since passed.

JetStream errors surface as `StoreError`/`NatsUnavailable` (translated by `streams.jetstream_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from numerusd.errors import NumerusError, StoreError
from numerusd.event_caps import DEFAULT_MAX_EVENT_BYTES, cap_event
from numerusd.keys import Keyring
from numerusd.metrics import Metrics
from numerusd.protocol.envelope import EpochFence, InvalidEvent, Sealed, digest, open_event, seal
from numerusd.protocol.events import EventData
from numerusd.protocol.ids import new_ulid
from numerusd.protocol.subjects import EVENTS, job_of
from numerusd.stream_reader import StreamReader
from numerusd.streams import jetstream_errors
from numerusd.wal import WalEntry, WriteAheadLog

log = logging.getLogger(__name__)

#: An event published this long ago without an ack triggers a resync.
DEFAULT_RESEND_AFTER = 5.0
#: Published but unacknowledged events at most; past it publication waits for acks (backpressure on the server).
DEFAULT_MAX_IN_FLIGHT = 8_192
#: How long the first republished event may take to be acknowledged before the resync backs off and retries.
_PROBE_TIMEOUT = 2.0
_BACKOFF_MAX = 2.0
#: Room left in a message for the headers, under the server's max_payload.
_HEADERS_ROOM = 256
#: Room left in an event for its envelope (ids, time, chain hash, signature) around the payload.
_ENVELOPE_ROOM = 2048
#: Events written to the connection at once, between two looks at the acks.
_BURST = 256


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where it was stored, whether it was a duplicate, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


class _Head(msgspec.Struct):
    """The envelope members the store needs from a stored event (the rest is skipped, not decoded)."""

    id: str
    job: str
    epoch: int = 0


_decode_ack = msgspec.json.Decoder(_PubAck).decode
_decode_head = msgspec.json.Decoder(_Head).decode


class StoredHead(msgspec.Struct, frozen=True):
    """The last event of a job the stream is known to hold: its id, stream sequence, and digest (the chain head)."""

    id: str
    seq: int
    digest: str


class WriterLease(Protocol):
    """What the store asks of the lease it writes under (`numerusd.lease.Lease`)."""

    @property
    def epoch(self) -> int:
        """The epoch stamped on every event."""
        ...

    def may_append(self) -> bool:
        """False once the lease has passed to another numerusd."""
        ...

    def may_publish(self) -> bool:
        """False while the lease is not proven still this daemon's."""
        ...


class _Flight:
    """An event published and not yet acknowledged."""

    __slots__ = ("entry", "floor", "sent")

    def __init__(self, entry: WalEntry, floor: int, sent: float) -> None:
        self.entry = entry
        # The highest stream sequence acknowledged before it was first published: if it is stored, it is
        # stored after this, so a resync reads the stream from here on.
        self.floor = floor
        self.sent = sent


class EventStore:
    """Appends signed, chained events durably and gets each into JetStream exactly once. See the module doc.

    The store owns the WAL it is given (and closes it); it shares `nc` and leaves it open. Lifecycle: replay the
    stream into `observe`, `await recover()`, then `append` freely; `flush` to wait for JetStream; `close`.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        wal: WriteAheadLog,
        keyring: Keyring,
        actor: str = "numerusd",
        *,
        stream: str = EVENTS,
        resend_after: float = DEFAULT_RESEND_AFTER,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        metrics: Metrics | None = None,
        lease: WriterLease | None = None,
    ) -> None:
        self._nc = nc
        self._metrics = metrics or Metrics()
        self._js = js
        self._wal = wal
        self._keyring = keyring
        self._actor = actor
        self._stream = stream
        self._resend_after = resend_after
        self._max_in_flight = max_in_flight
        self._max_event_bytes = max_event_bytes
        self._lease = lease
        #: The writer epochs along the stream, for the startup replay to admit each event through (see `recover`).
        self.fence = EpochFence()
        self._heads: dict[str, str] = {}
        self._stored: dict[str, StoredHead] = {}
        # For each job with stored events that no snapshot holds yet, the sequence of the first of them.
        self._unsnapshotted: dict[str, int] = {}
        # Where the writers' epoch rose along the stream: (the first sequence stored under it, the epoch), in order;
        # below the first, the epoch the snapshots' checkpoint gave.
        self._epochs: list[tuple[int, int]] = []
        self._base_epoch = 0
        # WAL entries left by the previous run, and those of them the replay found in the stream.
        self._recovering = {entry.id for entry in wal.pending()}
        self._found: set[str] = set()
        self._outbox: deque[WalEntry] = deque()
        self._in_flight: dict[str, _Flight] = {}
        self._acked_seq = 0
        self._unacked = 0
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._wake = asyncio.Event()
        self._resync_wanted = asyncio.Event()
        self._stalled = False
        self._epoch = nc.stats["reconnects"]
        self._probe: tuple[str, asyncio.Future[bool]] | None = None
        self._reply_prefix = ""
        self._reply_bytes = b""
        # The lean publish path writes to nats-py's transport (see `_publish`); `_start` checks it is there, so
        # a future nats-py without it falls back to plain `nc.publish` instead of breaking.
        self._lean = False
        self._ack_sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        #: Counters for tests, metrics and the benchmark.
        self.stats = {"published": 0, "republished": 0, "acked": 0, "duplicates": 0, "resyncs": 0, "errors": 0}

    # --- startup -------------------------------------------------------------------------------------------

    def observe(self, seq: int, wire: bytes) -> None:
        """Take note of an event already in the stream (during the startup replay, in stream order)."""
        try:
            head = _decode_head(wire)
        except msgspec.DecodeError:
            # Not an event of ours (the daemon's replay deals with poison messages); no chain to extend.
            log.warning("stream message %d is not an event envelope; ignored by the event store", seq)
            return
        self._heads[head.job] = head_digest = digest(wire)
        self._note_stored(head.job, head.id, seq, head_digest)
        self._note_epoch(seq, head.epoch)
        if seq > self._acked_seq:
            self._acked_seq = seq
        if head.id in self._recovering:
            self._found.add(head.id)

    def covered(self, seq: int, wire: bytes) -> None:
        """Take note of an event in the stream that a snapshot already holds (during the startup replay)."""
        if seq > self._acked_seq:
            self._acked_seq = seq
        try:
            head = _decode_head(wire)
        except msgspec.DecodeError:
            return
        self._note_epoch(seq, head.epoch)
        if head.id in self._recovering:
            self._found.add(head.id)

    def restore(self, job: str, head: StoredHead) -> None:
        """Take a job's chain head from its snapshot, before the replay of the stream's tail."""
        self._heads[job] = head.digest
        self._stored[job] = head
        if head.seq > self._acked_seq:
            self._acked_seq = head.seq

    async def recover(self) -> list[Sealed]:
        """After the replay: republish the WAL entries the stream lacks (in order) and return them; start."""
        if self._started:
            raise StoreError("the event store has already been recovered and started")
        with jetstream_errors(f"check stream {self._stream}"):
            await self._js.stream_info(self._stream)
        pending = self._wal.pending()
        self._wal.ack(self._found)
        missing: list[Sealed] = []
        keys = self._keyring.keys
        fenced: list[str] = []
        for entry in pending:
            if entry.id in self._found:
                continue
            try:
                envelope = open_event(entry.wire, keys)
            except ValueError as e:
                raise StoreError(f"write-ahead log entry {entry.id} does not open: {e}", id=entry.id) from e
            try:
                self.fence.admit(envelope)
            except InvalidEvent as e:
                # Written here after another numerusd took the lease over: every reader would refuse it.
                log.error(
                    "write-ahead log entry %s (%s of job %s) not published: %s",
                    entry.id,
                    envelope.type,
                    envelope.job,
                    e,
                )
                fenced.append(entry.id)
                continue
            if envelope.prev != self._heads.get(envelope.job, ""):
                # Stream and WAL disagree on this job's chain (an event missing before stored ones): an
                # auditor will flag it; we republish anyway rather than lose the event.
                log.error("event %s of job %s does not follow the stream's chain head", entry.id, envelope.job)
            self._heads[envelope.job] = entry_digest = digest(entry.wire)
            missing.append(Sealed(envelope, entry.wire, entry_digest))
        self._recovering = set()
        self._found = set()
        self._wal.ack(fenced)
        if pending:
            await self._wal.sync()
        await self._start()
        if missing:
            self._unacked += len(missing)
            self._all_acked.clear()
            self._outbox.extend(WalEntry(s.envelope.id, s.envelope.subject, s.wire) for s in missing)
            self.stats["republished"] += len(missing)
            self._wake.set()
            log.info("republishing %d events from the write-ahead log", len(missing))
        return missing

    async def catch_up(self) -> list[Sealed]:
        """Replay the whole stream into `observe`, then `recover()` (for tools that need no state)."""
        async with StreamReader(self._nc, self._stream) as reader:
            async for batch in reader:
                for msg in batch:
                    self.observe(msg.seq, msg.data)
        return await self.recover()

    async def _start(self) -> None:
        self._reply_prefix = self._nc.new_inbox() + "."
        self._reply_bytes = self._reply_prefix.encode()
        # No callback: `_ack_loop` drains the queue in bulk, without a coroutine call per ack. Acks are at most
        # one per event in flight (plus duplicates of resends), so the limit is never what drops one.
        self._ack_sub = await self._nc.subscribe(
            self._reply_prefix + "*", pending_msgs_limit=4 * self._max_in_flight + 1024, pending_bytes_limit=0
        )
        # The lean path writes to the transport directly, past nats-py's queue: make sure the server has our
        # subscription before the first ack is due.
        with jetstream_errors("subscribe to JetStream acks"):
            await self._nc.flush()
        transport = getattr(self._nc, "_transport", None)
        self._lean = callable(getattr(transport, "writelines", None)) and callable(getattr(transport, "drain", None))
        loop = asyncio.get_running_loop()
        sub = self._ack_sub
        self._tasks = [
            loop.create_task(self._supervised("publish", self._publish_loop), name="numerus-publish"),
            loop.create_task(self._supervised("ack", lambda: self._ack_loop(sub)), name="numerus-acks"),
            loop.create_task(self._supervised("resync", self._watch_loop), name="numerus-resync"),
        ]
        self._started = True

    async def _supervised(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in a background loop must not silently end publishing for the life of the daemon.
                log.exception("event store %s loop failed; restarting it", what)
                self._wake.set()
                await asyncio.sleep(1.0)

    # --- appending -----------------------------------------------------------------------------------------

    async def append(
        self,
        job: str,
        events: Sequence[tuple[str | None, EventData]],
        *,
        correlation_id: str,
        causation_id: str | None = None,
    ) -> list[Sealed]:
        """Seal `events` (task id or None, payload) for `job`, make them durable, and queue them for JetStream.

        Returns once they are fdatasync'd in the WAL; their publication and acknowledgement follow in the
        background (see `flush`). Raises StoreError if the WAL cannot write them.
        """
        sealed, durable = self.submit(job, events, correlation_id=correlation_id, causation_id=causation_id)
        await durable
        return sealed

    def submit(
        self,
        job: str,
        events: Sequence[tuple[str | None, EventData]],
        *,
        correlation_id: str,
        causation_id: str | None = None,
        on_durable: Callable[[], None] | None = None,
        traceparent: str = "",
    ) -> tuple[list[Sealed], asyncio.Future[None]]:
        """Seal `events` for `job` and queue them for the WAL, in one synchronous step; `append` without the wait.

        Returns the sealed events and a future that resolves once they are durable (StoreError if they cannot
        be). The order of calls is the order of the chain, of the WAL and of the stream. `on_durable` is called
        once they are durable, in that order, whether or not anyone awaits the future. `traceparent` (a W3C
        trace context, already checked) goes in every envelope. Raises StoreError at once for an event too large
        for the server.
        """
        if not self._started or self._closed:
            raise StoreError("the event store is not running (recover() first, or it was closed)")
        if self._lease is not None and not self._lease.may_append():
            raise StoreError("this numerusd no longer holds the lease of the stream: it appends nothing more")
        loop = asyncio.get_running_loop()
        if not events:
            done = loop.create_future()
            done.set_result(None)
            return [], done
        now = datetime.now(UTC)
        kid = self._keyring.current_kid
        key = self._keyring.current_key
        actor = self._actor
        epoch = self._lease.epoch if self._lease is not None else 0
        prev = self._heads.get(job, "")
        sealed: list[Sealed] = []
        cap = self.payload_cap()
        for task, data in events:
            one = seal(
                cap_event(data, cap),
                id=new_ulid(),
                job=job,
                task=task,
                time=now,
                actor=actor,
                epoch=epoch,
                correlation_id=correlation_id,
                causation_id=causation_id,
                prev=prev,
                kid=kid,
                key=key,
                traceparent=traceparent,
            )
            sealed.append(one)
            prev = one.digest
        entries = [WalEntry(s.envelope.id, s.envelope.subject, s.wire) for s in sealed]
        limit = self._nc.max_payload - _HEADERS_ROOM if self._nc.is_connected else 0
        if limit > 0 and any(len(entry.wire) > limit for entry in entries):
            # Refused before the WAL: an event the server cannot take would block every one after it.
            big = max(len(entry.wire) for entry in entries)
            raise StoreError(
                f"an event of {big} bytes exceeds the NATS server's max_payload ({self._nc.max_payload}); "
                "store large outputs as files referenced by path and hash",
                size=big,
            )

        self._metrics.events_appended.inc(len(entries))
        landed = partial(self._on_durable, entries, on_durable, time.monotonic())
        # Heads advance in the same synchronous step that fixes the WAL order (no await in between). Once
        # durable the events go to the outbox, in WAL order, even if this caller has given up waiting: they
        # are the store's now.
        durable = self._wal.submit(entries, landed)
        self._heads[job] = prev
        self._unacked += len(entries)
        self._all_acked.clear()

        def failed(durable: asyncio.Future[None]) -> None:
            if not durable.cancelled() and durable.exception() is not None:
                self._settle(len(entries))  # never to be acknowledged

        durable.add_done_callback(failed)
        return sealed, durable

    def payload_cap(self) -> int:
        """The most bytes an event's payload may take: the configured cap, lowered to fit the server's
        max_payload with room for the envelope and headers. A larger payload is cut (see event_caps.py)."""
        server = self._nc.max_payload  # the last server's, kept while disconnected; 0 before any connection
        if server <= 0:
            return self._max_event_bytes
        return max(1024, min(self._max_event_bytes, server - _HEADERS_ROOM - _ENVELOPE_ROOM))

    def _on_durable(self, entries: list[WalEntry], then: Callable[[], None] | None, submitted: float) -> None:
        self._metrics.append_seconds.observe(time.monotonic() - submitted)
        self._outbox.extend(entries)
        self._wake.set()
        if then is not None:
            then()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event appended so far is acknowledged by JetStream; StoreError after `timeout`."""
        try:
            await asyncio.wait_for(self._all_acked.wait(), timeout)
        except TimeoutError:
            raise StoreError(
                f"{self._unacked} events not yet acknowledged by JetStream after {timeout:g} s "
                "(they are safe in the write-ahead log and will be published when the stream takes them)",
                unacked=self._unacked,
            ) from None

    @property
    def unacknowledged(self) -> int:
        """Events appended (or recovered) and not yet acknowledged by JetStream."""
        return self._unacked

    def chain_head(self, job: str) -> str:
        """The digest of the last event appended or observed for `job` ('' for a job with none)."""
        return self._heads.get(job, "")

    # --- what is stored (for snapshots) ----------------------------------------------------------------------

    def stored_head(self, job: str) -> StoredHead | None:
        """The last event of `job` the stream is known to hold, if any."""
        return self._stored.get(job)

    def epoch_at(self, position: int) -> int:
        """The writer epoch of the events at or below stream sequence `position`: the highest among them, as far
        as this store saw them (what a checkpoint at `position` hands the next replay's fence)."""
        for first_seq, epoch in reversed(self._epochs):
            if first_seq <= position:
                return epoch
        return self._base_epoch

    def restore_epoch(self, epoch: int) -> None:
        """The epoch of the events the snapshots hold (at or below their checkpoint's position), which the replay
        does not read."""
        self._base_epoch = epoch

    def stable_position(self) -> int:
        """A stream sequence up to which every event of ours is known stored: below anything still in flight
        (an event published and not acknowledged is stored, if at all, after its `floor`)."""
        if self._in_flight:
            return min(self._acked_seq, min(flight.floor for flight in self._in_flight.values()))
        return self._acked_seq

    def unsnapshotted(self) -> dict[str, int]:
        """Jobs with stored events that no snapshot holds yet, each with the sequence of the first of them."""
        return dict(self._unsnapshotted)

    def take_unsnapshotted(self, job: str) -> int | None:
        """Forget that `job` has events no snapshot holds (its snapshot is being written); the sequence it had."""
        return self._unsnapshotted.pop(job, None)

    def give_back_unsnapshotted(self, job: str, seq: int) -> None:
        """The snapshot of `job` was not written: its events from `seq` on are still held by none."""
        have = self._unsnapshotted.get(job)
        self._unsnapshotted[job] = seq if have is None else min(have, seq)

    async def sync_acks(self) -> None:
        """Make the acknowledgements received so far durable in the WAL (a checkpoint relies on them)."""
        await self._wal.sync()

    def _note_epoch(self, seq: int, epoch: int) -> None:
        epochs = self._epochs
        if not epochs or epoch > epochs[-1][1]:
            if epoch > self._base_epoch or epochs:
                epochs.append((seq, epoch))
        elif epoch == epochs[-1][1] and seq < epochs[-1][0]:
            epochs[-1] = (seq, epoch)  # acknowledged out of order: the epoch began earlier

    def _note_stored(self, job: str, id_: str, seq: int, head_digest: str) -> None:
        have = self._stored.get(job)
        if have is None or seq > have.seq:
            self._stored[job] = StoredHead(id_, seq, head_digest)
        if job not in self._unsnapshotted:
            self._unsnapshotted[job] = seq

    async def on_reconnected(self) -> None:
        """Pass to nats-py's `reconnected_cb`: check the stream and republish what was in flight."""
        self._resync_wanted.set()

    async def close(self) -> None:
        """Stop publishing, record the acks received, and close the WAL (unacked events stay in it)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ack_sub is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._ack_sub.unsubscribe()
        await self._wal.close()

    # --- publishing ----------------------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        outbox = self._outbox
        in_flight = self._in_flight
        nc = self._nc
        while True:
            await self._wake.wait()
            self._wake.clear()
            while outbox and not self._stalled and nc.is_connected:
                if nc.stats["reconnects"] != self._epoch:
                    # A new connection: what was in flight on the old one may be lost, and must be settled
                    # against the stream and sent again *before* anything newer (see the module doc).
                    self._epoch = nc.stats["reconnects"]
                    if in_flight:
                        self._trouble("reconnected")
                        break
                room = self._max_in_flight - len(in_flight)
                if room <= 0:
                    break  # an ack sets _wake again
                burst: list[WalEntry] = []
                floor = self._acked_seq
                now = time.monotonic()  # one clock reading per burst is precise enough for resend timing
                for _ in range(min(room, _BURST, len(outbox))):
                    entry = outbox.popleft()
                    in_flight[entry.id] = _Flight(entry, floor, now)
                    burst.append(entry)
                if not await self._publish(burst):
                    # Not sent: they stay in flight, and the resync sends them again in their place.
                    self._trouble("publish failed")
                    break
                self.stats["published"] += len(burst)
                await asyncio.sleep(0)  # let the acks of this burst in

    async def _publish(self, entries: list[WalEntry]) -> bool:
        """Publish events with `Nats-Msg-Id` and our reply subject; False if the connection failed, or if the lease
        is not proven (they are sent again, in order, once it is)."""
        if self._lease is not None and not self._lease.may_publish():
            return False
        nc = self._nc
        try:
            if self._lean:
                # Written straight to the connection's transport, never to nats-py's pending buffer: that
                # buffer survives a disconnect and is flushed after the reconnect, which would let events
                # overtake earlier ones lost with the old connection and break the chain order in the stream.
                # What is written to a dying transport dies with it, and the resync sends it again in order.
                # The commands are the HPUB nats-py would build, without its per-call validation and header
                # escaping (ids, subjects and the reply prefix are ours, all plain tokens).
                reply = self._reply_bytes
                commands = []
                for entry in entries:
                    id_ = entry.id.encode()
                    headers = b"NATS/1.0\r\nNats-Msg-Id: %b\r\n\r\n" % id_
                    commands.append(
                        b"HPUB %b %b%b %d %d\r\n%b%b\r\n"
                        % (
                            entry.subject.encode(),
                            reply,
                            id_,
                            len(headers),
                            len(headers) + len(entry.wire),
                            headers,
                            entry.wire,
                        )
                    )
                transport = nc._transport
                transport.writelines(commands)
                await transport.drain()  # backpressure: wait while the socket's buffer is full
            else:
                for entry in entries:
                    await nc.publish(
                        entry.subject,
                        entry.wire,
                        reply=self._reply_prefix + entry.id,
                        headers={"Nats-Msg-Id": entry.id},
                    )
        except (nats.errors.Error, OSError, RuntimeError, AttributeError) as e:
            log.warning("publishing %d events failed: %s", len(entries), e)
            return False
        return True

    async def _ack_loop(self, sub: Subscription) -> None:
        queue: asyncio.Queue[Msg] = sub._pending_queue
        while True:
            msg = await queue.get()
            acked: list[str] = []
            while True:
                self._on_ack(msg, acked)
                try:
                    msg = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if acked:
                self._wal.ack(acked)
                if self._outbox:
                    self._wake.set()

    def _on_ack(self, msg: Msg, acked: list[str]) -> None:
        id_ = msg.subject[len(self._reply_prefix) :]
        if id_ not in self._in_flight:
            return  # the ack of a copy already acknowledged
        probe = self._probe
        data = msg.data
        if not data:
            # A status instead of an ack: 503 no responders, the stream is not there (yet).
            reason = (msg.headers or {}).get("Status", "no answer")
            self._refused(id_, f"status {reason}", probe)
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError:
            self._refused(id_, "unreadable ack", probe)
            return
        if ack.error is not None:
            self._refused(id_, f"{ack.error.code}/{ack.error.err_code} {ack.error.description}", probe)
            return
        if ack.stream != self._stream:
            self._refused(id_, f"stored in stream {ack.stream!r}, not {self._stream!r}", probe)
            return
        if ack.duplicate:
            self.stats["duplicates"] += 1
        self._acknowledged(id_, ack.seq, acked)
        if probe is not None and probe[0] == id_ and not probe[1].done():
            probe[1].set_result(True)

    def _acknowledged(self, id_: str, seq: int, acked: list[str] | None = None) -> None:
        entry = self._in_flight.pop(id_).entry
        job = job_of(entry.subject)
        if job is not None:
            self._note_stored(job, id_, seq, digest(entry.wire))
            self._note_epoch(seq, self._lease.epoch if self._lease is not None else 0)
        if acked is None:
            self._wal.ack((id_,))
            if self._outbox:
                self._wake.set()
        else:
            acked.append(id_)  # the caller records the whole drained batch at once
        if seq > self._acked_seq:
            self._acked_seq = seq
        self.stats["acked"] += 1
        self._settle(1)

    def _settle(self, count: int) -> None:
        self._unacked -= count
        if self._unacked <= 0:
            self._unacked = 0
            self._all_acked.set()

    def _refused(self, id_: str, reason: str, probe: tuple[str, asyncio.Future[bool]] | None) -> None:
        self.stats["errors"] += 1
        if probe is not None and probe[0] == id_ and not probe[1].done():
            probe[1].set_result(False)
        self._trouble(f"event {id_} refused: {reason}")

    def _trouble(self, reason: str) -> None:
        # Later events may already be on their way; stop sending more until the resync has looked at the
        # stream, so that what follows the trouble is sent again in order.
        if not self._stalled:
            log.warning("event publication paused: %s", reason)
        self._stalled = True
        self._resync_wanted.set()

    # --- resync --------------------------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        tick = min(0.25, self._resend_after / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_wanted.wait(), tick)
            overdue = False
            if self._in_flight:
                oldest = next(iter(self._in_flight.values()))
                overdue = time.monotonic() - oldest.sent > self._resend_after
            if self._resync_wanted.is_set() or overdue:
                await self._resync()
            elif self._outbox and self._nc.is_connected:
                self._wake.set()  # whatever was held while disconnected
            if not self._in_flight and not self._outbox and self._wal.unrecorded_acks:
                # Quiet: write the acks down, so a restart has less to look up in the stream.
                try:
                    await self._wal.sync()
                except StoreError as e:
                    log.error("%s", e)

    async def _resync(self) -> None:
        self._stalled = True
        self.stats["resyncs"] += 1
        backoff = 0.05
        try:
            while True:
                self._resync_wanted.clear()
                if self._nc.is_connected:
                    try:
                        if await self._resync_once():
                            return
                    except NumerusError as e:
                        log.warning("resync of event publication failed, will retry: %s", e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            # Trouble reported while the resend was under way asks for another round before going on.
            self._stalled = self._resync_wanted.is_set()
            self._wake.set()

    async def _resync_once(self) -> bool:
        """Settle in-flight events against the stream, resend the rest in order; True when healthy again."""
        in_flight = self._in_flight
        self._epoch = self._nc.stats["reconnects"]
        if not in_flight:
            return True
        floor = min(flight.floor for flight in in_flight.values())
        async with StreamReader(self._nc, self._stream, start_seq=floor + 1) as reader:
            async for batch in reader:
                for msg in batch:
                    try:
                        id_ = _decode_head(msg.data).id
                    except msgspec.DecodeError:
                        continue
                    if id_ in in_flight:
                        self._acknowledged(id_, msg.seq)
            seen = reader.last_seq
        if not in_flight:
            return True
        flights = list(in_flight.values())
        now = time.monotonic()
        for flight in flights:
            # Verified absent up to `seen`: the next resync need not read the stream before that.
            flight.floor = max(flight.floor, seen)
            flight.sent = now
        # The first alone: only when it is stored do the others follow, so that a stream that is still
        # starting cannot take later events and refuse earlier ones.
        first = flights[0].entry
        loop = asyncio.get_running_loop()
        probe: asyncio.Future[bool] = loop.create_future()
        self._probe = (first.id, probe)
        try:
            if not await self._publish([first]):
                return False
            self.stats["republished"] += 1
            try:
                if not await asyncio.wait_for(probe, _PROBE_TIMEOUT):
                    return False
            except TimeoutError:
                return False
        finally:
            self._probe = None
        rest = [flight.entry for flight in flights[1:] if flight.entry.id in in_flight]
        for start in range(0, len(rest), _BURST):
            if not await self._publish(rest[start : start + _BURST]):
                return False
            self.stats["republished"] += len(rest[start : start + _BURST])
        return True
