"""The projector: follows the event stream and commits each batch's view changes with its stream position.

The stream is the truth; the views (`views.schema`) are a cache of `domain.evolve` folded over it, kept for an
operator's `sqlite3` queries; the daemon answers `status` from its own fold, never from them. The
projector follows the pattern of pyeventsourcing's `SQLiteProcessRecorder`: each batch of stream messages changes
the views *and* the stored stream position in one SQLite transaction, so after a crash it resumes exactly where
its last commit left off, and a batch it has already applied is skipped. Replaying the stream into an empty file
(`views.rebuild`) gives the same rows, byte for byte (`views.dump`).

A message that is not folded (`views.fold`) is recorded in `rejected` and handed to the caller's `on_rejected`
before its batch commits: the daemon dead-letters it on `numerus.dlq.projector.<reason>`.

How it goes fast (see docs/projections.md for figures): while the cache holds every job a message is folded as
soon as it is opened, and dropped; the rows of a batch go to SQLite in multi-row VALUES statements
(`views.rows`), in one call to the database's thread (`views.database`), up to three batches queued behind one
another while the next ones are folded, so the folding waits for SQLite only when it is three commits ahead. A
bulk load (a rebuild into a fresh file) also skips fsync, keeps its rollback journal in memory, writes each job's
rows once, when the job ends, and builds the secondary indexes once its rows are in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from numerusd.domain import JobState
from numerusd.errors import StoreError
from numerusd.protocol import subjects
from numerusd.protocol.commands import JOB_DONE
from numerusd.protocol.envelope import EpochFence
from numerusd.stream_reader import StreamMessage, read_stream
from numerusd.views import schema
from numerusd.views.database import ViewsDatabase, translated
from numerusd.views.fold import Message, Opened, Rejected, fold_events, open_messages
from numerusd.views.rows import INSERTS, Statements, changed_task_rows, job_row, write_batch

log = logging.getLogger(__name__)

#: The stream the views are projected from.
STREAM = subjects.EVENTS

#: Jobs whose state is kept in memory between batches; others are read back from `jobs.state` when needed.
CACHE_JOBS = 10_000

#: Messages asked of the stream per pull request when replaying: bigger batches, fewer commits.
READ_BATCH = 5_000

#: How a replay reads the stream: batches of messages from a stream sequence on, until caught up.
Reading = Callable[[int], AsyncIterator[Sequence[Message]]]

# Events opened or folded between two yields to the event loop.
_SLICE = 64

# Commits queued behind one another while the next batches are folded.
_IN_FLIGHT = 3

# Following a live stream, a batch smaller than this is followed by a pause of `_LINGER_S` before the next read,
# so that a busy daemon's events are written in a few transactions a second rather than one or two per event:
# each costs a commit and the encoding of its jobs' whole state. The views trail the stream by that much more.
_LINGER_BELOW = 1_000
_LINGER_S = 0.05

# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
_IN_CHUNK = 500

_state_decoder = msgspec.json.Decoder(JobState)


class Replayed(NamedTuple):
    """What `catch_up_from` committed: messages read, and how many of them were rejected."""

    messages: int
    rejected: int


class _Prepared(NamedTuple):
    """A batch folded in memory, ready to be committed."""

    last_seq: int
    epoch: int  # the highest writer epoch seen up to `last_seq`, stored with it
    work: dict[str, JobState]  # the jobs the batch changed, as it leaves them
    before: dict[str, JobState | None]  # the same jobs before the batch
    flush: dict[str, JobState]  # bulk loads: jobs leaving the cache, whose rows must be written now
    event_rows: list[tuple[Any, ...]]
    rejected: list[Rejected]
    careful: bool


class _Duplicate(Exception):
    """The batch repeats an event id already in the index: it must be prepared again, checking every id."""


class Projector:
    """Keeps the SQLite views of one database file up to date with the event stream.

    Use as `async with Projector(path, keys) as projector:`; then `apply` batches, or `run` to follow the
    stream. One projector per file: batches are applied one at a time, in stream order.
    """

    def __init__(self, path: str | Path, keys: dict[str, bytes], *, cache_jobs: int = CACHE_JOBS) -> None:
        self.path = Path(path)
        self._keys = keys
        self._cache_jobs = cache_jobs
        self._db: ViewsDatabase | None = None
        self._position = 0
        self._head = 0  # the last seq folded into the cache: ahead of `_position` while a commit is in flight
        self._fence = EpochFence()  # writer epochs up to `_head`: stale events are refused (views.fold)
        self._lock = asyncio.Lock()
        # Job states by id, least recently changed first. While `_complete` is true the cache holds every job
        # in the file (it started empty and nothing was evicted), so a job missing from it does not exist and
        # need not be looked up: this spares a rebuild one query per batch.
        self._cache: dict[str, JobState] = {}
        self._complete = False
        self._stale = False  # the position in memory may be behind the file's (a commit was cancelled)
        self._bulk = False
        self._dirty: set[str] = set()  # bulk loads: jobs whose rows are behind their cached state
        self._committing: asyncio.Future[None] | None = None  # the last commit queued beside `_prepare`
        self._lettered = 0  # the last seq dead-lettered by this projector (after a restart: again, not lost)
        self._inserts = tuple(insert.fitted(999) for insert in INSERTS)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def open(self, *, bulk: bool = False) -> Projector:
        """Open (creating if needed) the database.

        `bulk` starts an empty file for a rebuild and trades durability for speed: no fsync, and job and task
        rows written once, when the job ends, leaves the cache or at `finish()`, rather than after every batch.
        Until `finish()` the file is stamped incomplete (user_version 0), so a file left by an interrupted bulk
        load is dropped and rebuilt on its next open, never read as if it were whole. Feed a bulk load through
        `catch_up_from` (as `rebuild` does): it alone can start over when the stream repeats an event.
        """
        db = await ViewsDatabase.open(self.path)
        try:
            with translated("open", self.path):
                found = await db.run(schema.open_views, self.path, bulk=bulk)
        except BaseException:
            await db.close()  # or its thread outlives us
            raise
        self._db = db
        self._bulk = bulk
        self._inserts = tuple(insert.fitted(found.max_params) for insert in INSERTS)
        self._position = self._head = found.position
        self._fence = EpochFence(found.epoch)
        self._complete = found.empty
        return self

    async def finish(self) -> None:
        """End a bulk load: write the rows still held in memory, stamp the file complete."""
        if not self._bulk:
            return
        async with self._lock:
            dirty = {job: self._cache[job] for job in self._dirty}
            with translated("finish the rebuild", self.path):
                await self._write(_Prepared(self._position, self._fence.highest, {}, {}, dirty, [], [], False))
                await self._database.run(schema.finish_bulk)
            self._dirty.clear()
            self._bulk = False

    async def close(self) -> None:
        """Close the file (a bulk load not `finish()`ed stays marked incomplete)."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> Projector:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _database(self) -> ViewsDatabase:
        if self._db is None:
            raise StoreError(f"projection database {self.path} is not open", path=str(self.path))
        return self._db

    async def _empty(self) -> None:
        """Empty every view and set the position back to 0, so that the next batch starts a full replay."""
        with translated("drop the views", self.path):
            await self._database.run(schema.empty_views, bulk=self._bulk)
        self._position = self._head = 0
        self._fence = EpochFence()
        self._cache.clear()
        self._dirty.clear()
        self._complete = True
        self._stale = False

    # --- applying events -------------------------------------------------------------------------------------

    def position(self) -> int:
        """The stream sequence of the last message applied and committed (0 before the first)."""
        return self._position

    async def count_rows(self) -> tuple[int, int]:
        """How many jobs and tasks the views hold (what a rebuild reports)."""
        with translated("count the rows", self.path):
            [(jobs, tasks)] = await self._database.fetchall(
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM tasks)"
            )
        return jobs, tasks

    async def apply(self, batch: Sequence[Message]) -> list[Rejected]:
        """Fold a batch of stream messages, in stream order, into the views in one transaction.

        Messages at or below the stored position were applied before and are skipped. Returns the messages
        that were rejected, in stream order, for the caller to dead-letter.
        """
        async with self._lock:
            prepared = await self._prepare(batch)
            if prepared is None:
                return []
            try:
                await self._commit(prepared)
            except _Duplicate as e:
                if self._bulk:  # the rows of cached jobs were not written: nothing to start again from
                    raise StoreError(f"event repeated in the stream during a bulk load of {self.path}") from e
                prepared = await self._prepare(batch, careful=True)
                assert prepared is not None
                await self._commit(prepared)
            return prepared.rejected

    async def _prepare(self, batch: Sequence[Message], *, careful: bool = False) -> _Prepared | None:
        """Open and fold a batch in memory: the rows to write, and the job states it leaves in the cache.

        Event ids are checked against the index only when `careful`: normally the index's UNIQUE constraint
        catches a repeated id at commit time for free, and the batch is then prepared again, carefully. The
        loops yield to the event loop every `_SLICE` events so that a long batch does not hold up the daemon's
        other work (its requests, its timers). They do not make the commit running beside start sooner: a
        thread waiting for the GIL is handed it only when the holder keeps it for a whole switch interval, and
        each yield lets go of it and takes it back at once, so the database thread waits for the folding to
        await something (measured: a write queued as a batch's folding began started when it ended, 37 ms on).
        Without the yields it starts at once, then waits an interval per statement; whole rebuilds were no
        faster either way (docs/projections.md).
        """
        if self._stale:
            with translated("read the position", self.path):
                [(position, epoch)] = await self._database.fetchall("SELECT seq, epoch FROM position")
            self._position = self._head = position
            self._fence = EpochFence(epoch)
            self._stale = False
        head = self._head
        if batch and batch[0][0] <= head:
            batch = [message for message in batch if message[0] > head]
        if not batch:
            return None
        rejected: list[Rejected] = []
        before: dict[str, JobState | None] = {}
        work: dict[str, JobState] = {}
        event_rows: list[tuple[Any, ...]] = []
        fold = functools.partial(fold_events, cache=self._cache, before=before, work=work, rows=event_rows)
        keys = self._keys
        known: set[str] = set()
        if self._complete and not careful:
            # Every job is in the cache (a replay into a fresh file): each event is folded as soon as it is
            # opened, and dropped, instead of a batch of them being held (and scanned by the GC) in between.
            for start in range(0, len(batch), _SLICE):
                opening = open_messages(batch[start : start + _SLICE], keys, rejected, self._fence)
                fold(opening, known=known, rejected=rejected)
                await asyncio.sleep(0)
        else:
            opened: list[Opened] = []
            for start in range(0, len(batch), _SLICE):
                opened.extend(open_messages(batch[start : start + _SLICE], keys, rejected, self._fence))
                await asyncio.sleep(0)
            before.update(await self._load_missing({event.job for _, _, _, event in opened}))
            if careful:
                known = await self._known_ids([event.id for _, _, _, event in opened])
            for start in range(0, len(opened), _SLICE):
                fold(opened[start : start + _SLICE], known=known, rejected=rejected)
                await asyncio.sleep(0)
        rejected.sort(key=lambda r: r.seq)
        self._head = batch[-1][0]
        # Cached before the commit so that the next batch can be folded while this one is being written; a
        # failed commit forgets the whole cache (`_reset`).
        flush = self._remember(work)
        return _Prepared(batch[-1][0], self._fence.highest, work, before, flush, event_rows, rejected, careful)

    async def _load_missing(self, jobs: set[str]) -> dict[str, JobState | None]:
        """The state of each job at the start of the batch (None for a job not seen yet)."""
        cache = self._cache
        loaded: dict[str, JobState | None] = {}
        missing = []
        for job in jobs:
            state = cache.get(job)
            if state is None and not self._complete:
                missing.append(job)
            loaded[job] = state
        if missing:
            await self._settled()
        with translated("read job states", self.path):
            for chunk in _chunks(missing, _IN_CHUNK):
                query = f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
                for job, state in await self._database.fetchall(query, chunk):
                    loaded[job] = _state_decoder.decode(state)
        return loaded

    async def _known_ids(self, ids: list[str]) -> set[str]:
        """Which of these event ids were applied before: a republished event must not be counted twice."""
        known: set[str] = set()
        await self._settled()
        with translated("look up event ids", self.path):
            for chunk in _chunks(ids, _IN_CHUNK):
                query = f"SELECT id FROM events WHERE id IN ({','.join('?' * len(chunk))})"
                known.update(row[0] for row in await self._database.fetchall(query, chunk))
        return known

    async def _settled(self) -> None:
        """Wait for the commits in flight, if any: what the next batch reads back must include their rows."""
        if self._committing is not None and not self._committing.done():
            await asyncio.wait([self._committing])  # the last waits for the others; outcomes are `_replay`'s

    async def _commit(self, prepared: _Prepared, after: asyncio.Future[None] | None = None) -> None:
        """Write a prepared batch's rows and its position in one transaction: both or neither.

        `after` is the commit of the batch before, still in flight: this one waits for it, and fails with it.
        """
        try:
            if after is not None:
                await after
            with translated("apply a batch", self.path):
                try:
                    await self._write(prepared)
                except sqlite3.IntegrityError as e:
                    if prepared.careful:
                        raise
                    raise _Duplicate from e
        except BaseException:
            # Nothing of this batch stays behind: `write_batch` rolls back what it began (a cancelled write that
            # had not started never runs; one that had runs to its end in the database's thread). Forget the
            # cache, and read the position back from the file before the next batch.
            self._reset()
            raise
        self._position = prepared.last_seq

    async def _write(self, prepared: _Prepared) -> None:
        if self._bulk:
            # Rows of the jobs leaving the cache, whole; the others are written by `finish()`.
            jobs = prepared.flush
            tasks = [row for state in jobs.values() for row in changed_task_rows(state, None)]
        else:
            jobs, before = prepared.work, prepared.before
            tasks = [row for job, state in jobs.items() for row in changed_task_rows(state, before[job])]
        job_rows = [job_row(state) for state in jobs.values()]
        rejected = [(r.seq, r.subject, r.reason, r.message) for r in prepared.rejected]
        tables = (job_rows, tasks, prepared.event_rows, rejected)
        statements: Statements = [
            pair for insert, rows in zip(self._inserts, tables, strict=True) for pair in insert.statements(rows)
        ]
        await self._database.run(write_batch, statements, prepared.last_seq, prepared.epoch)

    def _reset(self) -> None:
        self._cache.clear()
        self._complete = False
        self._head = self._position
        self._stale = True

    def _remember(self, work: dict[str, JobState]) -> dict[str, JobState]:
        """Cache the batch's job states; return those whose rows a bulk load writes with this batch (ended, evicted)."""
        cache = self._cache
        for job, state in work.items():
            cache.pop(job, None)  # re-insert at the end: the dict's order is the eviction order
            cache[job] = state
        flush: dict[str, JobState] = {}
        if self._bulk:
            # A job that has ended rarely changes again: its rows are written now, beside the folding, rather
            # than all at `finish()`. Should another event come for it, it is simply written again.
            for job, state in work.items():
                if state.status in JOB_DONE:
                    self._dirty.discard(job)
                    flush[job] = state
                else:
                    self._dirty.add(job)
        excess = len(cache) - self._cache_jobs
        if excess > 0:
            for job in list(_take(cache, excess)):
                state = cache.pop(job)
                if job in self._dirty:
                    self._dirty.discard(job)
                    flush[job] = state
            self._complete = False
        return flush

    # --- following and replaying the stream -------------------------------------------------------------------

    async def catch_up_from(self, read: Reading) -> Replayed:
        """Apply every message after the stored position up to the stream's end, reading it with `read`
        (`rebuild` reads it in a child process); what was committed.

        Batch n+1 is read and folded while batch n is being written (the write runs in the database's thread
        with the GIL released).
        """
        counts = [0, 0]
        await self._follow(read, counts, stop=None, on_rejected=None)
        messages, rejected = counts
        return Replayed(messages, rejected)

    async def run(
        self,
        nc: Any,
        stop: asyncio.Event,
        *,
        on_rejected: Callable[[list[Rejected]], Awaitable[None]],
        stream: str = STREAM,
    ) -> None:
        """Follow the stream from the stored position until `stop` is set, applying batches as they come.

        Rejected messages go to `on_rejected` (the daemon dead-letters them on `numerus.dlq.projector.<reason>`)
        before their batch commits: a crash in between repeats a dead letter rather than losing it. A failure
        to write the views is raised (StoreError); the caller decides whether to restart.
        """
        read = functools.partial(_read_from, nc, stream)
        await self._follow(read, [0, 0], stop=stop, on_rejected=on_rejected)

    async def _follow(
        self,
        read: Reading,
        counts: list[int],
        *,
        stop: asyncio.Event | None,
        on_rejected: Callable[[list[Rejected]], Awaitable[None]] | None,
    ) -> None:
        async with self._lock:
            try:
                await self._replay(read, counts, stop=stop, on_rejected=on_rejected, careful=False)
            except _Duplicate:
                # A repeated event id (which the event store is built never to write): start again from the
                # last commit, checking every id against the index from now on. A bulk load has no usable last
                # commit (job rows are written at the end), so it starts again from nothing.
                if self._bulk:
                    await self._empty()
                    counts[:] = [0, 0]
                await self._replay(read, counts, stop=stop, on_rejected=on_rejected, careful=True)

    async def _replay(
        self,
        read: Reading,
        counts: list[int],
        *,
        stop: asyncio.Event | None,
        on_rejected: Callable[[list[Rejected]], Awaitable[None]] | None,
        careful: bool,
    ) -> None:
        """Read from the position on, folding batches while earlier ones commit; count what committed.

        Up to `_IN_FLIGHT` commits queue behind one another (each waits for the one before it), so the folding
        only waits for the writing when the writing falls behind, not for every hand-over between threads.
        Waiting for the next batch also watches the oldest commit (a failed write is raised at once, not when
        the next event happens to arrive) and `stop` (which ends the wait at once). Following a live stream, a
        small batch is followed by a pause of `_LINGER_S`, so that the next events gather into one transaction.
        """
        reader = read(self._position + 1)
        stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
        following: asyncio.Future[list[Any]] | None = None
        # Commits in flight, oldest first, with the message and rejection counts they will account for.
        flight: collections.deque[tuple[asyncio.Future[None], int, int]] = collections.deque()

        async def settle() -> None:
            future, messages, rejected = flight[0]
            await future
            flight.popleft()
            counts[0] += messages
            counts[1] += rejected

        try:
            while stopping is None or not stopping.done():
                following = asyncio.ensure_future(anext(reader))
                while not following.done() and not (stopping is not None and stopping.done()):
                    waits = {following, *(f for f in (stopping, flight[0][0] if flight else None) if f is not None)}
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    while flight and flight[0][0].done():
                        await settle()
                if not following.done():  # stopped while waiting; `finally` cancels the read
                    break
                try:
                    batch = following.result()
                except StopAsyncIteration:
                    break
                prepared = await self._prepare(batch, careful=careful)
                if prepared is None:
                    continue
                # A batch prepared again (a repeated id made its commit fail) must not dead-letter twice.
                letters = [r for r in prepared.rejected if r.seq > self._lettered]
                if letters and on_rejected is not None:
                    await on_rejected(letters)
                    self._lettered = letters[-1].seq
                while len(flight) >= _IN_FLIGHT:
                    await settle()
                after = flight[-1][0] if flight else None
                self._committing = asyncio.ensure_future(self._commit(prepared, after=after))
                flight.append((self._committing, len(batch), len(prepared.rejected)))
                if stopping is not None and len(batch) < _LINGER_BELOW:
                    await asyncio.wait([stopping], timeout=_LINGER_S)
            while flight:
                await settle()
        except BaseException:
            if flight:
                # Let the writes in flight end before the connection is used again; their outcome no longer
                # matters, the cache is forgotten and the next attempt starts from whatever was committed.
                await asyncio.wait([future for future, _, _ in flight])
                for future, _, _ in flight:
                    if not future.cancelled():
                        future.exception()
            self._reset()
            raise
        finally:
            self._committing = None
            if stopping is not None:
                stopping.cancel()
            if following is not None and not following.done():
                following.cancel()  # the reader must not be mid-read when it is closed
                with contextlib.suppress(BaseException):
                    await following
            await reader.aclose()  # type: ignore[attr-defined]


def _read_from(nc: Any, stream: str, start_seq: int) -> AsyncIterator[list[StreamMessage]]:
    """Follow the stream from `start_seq` on, through the daemon's own connection."""
    return read_stream(nc, stream, start_seq=start_seq, follow=True, batch=READ_BATCH)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _take(items: Iterable[str], n: int) -> Iterator[str]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item
