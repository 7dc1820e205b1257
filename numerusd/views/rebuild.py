"""Rebuilding the views: the whole stream replayed into a scratch file, swapped in once it is whole.

`rebuild` is what `numerusd rebuild` runs (`rebuild_views`), and what the daemon does when it finds its views
empty while the stream is long (`daemon._load_views`). The stream is read by a child process
(`numerusd.stream_pump`; by this one while the child starts) so that reading and this process's verifying,
folding and writing use two cores. The scratch file is loaded in bulk (`Projector.open(bulk=True)`): no fsync, a
rollback journal in memory, each job's rows written once, the secondary indexes built at the end, and the cyclic
garbage collector paused. Until the swap the old views stay as they were, so an interrupted rebuild changes
nothing.

`numerusd rebuild` with the daemon stopped replaces the views in place (starting the embedded nats-server for
the time of the replay when no NATS URL is configured). While a daemon runs, the views are its to write, so
`--to FILE` rebuilds into another file instead, through the running daemon's server: comparing that file with
the live views (`views.dump`) is how an operator checks that the projection holds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec

from numerusd import state_lock
from numerusd.config import NatsAddress, Settings
from numerusd.embedded_nats import EmbeddedNats, daemon_login
from numerusd.errors import ConfigError, StoreError
from numerusd.keys import Keyring
from numerusd.protocol.connection import decode_connection
from numerusd.stream_pump import head_started_stream
from numerusd.stream_reader import StreamMessage
from numerusd.views.projector import READ_BATCH, STREAM, Projector


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


async def rebuild(
    address: NatsAddress, keys: dict[str, bytes], db_path: str | Path, *, stream: str = STREAM
) -> RebuildReport:
    """Replay the whole stream into a fresh file beside `db_path`, then swap it in.

    The stream is read by a child process connected to the server at `address`. Run it with the daemon stopped
    (or into another file): the daemon keeps its file open.
    """
    path = Path(db_path)
    scratch = path.with_name(path.name + ".rebuild")
    _remove_database(scratch)
    projector = Projector(scratch, keys)
    await projector.open(bulk=True)
    try:
        started = time.perf_counter()

        def read(start: int) -> AsyncIterator[list[StreamMessage]]:
            return head_started_stream(address, stream, start_seq=start, batch=READ_BATCH)

        with _collector_paused():
            replayed = await projector.catch_up_from(read)
            await projector.finish()
        seconds = time.perf_counter() - started  # the indexing included
        # Counted now that the rows held back by the bulk load are written.
        jobs, tasks = await projector.count_rows()
        report = RebuildReport(
            messages=replayed.messages,
            applied=replayed.messages - replayed.rejected,
            rejected=replayed.rejected,
            jobs=jobs,
            tasks=tasks,
            last_seq=projector.position(),
            seconds=seconds,
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


async def rebuild_views(settings: Settings, target: Path | None) -> str:
    """`numerusd rebuild [--to FILE]`: rebuild the views (in place, or into `target`) and say what was done."""
    keyring = Keyring.load(settings.keys_path)
    running = state_lock.held(settings.state_dir)
    if running and target is None:
        raise ConfigError(
            f"numerusd is running on {settings.state_dir}; stop it first, or rebuild into another file with --to FILE"
        )
    embedded = None
    address = settings.configured_nats()
    if address is None and running:
        connection = decode_connection(settings.connection_path.read_bytes())
        user, password = daemon_login(settings.nats_store_dir)  # a client role may not make the consumers we read with
        address = NatsAddress(url=connection.url, user=user, password=password)
    elif address is None:
        embedded = EmbeddedNats(store_dir=settings.nats_store_dir)
        address = NatsAddress(url=embedded.start(), user=embedded.user, password=embedded.password)
    try:
        db_path = target or settings.db_path
        report = await rebuild(address, keyring.keys, db_path)
    finally:
        if embedded is not None:
            embedded.stop()
    return (
        f"rebuilt {db_path}: {report.messages} messages, {report.applied} events applied, "
        f"{report.rejected} rejected, {report.jobs} jobs, {report.tasks} tasks "
        f"in {report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)"
    )


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
