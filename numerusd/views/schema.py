"""The views' tables, and the layout version that makes an upgrade drop and rebuild them.

Tables (times are UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so they sort as text):

    jobs      id PK, goal, repo, agent, status, reason, created, updated, events, state (JobState as JSON)
    tasks     (job, id) PK, ord, title, agent, role, status, attempt, pid, exit_code, reason, thread_id,
              input_tokens, cached_input_tokens, output_tokens, log_path, started, ended
    events    seq PK, id UNIQUE, job, task, type, time, subject       -- by (job, seq), (type, seq), (time)
    rejected  seq PK, subject, reason, message
    position  one row: seq, the last stream sequence applied; epoch, the highest writer epoch seen up to it

The file's `user_version` fingerprints the tables and the shape of JobState: after an upgrade that changes either,
the views are dropped on open and rebuilt from the stream. A bulk load stamps the file 0 until it is finished, so a
file left by an interrupted rebuild is never read as whole. The functions here take a plain `sqlite3.Connection`
and run in the database's thread (`views.database`).
"""

from __future__ import annotations

import logging
import sqlite3
import zlib
from pathlib import Path
from typing import NamedTuple

import msgspec

from numerusd.domain import JobState

log = logging.getLogger(__name__)

#: Bumped whenever a table changes shape.
SCHEMA_VERSION = 2


def _file_version() -> int:
    """The `user_version` a file must carry: a fingerprint of the tables' layout and of JobState's shape.

    `jobs.state` holds JobState as JSON; a file written under another layout or shape is dropped and rebuilt
    on open, so a new field in the domain never meets states cached without it.
    """
    shape = msgspec.json.encode(msgspec.json.schema(JobState))
    return zlib.crc32(b"%d:%s" % (SCHEMA_VERSION, shape)) & 0x7FFFFFFF or 1  # 0 marks an unfinished bulk load


FILE_VERSION = _file_version()

TABLES = ("jobs", "tasks", "events", "rejected", "position")

_TABLES_DDL = """
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
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1), seq INTEGER NOT NULL, epoch INTEGER NOT NULL
);
INSERT OR IGNORE INTO position (singleton, seq, epoch) VALUES (1, 0, 0);
"""

# Secondary indexes: a bulk load builds them once its rows are in, rather than keeping them up row by row.
_INDEXES_DDL = """
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS events_job ON events (job, seq);
CREATE INDEX IF NOT EXISTS events_type ON events (type, seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
"""

SET_POSITION = "UPDATE position SET seq = ?, epoch = ? WHERE singleton = 1"


class FileInfo(NamedTuple):
    """What `open_views` found: the stored position and the highest writer epoch seen up to it, whether the jobs
    table is empty, SQLite's parameter limit."""

    position: int
    epoch: int
    empty: bool
    max_params: int


def open_views(conn: sqlite3.Connection, path: Path, *, bulk: bool) -> FileInfo:
    """Set the connection up and make sure the file holds this version's tables (dropping any others).

    `bulk` starts an empty file for a rebuild and trades durability for speed. NORMAL in WAL mode may lose the
    last commits on power loss but never corrupts; the views and their position are lost together and are
    replayed from the stream. A bulk rebuild writes a scratch file that is thrown away if anything goes wrong,
    so it need not sync at all, nor write every page twice (to the WAL, then to the file): its rollback journal
    is kept in memory, and the file turns to WAL when it is finished (`finish_bulk`).
    """
    conn.execute(f"PRAGMA journal_mode = {'MEMORY' if bulk else 'WAL'}")
    conn.execute(f"PRAGMA synchronous = {'OFF' if bulk else 'NORMAL'}")
    # A bulk rebuild gets a 64 MiB page cache; the live daemon 8 MiB, so it stays small once idle.
    conn.execute(f"PRAGMA cache_size = {-65536 if bulk else -8192}")
    conn.execute("PRAGMA temp_store = MEMORY")
    # SQLite allows 32766 parameters per statement since 3.32, 999 before.
    max_params = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if bulk or version != FILE_VERSION:
        if not bulk and conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            log.warning(
                "projection database %s has version %s (0: left by an interrupted rebuild), this numerusd "
                "writes %s (tables and job state): dropping the views, they will be rebuilt from the stream",
                path,
                version,
                FILE_VERSION,
            )
        _drop_tables(conn)
    _create(conn, bulk=bulk)
    position, epoch = conn.execute("SELECT seq, epoch FROM position").fetchone()
    empty = conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    return FileInfo(position, epoch, empty, max_params)


def empty_views(conn: sqlite3.Connection, *, bulk: bool) -> None:
    """Drop every row, the position back to 0: a bulk load that must start again from nothing."""
    _drop_tables(conn)
    _create(conn, bulk=bulk)
    conn.execute("VACUUM")


def finish_bulk(conn: sqlite3.Connection) -> None:
    """After a bulk load's rows: build the secondary indexes, stamp the file whole, turn it to WAL with syncs."""
    conn.executescript(_INDEXES_DDL)
    conn.execute(f"PRAGMA user_version = {FILE_VERSION}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")


def _create(conn: sqlite3.Connection, *, bulk: bool) -> None:
    conn.executescript(_TABLES_DDL if bulk else _TABLES_DDL + _INDEXES_DDL)
    conn.execute(f"PRAGMA user_version = {0 if bulk else FILE_VERSION}")


def _drop_tables(conn: sqlite3.Connection) -> None:
    for table in TABLES:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
