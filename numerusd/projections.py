"""SQLite views projected from the event stream: jobs, tasks, an index of events, and what was rejected.

The stream is the truth; these tables are a cache of `domain.evolve` folded over it, kept so that `status`,
`events` and an operator's `sqlite3` queries need not replay anything. The projector follows the pattern of
pyeventsourcing's `SQLiteProcessRecorder`: each batch of stream messages changes the views *and* the stored
stream position in one SQLite transaction, so after a crash it resumes exactly where its last commit left off,
and a batch it has already applied is skipped. Dropping every table and replaying the stream (`rebuild`) gives
the same rows, byte for byte (`dump`).

An event that does not open (forged, bad signature, unknown key or type, malformed), that arrives on a subject
other than its own, that repeats an event id already applied, or that `evolve` refuses, is not folded: it is
recorded in `rejected` and returned to the caller, who sends it to `numerus.dlq.projector.<reason>`.

Tables (times are UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so they sort as text):

    jobs      id PK, goal, repo, agent, status, reason, created, updated, events, state (JobState as JSON)
    tasks     (job, id) PK, ord, title, agent, role, status, attempt, pid, exit_code, reason, thread_id,
              input_tokens, cached_input_tokens, output_tokens, log_path, started, ended
    events    seq PK, id UNIQUE, job, task, type, time, subject       -- by (job, seq), (type, seq), (time)
    rejected  seq PK, subject, reason, message
    position  one row: seq, the last stream sequence applied

How it goes fast (`numerusd rebuild` replays the whole stream; see docs/projections.md for figures): a
rebuild's stream is read by a child process (`numerusd.stream_pump`; by this one while the child starts), so
reading and folding use two cores; each message is decoded and verified once; while the cache holds every job
it is folded at once and dropped; the rows of a batch go to SQLite in multi-row VALUES statements of up to 256
rows, in one call to aiosqlite's thread, up to three batches queued behind one another while the next ones are
folded, so the folding waits for SQLite only when it is three commits ahead. A bulk load (a rebuild into a
fresh file) also skips fsync, keeps its rollback journal in memory rather than writing every page twice through
the WAL, writes each job's rows once, when the job ends, builds the secondary indexes once its rows are in, and
pauses the cyclic garbage collector.

The file's `user_version` fingerprints the tables and the shape of JobState: after an upgrade that changes
either, the views are dropped and rebuilt from the stream on open.

sqlite3 errors are translated into `StoreError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from numerusd.config import NatsAddress
from numerusd.domain import JobState, evolve_untyped, job_view
from numerusd.errors import StoreError
from numerusd.protocol.commands import JOB_DONE, JobView
from numerusd.protocol.envelope import InvalidEvent, WireEnvelope, open_untyped
from numerusd.stream_pump import head_started_stream
from numerusd.stream_reader import StreamMessage, read_stream

log = logging.getLogger(__name__)

#: Bumped whenever a table changes shape.
SCHEMA_VERSION = 1


def _file_version() -> int:
    """The `user_version` a file must carry: a fingerprint of the tables' layout and of JobState's shape.

    `jobs.state` holds JobState as JSON; a file written under another layout or shape is dropped and rebuilt
    on open, so a new field in the domain never meets states cached without it.
    """
    shape = msgspec.json.encode(msgspec.json.schema(JobState))
    return zlib.crc32(b"%d:%s" % (SCHEMA_VERSION, shape)) & 0x7FFFFFFF or 1  # 0 marks an unfinished bulk load


FILE_VERSION = _file_version()

#: The stream the views are projected from.
STREAM = "NUMERUS_EVENTS"

#: Jobs whose state is kept in memory between batches; others are read back from `jobs.state` when needed.
CACHE_JOBS = 10_000

#: One stream message as the projector takes it: (stream sequence, subject, wire bytes, anything else). The
#: stream reader's StreamMessage is one; `apply` takes them as they come rather than copying them into tuples.
Message = tuple[int, str, bytes] | tuple[int, str, bytes, int]

#: How a replay reads the stream: batches of messages from a stream sequence on, until caught up.
Reading = Callable[[int], AsyncIterator[Sequence[Message]]]

_TABLES = ("jobs", "tasks", "events", "rejected", "position")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, goal TEXT NOT NULL, repo TEXT NOT NULL, agent TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, created TEXT NOT NULL, updated TEXT NOT NULL, events INTEGER NOT NULL, state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    job TEXT NOT NULL, id TEXT NOT NULL, ord INTEGER NOT NULL, title TEXT NOT NULL, agent TEXT NOT NULL,
    role TEXT NOT NULL, status TEXT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER, exit_code INTEGER,
    reason TEXT, thread_id TEXT, input_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, log_path TEXT, started TEXT, ended TEXT,
    PRIMARY KEY (job, id)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, job TEXT NOT NULL, task TEXT, type TEXT NOT NULL,
    time TEXT NOT NULL, subject TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY, subject TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS position (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1), seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO position (singleton, seq) VALUES (1, 0);
"""

_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS events_job ON events (job, seq);
CREATE INDEX IF NOT EXISTS events_type ON events (type, seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
"""


class _Insert:
    """An INSERT of many rows per statement: `statements(rows)` gives each statement and its parameter lists.

    Rows go to SQLite in multi-row `VALUES` statements of `largest` rows, the rest in pieces of power-of-two
    sizes, so a few statement shapes (which stay in sqlite3's statement cache) serve every batch, and a one-event
    live batch is one one-row statement. Against one-row executemany this halves SQLite's CPU per row. Larger
    statements cost more CPU per row, and the `SELECT * FROM (VALUES …)` form that pads the last one with NULL
    rows (used before) cost SQLite 0.6 s more per 100k events. Each statement hands the GIL to and fro once
    (about 25 per 5,000-event batch); in alternating 100k rebuilds that was no slower than 1,024 or 4,096 rows.
    """

    def __init__(self, table: str, columns: str, conflict: str = "", largest: int = 256) -> None:
        self.table, self.columns, self.conflict = table, columns, conflict
        self.width = len(columns.split(","))
        self.largest = largest
        self._sql: dict[int, str] = {}

    def fitted(self, max_params: int) -> _Insert:
        """This insert with statements small enough for SQLite's limit on parameters per statement."""
        largest = 1
        while largest * 2 <= min(self.largest, max_params // self.width):
            largest *= 2
        return _Insert(self.table, self.columns, self.conflict, largest)

    def statements(self, rows: Sequence[tuple[Any, ...]]) -> Iterator[tuple[str, list[list[Any]]]]:
        """(statement, parameter lists): the rows, flattened, a statement's worth per list."""
        at, size = 0, self.largest
        while at < len(rows):
            count = (len(rows) - at) // size
            if count:
                end = at + count * size
                params = [[value for row in rows[i : i + size] for value in row] for i in range(at, end, size)]
                yield self._statement(size), params
                at = end
            size //= 2

    def _statement(self, size: int) -> str:
        sql = self._sql.get(size)
        if sql is None:
            row = f"({', '.join('?' * self.width)})"
            values = ", ".join([row] * size)
            sql = self._sql[size] = f"INSERT INTO {self.table} ({self.columns}) VALUES {values} {self.conflict}"
        return sql


_INSERTS = (
    _Insert(
        "jobs",
        "id, goal, repo, agent, status, reason, created, updated, events, state",
        "ON CONFLICT (id) DO UPDATE SET goal = excluded.goal, repo = excluded.repo, agent = excluded.agent, "
        "status = excluded.status, reason = excluded.reason, created = excluded.created, "
        "updated = excluded.updated, events = excluded.events, state = excluded.state",
    ),
    _Insert(
        "tasks",
        "job, id, ord, title, agent, role, status, attempt, pid, exit_code, reason, thread_id, input_tokens, "
        "cached_input_tokens, output_tokens, log_path, started, ended",
        "ON CONFLICT (job, id) DO UPDATE SET ord = excluded.ord, title = excluded.title, agent = excluded.agent, "
        "role = excluded.role, status = excluded.status, attempt = excluded.attempt, pid = excluded.pid, "
        "exit_code = excluded.exit_code, reason = excluded.reason, thread_id = excluded.thread_id, "
        "input_tokens = excluded.input_tokens, cached_input_tokens = excluded.cached_input_tokens, "
        "output_tokens = excluded.output_tokens, log_path = excluded.log_path, started = excluded.started, "
        "ended = excluded.ended",
    ),
    _Insert("events", "seq, id, job, task, type, time, subject"),
    _Insert(
        "rejected",
        "seq, subject, reason, message",
        "ON CONFLICT (seq) DO UPDATE SET subject = excluded.subject, reason = excluded.reason, "
        "message = excluded.message",
    ),
)
_SET_POSITION = "UPDATE position SET seq = ? WHERE singleton = 1"

#: Every view's rows in a stable order: what `dump` returns and what a rebuild must reproduce.
_DUMP_QUERIES = {
    "jobs": "SELECT * FROM jobs ORDER BY id",
    "tasks": "SELECT * FROM tasks ORDER BY job, id",
    "events": "SELECT * FROM events ORDER BY seq",
    "rejected": "SELECT * FROM rejected ORDER BY seq",
    "position": "SELECT seq FROM position",
}

# Messages asked of the stream per pull request when replaying: bigger batches, fewer commits.
_READ_BATCH = 5_000

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

_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(JobState)
_time_encoder = msgspec.json.Encoder()


class Rejected(msgspec.Struct, frozen=True):
    """A message that was not folded into the views, with a short `reason` code and the bytes as received."""

    seq: int
    subject: str
    reason: str
    message: str
    wire: bytes


class _Prepared(NamedTuple):
    """A batch folded in memory, ready to be committed."""

    last_seq: int
    work: dict[str, JobState]  # the jobs the batch changed, as it leaves them
    before: dict[str, JobState | None]  # the same jobs before the batch
    flush: dict[str, JobState]  # bulk loads: jobs leaving the cache, whose rows must be written now
    event_rows: list[tuple[Any, ...]]
    rejected: list[Rejected]
    careful: bool


class _Duplicate(Exception):
    """The batch repeats an event id already in the index: it must be prepared again, checking every id."""


class RebuildReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay of the stream did: messages read, events applied, messages rejected, in how long."""

    messages: int
    applied: int
    rejected: int
    jobs: int
    tasks: int
    last_seq: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Messages replayed per second of wall time."""
        return self.messages / self.seconds if self.seconds else 0.0


def dlq_subject(reason: str) -> str:
    """`numerus.dlq.projector.<reason>`: where a rejected message is dead-lettered."""
    return f"numerus.dlq.projector.{reason}"


def utc_text(moment: datetime | None) -> str | None:
    """A time as fixed-width UTC text (`2024-05-01T12:00:00.000000Z`), so text order is time order."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        # Naive times are read as UTC: the daemon writes only aware ones, this keeps old or foreign ones usable.
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    # msgspec's encoder is ~10x faster than isoformat(); it omits the fraction when it is zero.
    text = _time_encoder.encode(moment)
    if len(text) == 22:
        return text[1:-2].decode() + ".000000Z"
    return text[1:-1].decode()


@contextlib.contextmanager
def _translated(doing: str, path: Path) -> Iterator[None]:
    """Turn a sqlite3 error into StoreError, naming the file and what was being done."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"projection database {path}: {doing} failed: {e}", path=str(path), doing=doing) from e


class Projector:
    """Keeps the SQLite views of one database file up to date with the event stream.

    Use as `async with Projector(path, keys) as projector:`; then `apply` batches, or `run` to follow the
    stream. One projector per file: batches are applied one at a time, in stream order.
    """

    def __init__(self, path: str | Path, keys: dict[str, bytes], *, cache_jobs: int = CACHE_JOBS) -> None:
        self.path = Path(path)
        self._keys = keys
        self._cache_jobs = cache_jobs
        self._db: aiosqlite.Connection | None = None
        self._position = 0
        self._head = 0  # the last seq folded into the cache: ahead of `_position` while a commit is in flight
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
        self._inserts = tuple(insert.fitted(999) for insert in _INSERTS)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def open(self, *, bulk: bool = False) -> Projector:
        """Open (creating if needed) the database.

        `bulk` starts an empty file for a rebuild and trades durability for speed: no fsync, and job and task
        rows written once, when the job ends, leaves the cache or at `finish()`, rather than after every batch.
        Until `finish()` the file is stamped incomplete (user_version 0), so a file left by an interrupted bulk
        load is dropped and rebuilt on its next open, never read as if it were whole. Feed a bulk load through
        `catch_up` or `catch_up_from` (as `rebuild` does): it alone can start over when the stream repeats an event.
        """
        with _translated("open", self.path):
            self._db = await aiosqlite.connect(self.path)
            try:
                await self._setup(bulk)
            except BaseException:
                db, self._db = self._db, None
                await db.close()  # or its thread outlives us
                raise
        return self

    async def _setup(self, bulk: bool) -> None:
        db = self.db
        # NORMAL in WAL mode may lose the last commits on power loss but never corrupts; the views and
        # their position are lost together and are replayed from the stream. A bulk rebuild writes a
        # scratch file that is thrown away if anything goes wrong, so it need not sync at all, nor write
        # every page twice (to the WAL, then to the file): its rollback journal is kept in memory, and the
        # file turns to WAL when it is finished.
        await db.execute(f"PRAGMA journal_mode = {'MEMORY' if bulk else 'WAL'}")
        await db.execute(f"PRAGMA synchronous = {'OFF' if bulk else 'NORMAL'}")
        # A bulk rebuild gets a 64 MiB page cache; the live daemon 8 MiB, so it stays small once idle.
        await db.execute(f"PRAGMA cache_size = {-65536 if bulk else -8192}")
        await db.execute("PRAGMA temp_store = MEMORY")
        # SQLite allows 32766 parameters per statement since 3.32, 999 before.
        sqlite = tuple(int(part) for part in (await _fetchone(db, "SELECT sqlite_version()"))[0].split("."))
        self._inserts = tuple(insert.fitted(32766 if sqlite >= (3, 32) else 999) for insert in _INSERTS)
        version = (await _fetchone(db, "PRAGMA user_version"))[0]
        if bulk or version != FILE_VERSION:
            if not bulk and await _fetchone(db, "SELECT 1 FROM sqlite_master LIMIT 1"):
                log.warning(
                    "projection database %s has version %s (0: left by an interrupted rebuild), this numerusd "
                    "writes %s (tables and job state): dropping the views, they will be rebuilt from the stream",
                    self.path,
                    version,
                    FILE_VERSION,
                )
            await self._drop_tables()
        self._bulk = bulk
        await self._create()
        self._position = self._head = (await _fetchone(db, "SELECT seq FROM position"))[0]
        self._complete = (await _fetchone(db, "SELECT count(*) FROM jobs"))[0] == 0

    async def finish(self) -> None:
        """End a bulk load: write the rows still held in memory, stamp the file complete."""
        if not self._bulk:
            return
        async with self._lock:
            dirty = {job: self._cache[job] for job in self._dirty}
            with _translated("finish the rebuild", self.path):
                await self._write(_Prepared(self._position, {}, {}, dirty, [], [], False))
                await self.db.executescript(_INDEXES)
                await self.db.execute(f"PRAGMA user_version = {FILE_VERSION}")
                await self.db.execute("PRAGMA journal_mode = WAL")
                await self.db.execute("PRAGMA synchronous = NORMAL")
            self._dirty.clear()
            self._bulk = False

    async def close(self) -> None:
        """Close the file (a bulk load not `finish()`ed stays marked incomplete)."""
        db, self._db = self._db, None
        if db is None:
            return
        with _translated("close", self.path):
            try:
                await db.execute("PRAGMA optimize")
            finally:
                await db.close()

    async def __aenter__(self) -> Projector:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        """The open connection (for the read queries below)."""
        if self._db is None:
            raise StoreError(f"projection database {self.path} is not open", path=str(self.path))
        return self._db

    async def _create(self) -> None:
        await self.db.executescript(_SCHEMA if self._bulk else _SCHEMA + _INDEXES)
        await self.db.execute(f"PRAGMA user_version = {0 if self._bulk else FILE_VERSION}")

    async def _drop_tables(self) -> None:
        for table in _TABLES:
            await self.db.execute(f"DROP TABLE IF EXISTS {table}")

    async def drop(self) -> None:
        """Empty every view and set the position back to 0, so that the next batch starts a full replay."""
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        with _translated("drop the views", self.path):
            await self._drop_tables()
            await self._create()
            await self.db.execute("VACUUM")
        self._position = self._head = 0
        self._cache.clear()
        self._dirty.clear()
        self._complete = True
        self._stale = False

    # --- applying events -------------------------------------------------------------------------------------

    def position(self) -> int:
        """The stream sequence of the last message applied and committed (0 before the first)."""
        return self._position

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
            with _translated("read the position", self.path):
                self._position = self._head = (await _fetchone(self.db, "SELECT seq FROM position"))[0]
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
        fold = functools.partial(self._fold, cache=self._cache, before=before, work=work, rows=event_rows)
        known: set[str] = set()
        if self._complete and not careful:
            # Every job is in the cache (a replay into a fresh file): each event is folded as soon as it is
            # opened, and dropped, instead of a batch of them being held (and scanned by the GC) in between.
            for start in range(0, len(batch), _SLICE):
                fold(self._open(batch[start : start + _SLICE], rejected), known=known, rejected=rejected)
                await asyncio.sleep(0)
        else:
            opened = []
            for start in range(0, len(batch), _SLICE):
                opened.extend(self._open(batch[start : start + _SLICE], rejected))
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
        return _Prepared(batch[-1][0], work, before, flush, event_rows, rejected, careful)

    def _open(
        self, batch: Sequence[Message], rejected: list[Rejected]
    ) -> Iterator[tuple[int, str, bytes, WireEnvelope]]:
        """Decode and verify each message once, its payload left for `_fold` to type (the views need the payloads
        of a few events only); an event that does not open is rejected, not folded."""
        keys = self._keys
        for message in batch:
            seq, subject, wire = message[0], message[1], message[2]  # a Message, or the reader's StreamMessage
            try:
                event = open_untyped(wire, keys)
            except InvalidEvent as e:
                rejected.append(Rejected(seq, subject, e.reason, str(e), wire))
                continue
            # The subject is not signed: a valid event republished elsewhere would mislead subscribers.
            own = event.subject
            if own != subject:
                rejected.append(Rejected(seq, subject, "wrong_subject", f"event {event.id} belongs on {own}", wire))
                continue
            yield seq, subject, wire, event

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
        with _translated("read job states", self.path):
            for chunk in _chunks(missing, _IN_CHUNK):
                query = f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
                for job, state in await self.db.execute_fetchall(query, chunk):
                    loaded[job] = _state_decoder.decode(state)
        return loaded

    async def _known_ids(self, ids: list[str]) -> set[str]:
        """Which of these event ids were applied before: a republished event must not be counted twice."""
        known: set[str] = set()
        await self._settled()
        with _translated("look up event ids", self.path):
            for chunk in _chunks(ids, _IN_CHUNK):
                query = f"SELECT id FROM events WHERE id IN ({','.join('?' * len(chunk))})"
                known.update(row[0] for row in await self.db.execute_fetchall(query, chunk))
        return known

    async def _settled(self) -> None:
        """Wait for the commits in flight, if any: what the next batch reads back must include their rows."""
        if self._committing is not None and not self._committing.done():
            await asyncio.wait([self._committing])  # the last waits for the others; outcomes are `_replay`'s

    @staticmethod
    def _fold(
        opened: Iterable[tuple[int, str, bytes, WireEnvelope]],
        *,
        cache: dict[str, JobState],
        before: dict[str, JobState | None],
        known: set[str],
        work: dict[str, JobState],
        rows: list[tuple[Any, ...]],
        rejected: list[Rejected],
    ) -> None:
        """Evolve each job through its events into `work`, noting in `before` how it was; append index rows.

        A job's state comes from `work` (changed earlier in the batch), else `before` (read from the file),
        else the cache (None: a new job).
        """
        for seq, subject, wire, event in opened:
            job = event.job
            id = event.id
            if id in known:
                message = f"event {id} was applied before"
                rejected.append(Rejected(seq, subject, "duplicate", message, wire))
                continue
            state = work.get(job)
            if state is None:
                state = before[job] if job in before else before.setdefault(job, cache.get(job))
            try:
                work[job] = evolve_untyped(state, event)
            except InvalidEvent as e:
                rejected.append(Rejected(seq, subject, e.reason, str(e), wire))
                continue
            except ValueError as e:
                rejected.append(Rejected(seq, subject, "refused", str(e), wire))
                continue
            except Exception as e:  # a domain bug must not wedge the projector on one poison event
                log.exception("evolve failed on event %s (seq %d)", id, seq)
                rejected.append(Rejected(seq, subject, "evolve_error", f"{type(e).__name__}: {e}", wire))
                continue
            known.add(id)  # a repeat later in the same batch
            rows.append((seq, id, job, event.task, event.type, utc_text(event.time), subject))

    async def _commit(self, prepared: _Prepared, after: asyncio.Future[None] | None = None) -> None:
        """Write a prepared batch's rows and its position in one transaction: both or neither.

        `after` is the commit of the batch before, still in flight: this one waits for it, and fails with it.
        """
        try:
            if after is not None:
                await after
            with _translated("apply a batch", self.path):
                try:
                    await self._write(prepared)
                except sqlite3.IntegrityError as e:
                    if prepared.careful:
                        raise
                    raise _Duplicate from e
        except BaseException:
            # Nothing of this batch may stay behind: roll back (after the statement in flight, if we were
            # cancelled), forget the cache, and read the position back from the file before the next batch.
            self._reset()
            with contextlib.suppress(sqlite3.Error, ValueError):
                await asyncio.shield(self.db.rollback())
            raise
        self._position = prepared.last_seq

    async def _write(self, prepared: _Prepared) -> None:
        if self._bulk:
            # Rows of the jobs leaving the cache, whole; the others are written by `finish()`.
            jobs = prepared.flush
            tasks = [row for state in jobs.values() for row in _changed_task_rows(state, None)]
        else:
            jobs, before = prepared.work, prepared.before
            tasks = [row for job, state in jobs.items() for row in _changed_task_rows(state, before[job])]
        job_rows = [_job_row(state) for state in jobs.values()]
        rejected = [(r.seq, r.subject, r.reason, r.message) for r in prepared.rejected]
        tables = (job_rows, tasks, prepared.event_rows, rejected)
        statements = [
            pair for insert, rows in zip(self._inserts, tables, strict=True) for pair in insert.statements(rows)
        ]
        await _in_db_thread(self.db, _write_batch, statements, prepared.last_seq)

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

    async def catch_up(self, nc: Any, stream: str = STREAM) -> RebuildReport:
        """Apply every message after the stored position up to the stream's end; report what was done."""
        return await self.catch_up_from(functools.partial(_read_from, nc, stream, follow=False))

    async def catch_up_from(self, read: Reading) -> RebuildReport:
        """`catch_up`, reading the stream with `read` (`rebuild` reads it in a child process).

        Batch n+1 is read and folded while batch n is being written (the write runs in aiosqlite's thread with
        the GIL released).
        """
        started = time.perf_counter()
        counts = [0, 0]
        await self._follow(read, counts, stop=None, on_rejected=None)
        messages, rejected = counts
        return await self._report(messages, messages - rejected, rejected, time.perf_counter() - started)

    async def drop_and_rebuild(self, nc: Any, stream: str = STREAM) -> RebuildReport:
        """Empty the views and replay the whole stream into them."""
        await self.drop()
        return await self.catch_up(nc, stream)

    async def run(
        self,
        nc: Any,
        stop: asyncio.Event,
        *,
        stream: str = STREAM,
        on_rejected: Callable[[list[Rejected]], Awaitable[None]] | None = None,
    ) -> None:
        """Follow the stream from the stored position until `stop` is set, applying batches as they come.

        Rejected messages go to `on_rejected` (by default published to `numerus.dlq.projector.<reason>`)
        before their batch commits: a crash in between repeats a dead letter rather than losing it. A failure
        to write the views is raised (StoreError); the caller decides whether to restart.
        """
        read = functools.partial(_read_from, nc, stream, follow=True)
        await self._follow(read, [0, 0], stop=stop, on_rejected=on_rejected or _dead_letter(nc))

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
                    await self._drop()
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

    async def _report(self, messages: int, applied: int, rejected: int, seconds: float) -> RebuildReport:
        counts = await self.db.execute_fetchall("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM tasks)")
        jobs, tasks = next(iter(counts))
        return RebuildReport(
            messages=messages,
            applied=applied,
            rejected=rejected,
            jobs=jobs,
            tasks=tasks,
            last_seq=self._position,
            seconds=seconds,
        )

    # --- queries ----------------------------------------------------------------------------------------------

    async def events_index(
        self, job: str | None = None, type: str | None = None, after_seq: int = 0, limit: int = 500
    ) -> list[tuple[int, str]]:
        """(seq, subject) of the events of `job` (every job when None), of `type` if given, after `after_seq`."""
        where, params = ["seq > ?"], [after_seq]
        if job is not None:
            where.append("job = ?")
            params.append(job)
        if type is not None:
            where.append("type = ?")
            params.append(type)
        query = f"SELECT seq, subject FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        with _translated("read the event index", self.path):
            rows = await self.db.execute_fetchall(query, [*params, limit])
        return [(seq, subject) for seq, subject in rows]

    async def job_rows(self, job: str | None = None) -> list[JobView]:
        """What `status` shows: one job, or every job newest first, each with its tasks, made from the stored
        state by the same `domain.job_view` the daemon answers with (the jobs and tasks tables are its columns)."""
        with _translated("read jobs", self.path):
            if job is None:
                rows = await self.db.execute_fetchall("SELECT state FROM jobs ORDER BY created DESC, id DESC")
            else:
                rows = await self.db.execute_fetchall("SELECT state FROM jobs WHERE id = ?", (job,))
        return [job_view(_state_decoder.decode(state)) for (state,) in rows]

    async def job_state(self, job: str) -> JobState | None:
        """The domain state of one job as of the stored position (None if the views do not know it)."""
        if job in self._cache:
            return self._cache[job]
        with _translated("read a job state", self.path):
            rows = list(await self.db.execute_fetchall("SELECT state FROM jobs WHERE id = ?", (job,)))
        return _state_decoder.decode(rows[0][0]) if rows else None

    async def rejections(self, after_seq: int = 0, limit: int = 500) -> list[tuple[int, str, str, str]]:
        """(seq, subject, reason, message) of rejected messages after `after_seq`."""
        with _translated("read rejections", self.path):
            rows = await self.db.execute_fetchall(
                "SELECT seq, subject, reason, message FROM rejected WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
        return [tuple(row) for row in rows]  # type: ignore[misc]

    async def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every view's rows in a stable order (see the module function `dump`)."""
        with _translated("dump the views", self.path):
            return {
                name: [tuple(row) for row in await self.db.execute_fetchall(q)] for name, q in _DUMP_QUERIES.items()
            }


async def dump(db: str | Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every view's rows in a stable order, by table name: two databases hold the same views iff equal."""
    path = Path(db)
    if not path.exists():
        raise StoreError(f"projection database {path} does not exist", path=str(path))
    with _translated("dump the views", path):
        async with aiosqlite.connect(path) as conn:
            return {name: [tuple(row) for row in await conn.execute_fetchall(q)] for name, q in _DUMP_QUERIES.items()}


async def rebuild(
    address: NatsAddress, keys: dict[str, bytes], db_path: str | Path, *, stream: str = STREAM
) -> RebuildReport:
    """Replay the whole stream into a fresh file beside `db_path`, then swap it in.

    The stream is read by a child process (`numerusd.stream_pump`; by this one while the child starts),
    connected to the server at `address`, so that its reading and this process's verifying, folding and
    writing run on two cores. Until the swap the old views stay as they were, so an interrupted rebuild changes
    nothing. Run it with the daemon stopped: the daemon keeps the file open.
    """
    path = Path(db_path)
    scratch = path.with_name(path.name + ".rebuild")
    _remove_database(scratch)
    projector = Projector(scratch, keys)
    await projector.open(bulk=True)
    try:
        started = time.perf_counter()

        def read(start: int) -> AsyncIterator[list[StreamMessage]]:
            return head_started_stream(address, stream, start_seq=start, batch=_READ_BATCH)

        with _collector_paused():
            replayed = await projector.catch_up_from(read)
            await projector.finish()
        # Counted again now that the rows held back by the bulk load are written, and timed with the indexing.
        report = await projector._report(
            replayed.messages, replayed.applied, replayed.rejected, time.perf_counter() - started
        )
    except BaseException:
        await projector.close()
        _remove_database(scratch)
        raise
    await projector.close()
    try:
        _remove_database(path, keep_main=True)
        os.replace(scratch, path)
    except OSError as e:
        raise StoreError(f"cannot swap the rebuilt views into {path}: {e}", path=str(path)) from e
    return report


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for a bulk load, which allocates millions of short-lived objects and
    makes no reference cycles worth finding. The collector's passes over the job cache cost 8% of a rebuild;
    what has no cycle is freed by reference counting as before."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _remove_database(path: Path, *, keep_main: bool = False) -> None:
    """Remove a database file and its WAL and shared-memory files."""
    for suffix in ("-wal", "-shm") if keep_main else ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _read_from(nc: Any, stream: str, start_seq: int, *, follow: bool) -> AsyncIterator[list[StreamMessage]]:
    return read_stream(nc, stream, start_seq=start_seq, follow=follow, batch=_READ_BATCH)


def _dead_letter(nc: Any) -> Callable[[list[Rejected]], Awaitable[None]]:
    async def send(rejected: list[Rejected]) -> None:
        for r in rejected:
            headers = {"Numerus-Seq": str(r.seq), "Numerus-Subject": r.subject, "Numerus-Reason": r.reason}
            await nc.publish(dlq_subject(r.reason), r.wire, headers=headers)

    return send


# --- rows ---------------------------------------------------------------------------------------------------


def _write_batch(db: sqlite3.Connection, statements: list[tuple[str, list[list[Any]]]], last_seq: int) -> None:
    """In the database's thread: a batch's rows and its position, in one transaction."""
    # The sqlite3 module opens the transaction itself before the first insert (legacy transaction control).
    for statement, params in statements:
        db.executemany(statement, params)
    db.execute(_SET_POSITION, (last_seq,))
    db.commit()


async def _in_db_thread(db: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(connection, *args)` in aiosqlite's thread, as one call.

    A batch written as one awaited `executemany` after another crossed between threads three or four times per
    statement, and each time the database thread waited for the GIL while the folding held it (up to the 5 ms
    switch interval): in a 100k-event rebuild the folding then waited for the writing 0.7 s out of 4. aiosqlite
    has no public way to run a function in its thread; `_execute` is what each of its own methods calls.
    """
    return await db._execute(lambda: fn(db._conn, *args))


def _job_row(state: JobState) -> tuple[Any, ...]:
    return (
        state.id,
        state.goal,
        state.repo,
        state.agent,
        state.status,
        state.reason,
        utc_text(state.created),
        utc_text(state.updated),
        state.events,
        _state_encoder.encode(state).decode(),
    )


def _changed_task_rows(state: JobState, before: JobState | None) -> Iterator[tuple[Any, ...]]:
    """Rows of the tasks `evolve` replaced since `before`: it shares unchanged TaskState objects, so `is` tells."""
    old = before.tasks if before is not None else {}
    for ord, (task_id, task) in enumerate(state.tasks.items()):
        if old.get(task_id) is task:
            continue
        yield (
            state.id,
            task_id,
            ord,
            task.title,
            task.agent,
            task.role,
            task.status,
            task.attempt,
            task.pid,
            task.exit_code,
            task.reason,
            task.thread_id,
            task.input_tokens,
            task.cached_input_tokens,
            task.output_tokens,
            task.log_path,
            utc_text(task.started),
            utc_text(task.ended),
        )


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _take(items: Iterable[str], n: int) -> Iterator[str]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


async def _fetchone(db: aiosqlite.Connection, query: str) -> Any:
    rows = list(await db.execute_fetchall(query))
    return rows[0] if rows else None
