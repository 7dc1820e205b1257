"""Snapshots of job state, so that a daemon starts from them and the stream's tail instead of the whole history.

The events stay the truth; a snapshot only saves re-reading them. `NUMERUS_SNAPSHOTS` keeps the last message of
each subject:

* `numerus.snapshot.job.<job>`: a job's state (`JobState`) as the fold of its events up to one of them, with that
  event's id, stream sequence and digest (the chain head the job's next event extends);
* `numerus.snapshot.checkpoint`: the *position*, a stream sequence such that every event at or below it is held
  by the snapshot of its job, and how many job snapshots there are.

A start reads the checkpoint and every job snapshot, restores them, and replays the stream from `position + 1`,
skipping the events a job's snapshot already holds (its `seq` may be past the position). Jobs that ended long
ago are never read again; the jobs under way are read from their snapshot and their last events.

Writing one (`Snapshotter.checkpoint`): for each job with stored events that no snapshot holds, if its state in
the book is exactly the fold of the stream's events up to its last stored one (nothing of it still in flight),
that state is written; a job caught mid-flight keeps the position below its first unsnapshotted event and is
written next time. The position is then the lowest of: what the event store knows stored (`stable_position`),
and one before the first unsnapshotted event of any job. The WAL's acknowledgements are synced before the
checkpoint is written, so a WAL entry still pending at the next start lies past the position and is found in the
tail rather than published twice.

Every snapshot is signed like an event (HMAC-SHA256 under the keyring's current key, named by `kid`) and carries
the digest of the state types' schema (`FORMAT`): a snapshot that does not verify, of another format (a daemon of
another version wrote it), pointing past the end of the stream, or missing (fewer than the checkpoint counts),
makes the start replay the whole stream instead, said in the log, and the next checkpoint writes every job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from numerusd.book import JobBook
from numerusd.domain.state import JobState
from numerusd.errors import NatsUnavailable, StoreError
from numerusd.event_store import EventStore, StoredHead
from numerusd.keys import Keyring
from numerusd.protocol.subjects import CHECKPOINT, EVENTS, SNAPSHOTS, job_snapshot
from numerusd.stream_reader import last_sequence, read_stream
from numerusd.streams import jetstream_errors

log = logging.getLogger(__name__)

#: Write a checkpoint once this many events were stored since the last one, or this many seconds passed with any.
DEFAULT_EVERY_EVENTS = 5_000
DEFAULT_EVERY_S = 60.0
#: Snapshots published at once while a checkpoint writes many (the first after an upgrade writes every job).
_PUBLISH_AT_ONCE = 64
#: Room kept under the server's max_payload for the message's headers.
_HEADERS_ROOM = 512


class JobSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One job's state as the fold of its events up to `head` (the stream holds that event at `head.seq`)."""

    job: str
    head: StoredHead
    state: JobState


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Every event at or below `position` is held by its job's snapshot; `jobs` snapshots exist; no event there
    was written under an epoch above `epoch` (a replay from here refuses events of a lower one: `EpochFence`)."""

    position: int
    jobs: int
    epoch: int = 0
    written: datetime


#: The digest of the snapshots' schema: a change of the state types makes older snapshots unreadable, not wrong.
FORMAT = hashlib.sha256(msgspec.json.encode(msgspec.json.schema_components((JobSnapshot, Checkpoint)))).hexdigest()[:16]


class _Signed(msgspec.Struct, frozen=True, array_like=True):
    """What is stored: the format, the key id, the signature, and the compressed body it signs."""

    format: str
    kid: str
    sig: str
    body: bytes


class InvalidSnapshot(ValueError):
    """A stored snapshot that cannot be used: unreadable, of another format, or not signed by our keys."""


_signed_decoder = msgspec.msgpack.Decoder(_Signed)
_job_decoder = msgspec.msgpack.Decoder(JobSnapshot)
_checkpoint_decoder = msgspec.msgpack.Decoder(Checkpoint)


def _mac(key: bytes, format_: str, body: bytes) -> str:
    return hmac.new(key, format_.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def seal_snapshot(value: JobSnapshot | Checkpoint, keyring: Keyring) -> bytes:
    """The stored bytes of a snapshot or checkpoint: compressed, signed under the current key."""
    body = zlib.compress(msgspec.msgpack.encode(value), 1)
    sig = _mac(keyring.current_key, FORMAT, body)
    return msgspec.msgpack.encode(_Signed(FORMAT, keyring.current_kid, sig, body))


def _open(data: bytes, keys: dict[str, bytes]) -> bytes:
    try:
        signed = _signed_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise InvalidSnapshot(f"unreadable: {e}") from e
    if signed.format != FORMAT:
        raise InvalidSnapshot(f"written in format {signed.format}, this daemon reads {FORMAT}")
    key = keys.get(signed.kid)
    if key is None:
        raise InvalidSnapshot(f"signed with unknown key id {signed.kid!r}")
    if not hmac.compare_digest(_mac(key, signed.format, signed.body), signed.sig):
        raise InvalidSnapshot("signature does not match its content")
    try:
        return zlib.decompress(signed.body)
    except zlib.error as e:
        raise InvalidSnapshot(f"body does not decompress: {e}") from e


def open_job_snapshot(data: bytes, keys: dict[str, bytes]) -> JobSnapshot:
    """The job snapshot in `data`, verified; InvalidSnapshot if it cannot be used."""
    try:
        return _job_decoder.decode(_open(data, keys))
    except msgspec.DecodeError as e:  # signed by us, so a bug rather than an attack: still, never half-used
        raise InvalidSnapshot(f"does not decode: {e}") from e


def open_checkpoint(data: bytes, keys: dict[str, bytes]) -> Checkpoint:
    """The checkpoint in `data`, verified; InvalidSnapshot if it cannot be used."""
    try:
        return _checkpoint_decoder.decode(_open(data, keys))
    except msgspec.DecodeError as e:
        raise InvalidSnapshot(f"does not decode: {e}") from e


@dataclass
class Loaded:
    """What a start begins from: the position the replay starts after, and the jobs restored from snapshots."""

    position: int = 0
    jobs: dict[str, JobSnapshot] = field(default_factory=dict)
    #: The highest writer epoch of the events the snapshots hold.
    epoch: int = 0
    #: Why the whole stream is replayed, when it is although snapshots were there.
    ignored: str | None = None


async def load(nc: Client, js: JetStreamContext, keys: dict[str, bytes]) -> Loaded:
    """Read the checkpoint and every job snapshot; `Loaded()` (replay everything) if any of them cannot be used."""
    checkpoint: Checkpoint | None = None
    jobs: dict[str, JobSnapshot] = {}
    try:
        async for batch in read_stream(nc, SNAPSHOTS):
            for message in batch:
                if message.subject == CHECKPOINT:
                    checkpoint = open_checkpoint(message.data, keys)
                else:
                    snapshot = open_job_snapshot(message.data, keys)
                    if message.subject != job_snapshot(snapshot.job):
                        raise InvalidSnapshot(f"the snapshot of job {snapshot.job} is on {message.subject}")
                    jobs[snapshot.job] = snapshot
        if checkpoint is None:
            return Loaded(ignored="no checkpoint" if jobs else None)
        if len(jobs) < checkpoint.jobs:
            raise InvalidSnapshot(f"{checkpoint.jobs - len(jobs)} of {checkpoint.jobs} job snapshots are missing")
        last = await last_sequence(js, EVENTS)
        furthest = max([checkpoint.position, *(snapshot.head.seq for snapshot in jobs.values())])
        if furthest > last:
            raise InvalidSnapshot(f"they reach stream sequence {furthest}, the stream ends at {last}")
    except InvalidSnapshot as e:
        log.warning("snapshots not used, the whole stream is replayed: %s", e)
        return Loaded(ignored=str(e))
    return Loaded(position=checkpoint.position, jobs=jobs, epoch=checkpoint.epoch)


@dataclass
class CheckpointReport:
    """What one checkpoint did."""

    position: int
    written: int
    skipped: int
    seconds: float


class Snapshotter:
    """Writes job snapshots and checkpoints from the job book (see the module doc): `checkpoint()` now, or `run()`
    to write one whenever `every_events` events were stored since the last, or `every_s` seconds passed with any."""

    def __init__(
        self,
        js: JetStreamContext,
        nc: Client,
        book: JobBook,
        store: EventStore,
        keyring: Keyring,
        *,
        known: Iterable[str] = (),
        position: int = 0,
        every_events: int = DEFAULT_EVERY_EVENTS,
        every_s: float = DEFAULT_EVERY_S,
    ) -> None:
        self._js = js
        self._nc = nc
        self._book = book
        self._store = store
        self._keyring = keyring
        #: Jobs with a snapshot written (or restored): the checkpoint counts them.
        self._known = set(known)
        self._every_events = every_events
        self._every_s = every_s
        self._lock = asyncio.Lock()
        self._position = position
        self._written_at = time.monotonic()
        self._too_large: set[str] = set()
        #: Counters for tests, metrics and the benchmark.
        self.stats = {"checkpoints": 0, "written": 0}

    @property
    def position(self) -> int:
        """Where the last checkpoint written says a replay begins."""
        return self._position

    def due(self) -> bool:
        """Whether enough was stored since the last checkpoint to write another."""
        if not self._store.unsnapshotted():
            return False
        stored = self._store.stable_position() - self._position
        return stored >= self._every_events or time.monotonic() - self._written_at >= self._every_s

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Write a checkpoint whenever one is due, until `stop`; trouble is logged and tried again later."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
            if stop.is_set() or not self.due():
                continue
            try:
                await self.checkpoint()
            except (NatsUnavailable, StoreError) as e:
                log.warning("snapshots not written, tried again later: %s", e)

    async def checkpoint(self) -> CheckpointReport:
        """Write the snapshot of every job whose stored events no snapshot holds, then the checkpoint."""
        async with self._lock:
            started = time.monotonic()
            store = self._store
            taken: list[tuple[str, int, JobSnapshot]] = []
            skipped = 0
            for job_id in store.unsnapshotted():
                state = self._book.jobs.get(job_id)
                head = store.stored_head(job_id)
                if state is None or head is None or state.last_event_id != head.id:
                    skipped += 1  # events of it still on their way: next time
                    continue
                since = store.take_unsnapshotted(job_id)
                assert since is not None
                taken.append((job_id, since, JobSnapshot(job=job_id, head=head, state=state)))
            written = 0
            unwritten = {job_id: since for job_id, since, _ in taken}
            try:
                for start in range(0, len(taken), _PUBLISH_AT_ONCE):
                    chunk = [snapshot for _, _, snapshot in taken[start : start + _PUBLISH_AT_ONCE]]
                    results = await asyncio.gather(*(self._write(snapshot) for snapshot in chunk))
                    for snapshot, stored in zip(chunk, results, strict=True):
                        if stored:
                            del unwritten[snapshot.job]
                            self._known.add(snapshot.job)
                            written += 1
            finally:
                # Not written (refused, failed, or this checkpoint cancelled): their events are held by none yet.
                for job_id, since in unwritten.items():
                    store.give_back_unsnapshotted(job_id, since)
            position = store.stable_position()
            pending = store.unsnapshotted()
            if pending:
                position = min(position, min(pending.values()) - 1)
            await store.sync_acks()
            checkpoint = Checkpoint(
                position=position, jobs=len(self._known), epoch=store.epoch_at(position), written=datetime.now(UTC)
            )
            with jetstream_errors("write the snapshots' checkpoint"):
                await self._js.publish(CHECKPOINT, seal_snapshot(checkpoint, self._keyring), stream=SNAPSHOTS)
            self._position = position
            self._written_at = time.monotonic()
            self.stats["checkpoints"] += 1
            self.stats["written"] += written
            report = CheckpointReport(position, written, skipped, time.monotonic() - started)
            log.debug("checkpoint at %d: %d job snapshots written, %d left for next time", position, written, skipped)
            return report

    async def _write(self, snapshot: JobSnapshot) -> bool:
        data = seal_snapshot(snapshot, self._keyring)
        if len(data) > self._nc.max_payload - _HEADERS_ROOM:
            if snapshot.job not in self._too_large:  # said once: its events are replayed at every start instead
                self._too_large.add(snapshot.job)
                log.warning(
                    "job %s's snapshot (%d bytes) exceeds the server's max_payload: it is replayed from its events",
                    snapshot.job,
                    len(data),
                )
            return False
        with jetstream_errors(f"write the snapshot of job {snapshot.job}"):
            await self._js.publish(job_snapshot(snapshot.job), data, stream=SNAPSHOTS)
        return True
