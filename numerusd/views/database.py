"""The views' SQLite file, reached from asyncio through one thread that owns a plain `sqlite3` connection.

Every call into SQLite is a function run in that thread: `run(fn, *args)` calls `fn(connection, *args)` there and
returns its result. The projector writes a batch's statements, its position and its commit as one such call: awaited
one statement at a time (as aiosqlite's methods go, each its own trip to its thread), each statement crossed
between threads three or four times, and each time the database thread waited for the GIL while the folding held
it (up to the 5 ms switch interval); in a 100k-event rebuild the folding then waited for the writing 0.7 s out of
4. aiosqlite has no public way to run a function in its thread, so the thread is ours: a `ThreadPoolExecutor` of
one worker, which also keeps the calls in the order they were made (a rollback queued after a write runs after it).

sqlite3 errors are translated into `StoreError` here (`translated`) and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from numerusd.errors import StoreError

P = ParamSpec("P")
T = TypeVar("T")


@contextlib.contextmanager
def translated(doing: str, path: Path) -> Iterator[None]:
    """Turn a sqlite3 error into StoreError, naming the file and what was being done."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"projection database {path}: {doing} failed: {e}", path=str(path), doing=doing) from e


class ViewsDatabase:
    """One SQLite file and the thread its connection lives in; `await ViewsDatabase.open(path)`, then `run`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="views-db")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> ViewsDatabase:
        """Connect to the file (creating it if needed), in the database's thread."""
        database = cls(path)
        try:
            with translated("open", path):
                database._conn = await database._call(sqlite3.connect, path)
        except BaseException:
            database._thread.shutdown(wait=False)
            raise
        return database

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(connection, *args, **kwargs)`, run in the database's thread after every call made before it."""
        if self._conn is None:
            raise StoreError(f"projection database {self.path} is not open", path=str(self.path))
        return await self._call(fn, self._conn, *args, **kwargs)

    async def fetchall(self, query: str, params: Any = ()) -> list[Any]:
        """The rows of one query."""
        return await self.run(_fetchall, query, params)

    async def close(self) -> None:
        """`PRAGMA optimize`, close the connection, end the thread; a second close does nothing."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            with translated("close", self.path):
                await self._call(_optimize_and_close, conn)
        finally:
            self._thread.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))


def _fetchall(conn: sqlite3.Connection, query: str, params: Any) -> list[Any]:
    return conn.execute(query, params).fetchall()


def _optimize_and_close(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA optimize")
    finally:
        conn.close()
