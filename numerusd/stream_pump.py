"""Reading a stream in a child process, so that a replay uses a second core.

Reading a stream through nats-py costs about 20 µs of Python a message (its protocol parser, a `Msg` each), as
much as verifying, decoding and folding the event takes afterwards. A rebuild doing both in one process runs at
half the speed of a bare read. `pumped_stream` moves the reading into a child process (`python -m
numerusd.stream_pump`) that runs the lean reader of `numerusd.stream_reader` and writes what it reads to a pipe,
a batch per frame; the parent decodes a frame in one msgspec call and gets the same `StreamMessage` batches
`read_stream` yields. `head_started_stream` reads the head of the stream in the parent while the child starts,
then hands over.

The parent talks to the child on its stdin, never on the command line: first a JSON line with the connection
details, the stream and the batch size; once the child says it is connected, a line with the sequence to start
from (the parent knows it only then: it reads the head itself meanwhile). A frame from the child is a 4-byte
big-endian length, then a one-byte kind and its body:

* `R` ready: connected, waiting for the start line;
* `B` a batch: msgpack of `[[seq, subject, data, time_ns], ...]`;
* `D` done: the stream was read to its end;
* `U` the server could not be reached or refused the login; `E` reading failed: the reason in UTF-8, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from numerusd.config import NatsAddress
from numerusd.errors import NatsUnavailable, NumerusError, StoreError
from numerusd.protocol.connection import server_urls
from numerusd.stream_reader import DEFAULT_BATCH, StreamMessage, read_stream


class _Request(msgspec.Struct, frozen=True, kw_only=True):
    address: NatsAddress
    stream: str
    batch: int


log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_READY, _BATCH, _DONE, _UNREACHABLE, _FAILED = b"R", b"B", b"D", b"U", b"E"
# A pipe of 1 MiB (Linux's default ceiling for unprivileged processes) holds a few batches: the child rarely
# waits for the parent to read.
_PIPE_BYTES = 1 << 20
_batch_decoder = msgspec.msgpack.Decoder(list[StreamMessage])


class _Child:
    """The parent's handle on a pumping child: `ready()` once it is connected, then `begin()` and `batches()`."""

    def __init__(self, process: asyncio.subprocess.Process, stream: str) -> None:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self._process = process
        self._stdin, self._stdout, self._stderr = process.stdin, process.stdout, process.stderr
        self._stream = stream

    @classmethod
    async def start(cls, address: NatsAddress, stream: str, batch: int) -> _Child:
        """Start the child and give it its connection details; it connects while the caller goes on."""
        # The child imports this package from where the parent did, whatever the parent's sys.path was.
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = os.environ | {"PYTHONPATH": package_root + (os.pathsep + path if path else "")}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "numerusd.stream_pump",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=4 * _PIPE_BYTES,
        )
        child = cls(process, stream)
        child._stdin.write(msgspec.json.encode(_Request(address=address, stream=stream, batch=batch)) + b"\n")
        return child

    async def ready(self) -> None:
        """Wait until the child is connected; NatsUnavailable or StoreError when it cannot be."""
        kind, body = await self._frame()
        if kind != _READY:
            self._fail(kind, body)

    def begin(self, start_seq: int) -> None:
        """Tell the ready child to read from `start_seq` on."""
        self._stdin.write(b"%d\n" % start_seq)
        self._stdin.close()

    async def batches(self) -> AsyncIterator[list[StreamMessage]]:
        """The batches the child reads, until the stream's end."""
        while True:
            kind, body = await self._frame()
            if kind == _BATCH:
                yield _batch_decoder.decode(body)
            elif kind == _DONE:
                return
            else:
                self._fail(kind, body)

    async def stop(self) -> None:
        """End the child if it still runs (the caller stopped early, or read the stream without it)."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()

    async def _frame(self) -> tuple[bytes, bytes]:
        try:
            size = _HEADER.unpack(await self._stdout.readexactly(_HEADER.size))[0]
            frame = await self._stdout.readexactly(size)
        except asyncio.IncompleteReadError:
            code = await self._process.wait()
            said = (await self._stderr.read()).decode(errors="replace").strip().splitlines()
            raise StoreError(
                f"the process reading stream {self._stream} exited with code {code} before the end"
                + (f": {said[-1]}" if said else "")
            ) from None
        return frame[:1], frame[1:]

    @staticmethod
    def _fail(kind: bytes, body: bytes) -> None:
        if kind == _UNREACHABLE:
            raise NatsUnavailable(body.decode(errors="replace"))
        raise StoreError(body.decode(errors="replace"))


async def pumped_stream(
    address: NatsAddress, stream: str, *, start_seq: int = 1, batch: int = DEFAULT_BATCH
) -> AsyncIterator[list[StreamMessage]]:
    """Yield batches of `stream` from `start_seq` until caught up, read by a child process."""
    child = await _Child.start(address, stream, batch)
    try:
        await child.ready()
        child.begin(start_seq)
        async for messages in child.batches():
            yield messages
    finally:
        await child.stop()


async def head_started_stream(
    address: NatsAddress, stream: str, *, start_seq: int = 1, batch: int = DEFAULT_BATCH
) -> AsyncIterator[list[StreamMessage]]:
    """Yield batches of `stream` from `start_seq` until caught up: read here while the child process starts, then
    by the child.

    The child needs a fifth of a second to import and connect, a tenth of a whole rebuild of 100k events that
    would otherwise be spent waiting for its first batch. Meanwhile this process reads with its own connection;
    when the child says it is connected, it is told to start where this process stopped, so that nothing is
    read twice. A stream read here to its end (a small one) does not wait for the child at all; nor does one
    whose child fails to start or connect: it is read here to its end, only slower.
    """
    child = await _Child.start(address, stream, batch)
    ready = asyncio.ensure_future(child.ready())
    read = start_seq - 1
    warned = False
    nc = None
    try:
        nc = await _connect(address)
        async with contextlib.aclosing(read_stream(nc, stream, start_seq=read + 1, batch=batch)) as here:
            async for messages in here:
                yield messages
                read = messages[-1].seq
                if ready.done():
                    failed = ready.exception()
                    if failed is None:
                        break
                    if not warned:  # the child could not start or connect: slower, but this process reads on
                        log.warning("reading stream %s here: its reading process failed: %s", stream, failed)
                        warned = True
            else:
                return  # read to its end here
        await nc.close()
        await ready
        child.begin(read + 1)
        async for messages in child.batches():
            yield messages
    finally:
        if nc is not None and not nc.is_closed:
            await nc.close()  # read to its end here, or stopped early
        if not ready.done():
            ready.cancel()
        with contextlib.suppress(asyncio.CancelledError, NumerusError):
            await ready
        await child.stop()


class _Pipe(asyncio.Protocol):
    """The child's end of the pipe, written through the event loop with flow control.

    Up to 16 MiB waits here when the parent is slow to read: a blocking write would stop the reading of the
    stream as well, and the two processes would take turns waiting for each other.
    """

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.closed.done():
            self.closed.set_result(None)


async def _connect(address: NatsAddress) -> Any:
    """One connection for one read, no reconnecting; NatsUnavailable with one line when there is none."""
    from nats.aio.client import Client

    failure: Exception = ValueError("no server URL given")
    for url in server_urls(address.url):  # a cluster's nodes in turn, until one answers
        nc = Client()
        try:
            await nc.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=_quiet, **address.options())
            return nc
        except Exception as e:
            await nc.close()  # a refused login leaves its socket open
            failure = e
    raise NatsUnavailable(f"cannot connect to NATS at {address.url}: {failure}") from failure


async def _quiet(_error: Exception) -> None:
    """nats-py's error callback: the failure is reported (to the parent, to the caller), not logged per try."""


async def _pump(into: int, out: int) -> None:
    loop = asyncio.get_running_loop()
    lines = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines), os.fdopen(into, "rb"))
    request = msgspec.json.decode(await lines.readline(), type=_Request)
    transport, pipe = await loop.connect_write_pipe(_Pipe, os.fdopen(out, "wb"))
    transport.set_write_buffer_limits(high=16 * _PIPE_BYTES)

    async def send(kind: bytes, body: bytes) -> None:
        if transport.is_closing():
            raise BrokenPipeError("the parent stopped reading")
        transport.write(_HEADER.pack(len(body) + 1) + kind + body)
        await pipe.writable.wait()

    try:
        try:
            nc = await _connect(request.address)
        except NatsUnavailable as e:
            await send(_UNREACHABLE, e.message.encode())
            return
        await send(_READY, b"")
        start = (await lines.readline()).strip()
        if not start:  # the parent read the whole stream itself, or stopped
            await nc.close()
            return
        await _pump_stream(nc, request, int(start), send)
    finally:
        transport.close()  # once what is buffered is written
        await pipe.closed


async def _pump_stream(
    nc: Any, request: _Request, start_seq: int, send: Callable[[bytes, bytes], Awaitable[None]]
) -> None:
    encoder = msgspec.msgpack.Encoder()
    try:
        # The reader yields whatever has arrived, often a few hundred messages; the parent commits a transaction
        # per batch it gets, so they are sent on in batches of the size asked. The first ones are smaller (the
        # first as it comes, then each at most twice the one before) so that the parent starts at once.
        pending: list[StreamMessage] = []
        least = 1
        async for batch in read_stream(nc, request.stream, start_seq=start_seq, batch=request.batch):
            pending += batch
            if len(pending) >= least:
                await send(_BATCH, encoder.encode(pending))
                least = min(request.batch, 2 * len(pending))
                pending = []
        if pending:
            await send(_BATCH, encoder.encode(pending))
        await send(_DONE, b"")
    except BrokenPipeError:
        raise  # nobody to tell
    except NumerusError as e:  # says what it was doing already
        await send(_FAILED, str(e).encode())
    except Exception as e:
        await send(_FAILED, f"cannot read stream {request.stream}: {e}".encode())
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def main() -> None:
    """The child: read the request on stdin, pump the stream to stdout."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    try:
        import uvloop

        uvloop.run(_pump(0, 1))
    except BrokenPipeError:
        pass  # the parent stopped reading: nothing left to do


if __name__ == "__main__":
    main()
