"""The write-ahead log: every event is on the daemon's disk, fdatasync'd, before it is published.

The file is a header line, then framed records::

    b"NUMERUS-WAL 1\\n"
    [u32 length][u32 crc32(payload)][payload]   ... repeated

A payload is one *batch*, msgpack-encoded: the entries made durable together (event id, subject, wire bytes)
and the ids JetStream has acknowledged since the previous batch. One batch per write is what makes recovery
simple: a crash can only tear the record being written, which is then the last one.

Group commit: `submit()` queues entries and returns a future; one flusher writes everything queued as a single
record (a copy into the page cache, done on the loop) and calls `os.fdatasync` once, in a dedicated thread so
the event loop keeps running while the disk syncs, then resolves every waiter of that batch. While it syncs,
new submissions gather for the next batch, so many concurrent appends cost one sync. Acks are not synced on
their own: losing one in a crash only means the event store checks the stream for that event again on restart
(see `EventStore.recover`).

Recovery on open: a torn last record (or a zero-filled tail) is truncated away; a record that fails its checksum
with valid data after it is damage, not a crash, and raises `WalCorrupted` rather than dropping events.

Compaction: when the file outgrows `segment_bytes` and what is still unacknowledged is small, the next batch is
written instead into a fresh segment holding only the unacknowledged entries, which atomically replaces the old
file (write, fdatasync, rename, fsync of the directory). The WAL therefore stays about as large as the backlog.
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import msgspec

from numerusd.errors import StoreError, WalCorrupted
from numerusd.metrics import Metrics

MAGIC = b"NUMERUS-WAL 1\n"
_FRAME = struct.Struct("<II")
#: No record is larger than this; a bigger length field is damage (or a torn header), never data.
MAX_RECORD = 256 << 20
DEFAULT_SEGMENT_BYTES = 64 << 20


class WalEntry(NamedTuple):
    """One event as the log keeps it: enough to publish it again exactly as before."""

    id: str
    subject: str
    wire: bytes


class _Batch(msgspec.Struct, array_like=True):
    """The payload of one record."""

    entries: list[tuple[str, str, bytes]] = []
    acked: list[str] = []


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Batch).decode


def _frame(batch: _Batch) -> bytes:
    payload = _encode(batch)
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


class WriteAheadLog:
    """An append-only, group-committed log of events not yet acknowledged by JetStream. Open with `open()`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        pending: dict[str, WalEntry],
        size: int,
        segment_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.path = path
        self.metrics = metrics or Metrics()
        self._fd = fd
        self._pending = pending
        self._size = size
        self._segment_bytes = segment_bytes
        self._pending_bytes = sum(len(e.wire) + len(e.subject) + 40 for e in pending.values())
        # Queued for the next batch.
        self._entries: list[tuple[str, str, bytes]] = []
        self._acked: list[str] = []
        self._waiters: list[asyncio.Future[None]] = []
        # Called, in submission order, as soon as their batch is durable, even if its waiter was cancelled.
        self._on_durable: list[Callable[[], None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        # One thread of its own, so a slow sync never waits behind other blocking work of the daemon.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="numerus-wal")
        #: How many fdatasync calls this log has made (group commit makes it far fewer than appends).
        self.syncs = 0
        #: How many segments compaction has started.
        self.compactions = 0

    # --- opening and recovery ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, metrics: Metrics | None = None
    ) -> WriteAheadLog:
        """Open (creating if needed) the log at `path` and recover it: torn tail truncated, damage refused; its
        syncs are timed in `metrics`."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A leftover of a compaction that crashed before its rename: the old file is still the truth.
            _tmp_path(path).unlink(missing_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open write-ahead log {path}: {e.strerror}", path=str(path)) from e
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                # New, or created by a crash before its header was durable.
                os.ftruncate(fd, 0)
                os.write(fd, MAGIC)
                os.fsync(fd)
                _fsync_dir(path.parent)
                return cls(path, fd, {}, len(MAGIC), segment_bytes, metrics)
            if not data.startswith(MAGIC):
                raise WalCorrupted(f"{path} is not a Numerus write-ahead log (bad header)", path=str(path))
            pending, good = _replay(path, data)
            if good < len(data):
                # A torn last record: it was never acknowledged to anyone, so dropping it loses nothing.
                os.ftruncate(fd, good)
                os.fsync(fd)
            return cls(path, fd, pending, good, segment_bytes, metrics)
        except BaseException:
            os.close(fd)
            raise

    # --- appending -----------------------------------------------------------------------------------------

    def submit(self, entries: Sequence[WalEntry], on_durable: Callable[[], None] | None = None) -> asyncio.Future[None]:
        """Queue `entries` for the next batch; the future resolves once they are on disk (or fails).

        Entries submitted earlier are written no later than entries submitted after them, so the order of
        calls is the order in the log. `on_durable` is called (in that same order, before the future resolves)
        once they are durable, whether or not anyone still awaits the future. Must be called from the event
        loop's thread.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._failed is not None or self._closed:
            waiter.set_exception(self._unusable())
            return waiter
        pending = self._pending
        queued = self._entries
        for entry in entries:
            pending[entry.id] = entry
            queued.append((entry.id, entry.subject, entry.wire))
            self._pending_bytes += len(entry.wire) + len(entry.subject) + 40
        self._waiters.append(waiter)
        if on_durable is not None:
            self._on_durable.append(on_durable)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return waiter

    async def append(self, entries: Sequence[WalEntry]) -> None:
        """Write `entries` durably; returns once they are fdatasync'd (sharing the sync with concurrent calls)."""
        await self.submit(entries)

    def ack(self, ids: Iterable[str]) -> None:
        """Mark entries as acknowledged by JetStream; recorded with the next batch (or `sync`), not synced."""
        pending = self._pending
        for id_ in ids:
            entry = pending.pop(id_, None)
            if entry is not None:
                self._acked.append(id_)
                self._pending_bytes -= len(entry.wire) + len(entry.subject) + 40

    def pending(self) -> list[WalEntry]:
        """The entries not yet acknowledged, in the order they were appended."""
        return list(self._pending.values())

    def is_pending(self, id: str) -> bool:
        """Whether the entry `id` is in the log and not yet acknowledged."""
        return id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def size(self) -> int:
        """Bytes in the current segment on disk."""
        return self._size

    @property
    def unrecorded_acks(self) -> int:
        """Acks noted but not yet written (they ride along with the next batch or `sync`)."""
        return len(self._acked)

    async def sync(self) -> None:
        """Write whatever is queued (acks included) and fdatasync it; everything written before is synced."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._failed is not None:
            raise self._unusable()
        self._waiters.append(waiter)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        await waiter

    async def close(self) -> None:
        """Record outstanding acks, sync, and close the file."""
        if self._closed:
            return
        if self._failed is None:
            try:
                await self.sync()
            finally:
                self._closed = True
        self._closed = True
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        os.close(self._fd)
        self._executor.shutdown(wait=True)

    # --- the flusher ---------------------------------------------------------------------------------------

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiters:
                entries, self._entries = self._entries, []
                acked, self._acked = self._acked, []
                waiters, self._waiters = self._waiters, []
                callbacks, self._on_durable = self._on_durable, []
                if not entries and not acked:
                    # Every earlier write was followed by its own sync: nothing is left to make durable.
                    _resolve(waiters, None)
                    continue
                try:
                    if self._size > self._segment_bytes and self._pending_bytes < self._segment_bytes // 2:
                        # Everything not acknowledged, this batch's entries included, into a fresh segment.
                        live = [(e.id, e.subject, e.wire) for e in self._pending.values()]
                        record = MAGIC + _frame(_Batch(live, []))
                        await loop.run_in_executor(self._executor, self._rotate, record)
                        self.compactions += 1
                    else:
                        record = _frame(_Batch(entries, acked))
                        # The write only copies into the page cache, so it is done here; the sync waits for
                        # the disk, so it runs in the WAL thread (one GIL hand-over per batch, not three).
                        self._write(record)
                        with self.metrics.wal_fsync_seconds.time():
                            await loop.run_in_executor(self._executor, os.fdatasync, self._fd)
                    self.syncs += 1
                except OSError as e:
                    # After a failed fdatasync the kernel may have dropped the dirty pages: retrying could
                    # report success for data that is gone. The log refuses all further work instead.
                    self._failed = e
                    error = self._unusable()
                    _resolve(waiters + self._waiters, error)
                    self._waiters = []
                    self._on_durable = []
                    return
                for callback in callbacks:
                    callback()
                _resolve(waiters, None)
        finally:
            self._flusher = None

    def _write(self, record: bytes) -> None:
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(record)

    def _rotate(self, segment: bytes) -> None:  # in the WAL thread
        tmp = _tmp_path(self.path)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            view = memoryview(segment)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self._size = len(segment)

    def _unusable(self) -> StoreError:
        if self._failed is not None:
            return StoreError(
                f"write-ahead log {self.path} failed ({self._failed}); restart numerusd to recover from it",
                path=str(self.path),
            )
        return StoreError(f"write-ahead log {self.path} is closed", path=str(self.path))


def _resolve(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _replay(path: Path, data: bytes) -> tuple[dict[str, WalEntry], int]:
    """Rebuild the unacknowledged entries; return them and the length of the valid prefix of `data`."""
    pending: dict[str, WalEntry] = {}
    pos = len(MAGIC)
    end = len(data)
    while pos < end:
        # A crash can only tear the last write: it leaves a prefix of the record, or (when its pages reach the
        # disk out of order) zeros. Nobody was told such a record was durable, so it is dropped. Anything
        # else that fails its checks is damage, and refused.
        if end - pos < _FRAME.size:
            return pending, pos
        length, crc = _FRAME.unpack_from(data, pos)
        if length == 0 or length > MAX_RECORD:
            if _all_zero(data, pos):
                return pending, pos
            raise _damaged(path, pos)
        body_end = pos + _FRAME.size + length
        if body_end > end:
            return pending, pos
        payload = data[pos + _FRAME.size : body_end]
        if zlib.crc32(payload) != crc:
            if body_end == end or _all_zero(data, body_end):
                return pending, pos
            raise _damaged(path, pos)
        try:
            batch = _decode(payload)
        except msgspec.DecodeError as e:
            raise _damaged(path, pos) from e
        for id_, subject, wire in batch.entries:
            pending[id_] = WalEntry(id_, subject, wire)
        for id_ in batch.acked:
            pending.pop(id_, None)
        pos = body_end
    return pending, pos


def _damaged(path: Path, offset: int) -> WalCorrupted:
    return WalCorrupted(
        f"write-ahead log {path} is damaged at byte {offset} (a record fails its checksum and data follows it); "
        "it was not truncated. Keep a copy, then check the disk; see docs/operations.md",
        path=str(path),
        offset=offset,
    )


def _all_zero(data: bytes, start: int) -> bool:
    return data.count(0, start) == len(data) - start


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".compact")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
