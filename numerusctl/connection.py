"""How numerusctl finds and talks to numerusd: where to connect, one request/reply, and reading a stream.

Where: `--nats-url` (or `$NUMERUS_NATS_URL`) with `--nats-user/--nats-password` or `--creds`, else the
connection file the daemon writes in its state directory (`--state-dir`, `$NUMERUS_STATE_DIR`, or the default),
`{"url", "user", "password", "pid"}`. The client connects once, with a short timeout and no reconnect loop: a
command that cannot reach the daemon fails fast with one line and exit code 3.

Every failure here is a `CtlError` carrying its exit code and one line for the user; nothing below lets a
third-party exception out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import click
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from numerusd.errors import NatsUnavailable, StoreError
from numerusd.protocol.commands import DEFAULT_STATE_DIR, ErrorReply, Request, command_subject
from numerusd.stream_reader import StreamMessage, read_stream
from numerusd.streams import STREAM_NOT_FOUND

CONNECTION_FILE = "connection.json"

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3

EVENTS_STREAM = "NUMERUS_EVENTS"
LOGS_STREAM = "NUMERUS_LOGS"

_HINT = "start it with 'numerusd' or pass --state-dir/--nats-url"
_error_decoder = msgspec.json.Decoder(ErrorReply)


class CtlError(click.ClickException):
    """A failure the user sees as `numerusctl: <message>` on one line, with its own exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        """One line on stderr, no traceback, no 'Error:' prefix."""
        click.echo(f"numerusctl: {self.message}", err=True, file=file)


class Unreachable(CtlError):
    """The daemon (or its NATS server) cannot be reached: exit 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_UNREACHABLE)


@dataclass(frozen=True)
class Target:
    """Where to connect and as whom; `source` says where that came from, for messages."""

    url: str
    source: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds: Path | None = None
    #: The daemon's pid, from the connection file: tells a stale file from a daemon that is merely slow.
    pid: int | None = None


def state_dir_or_default(state_dir: Path | None) -> Path:
    """The state directory to look in: the option (click also reads `$NUMERUS_STATE_DIR` into it), or the default."""
    return (state_dir or Path(DEFAULT_STATE_DIR)).expanduser()


def read_connection_file(path: Path) -> Target:
    """The daemon's connection file, or Unreachable saying that no daemon has written one there."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise Unreachable(f"cannot reach numerusd: no {path} (numerusd writes it when it starts); {_HINT}") from None
    except PermissionError:
        raise CtlError(f"cannot read {path}: permission denied (it belongs to the user running numerusd)") from None
    except (OSError, ValueError) as e:
        raise Unreachable(f"cannot reach numerusd: {path} is unreadable ({e}); {_HINT}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise Unreachable(f"cannot reach numerusd: {path} holds no server URL; {_HINT}")
    pid = raw.get("pid")
    return Target(
        url=raw["url"],
        source=str(path),
        user=raw.get("user") or None,
        password=raw.get("password") or None,
        pid=pid if isinstance(pid, int) else None,
    )


def resolve_target(
    *,
    state_dir: Path | None,
    nats_url: str | None,
    nats_user: str | None = None,
    nats_password: str | None = None,
    creds: Path | None = None,
) -> Target:
    """`--nats-url` and its credentials when given, else the connection file in the state directory."""
    if nats_url:
        return Target(url=nats_url, source="--nats-url", user=nats_user, password=nats_password, creds=creds)
    return read_connection_file(state_dir_or_default(state_dir) / CONNECTION_FILE)


def redact(url: str) -> str:
    """The URL without any `user:password@` in it, for messages."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def server_of(nc: Client) -> str:
    """The server a connection is on, credentials left out."""
    url = nc.connected_url
    return f"{url.scheme}://{url.hostname}:{url.port}" if url else "the NATS server"


def _pid_gone(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def _why(error: BaseException | None) -> str:
    """A few words for a connection failure: what a user can act on, not a class name."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (asyncio.TimeoutError, TimeoutError, nats.errors.TimeoutError)):
        return "timed out"
    if isinstance(error, nats.errors.AuthorizationError) or "authorization" in str(error).lower():
        return "authorization failed: wrong user, password or credentials"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error or "").strip()
    return text or type(error).__name__


async def _ignore(*_args: Any) -> None:
    # nats-py's default callbacks log errors with tracebacks; numerusctl reports failures itself, once.
    return None


async def connect(target: Target, timeout: float) -> Client:
    """One connection attempt (two quick tries for a refused port), or Unreachable with the reason."""
    errors: list[BaseException] = []

    async def record(error: Exception) -> None:
        errors.append(error)

    options: dict[str, Any] = {
        "servers": [target.url],
        "connect_timeout": timeout,
        "allow_reconnect": False,
        # nats-py counts attempts per server and never gives up with 0; 1 means "try, then stop".
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0,
        "error_cb": record,
        "disconnected_cb": _ignore,
        "closed_cb": _ignore,
        "reconnected_cb": _ignore,
    }
    if target.user:
        options["user"] = target.user
        options["password"] = target.password or ""
    if target.creds:
        options["user_credentials"] = str(target.creds)
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(**options), timeout * 2 + 1)
        return nc
    except Exception as e:  # every way of failing ends in the same one line
        with contextlib.suppress(Exception):
            await nc.close()  # a refused login leaves nats-py's socket open otherwise
        cause = errors[-1] if isinstance(e, nats.errors.NoServersError) and errors else e
        why = _why(cause)
        if _pid_gone(target.pid):
            why += f"; numerusd pid {target.pid} from {target.source} is not running"
        raise Unreachable(f"cannot reach numerusd at {redact(target.url)} ({why}); {_HINT}") from None


@contextlib.asynccontextmanager
async def connected(target: Target, timeout: float) -> AsyncIterator[Client]:
    """A connection for the duration of one command, closed however the command ends."""
    nc = await connect(target, timeout)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout)


async def request(nc: Client, verb: str, body: Request, timeout: float) -> bytes:
    """Send one request to `numerus.cmd.<verb>`; the reply's bytes, or CtlError for an error reply."""
    subject = command_subject(verb)
    try:
        reply = await nc.request(subject, msgspec.json.encode(body), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise Unreachable(f"numerusd is not running on {server_of(nc)}: nothing answers {subject}; {_HINT}") from None
    except nats.errors.TimeoutError:
        raise Unreachable(
            f"numerusd did not answer {subject} within {timeout:g} s (see its log, or raise --timeout)"
        ) from None
    headers = reply.headers or {}
    if "Nats-Service-Error" in headers or "Nats-Service-Error-Code" in headers:
        try:
            message = _error_decoder.decode(reply.data).message
        except msgspec.DecodeError:
            message = headers.get("Nats-Service-Error") or f"error {headers.get('Nats-Service-Error-Code')}"
        raise CtlError(message)
    return reply.data


def decode_reply(decoder: msgspec.json.Decoder[Any], verb: str, data: bytes) -> Any:
    """Decode a reply with its module-level decoder; a reply of another shape is a version mismatch."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as e:
        raise CtlError(
            f"cannot read numerusd's reply to {verb} ({e}); are numerusd and numerusctl the same version?"
        ) from None


async def stored_batches(nc: Client, stream: str, subject: str) -> AsyncIterator[list[StreamMessage]]:
    """Batches of everything stored on `subject` now, read with the lean pull loop of `numerusd.stream_reader`
    (an ephemeral consumer, nothing acknowledged): a quarter faster than an ordered consumer over 100k events, for
    a reader that only goes through the whole history once (`audit verify`)."""
    try:
        async for batch in read_stream(nc, stream, filter_subjects=[subject]):
            yield batch
    except StoreError as e:
        if e.fields.get("err_code") == STREAM_NOT_FOUND:
            raise _no_stream(nc, stream) from None
        raise CtlError(e.message) from None
    except NatsUnavailable as e:
        raise Unreachable(e.message) from None


def _no_stream(nc: Client, stream: str) -> CtlError:
    return CtlError(f"stream {stream} does not exist on {server_of(nc)}: has numerusd ever run against this server?")


class Stored(NamedTuple):
    """One message as JetStream stores it."""

    seq: int
    subject: str
    data: bytes


class StreamFeed:
    """An ordered consumer on one stream and subject filter, from a start sequence, handing out batches.

    Ordered consumers are ephemeral, in memory and never acknowledged: nothing is left behind on the server
    and nothing a reader does can disturb the daemon's own consumers. Messages are collected by a callback
    (far cheaper in nats-py than `next_msg`) and handed out in whatever batches have arrived.
    """

    def __init__(self, nc: Client, stream: str, subject: str, start_seq: int = 1) -> None:
        self._nc = nc
        self._stream = stream
        self._subject = subject
        self._start_seq = start_seq
        self._ready: list[Stored] = []
        self._arrived = asyncio.Event()
        self._caught_up = False
        self._last_seq = 0
        self._sub: Any = None

    async def __aenter__(self) -> StreamFeed:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self._start_seq > 1 else DeliverPolicy.ALL,
            opt_start_seq=self._start_seq if self._start_seq > 1 else None,
        )
        try:
            self._sub = await self._nc.jetstream().subscribe(
                self._subject, stream=self._stream, ordered_consumer=True, config=config, cb=self._on_msg
            )
            info = await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            raise _no_stream(self._nc, self._stream) from None
        except nats.js.errors.APIError as e:
            raise CtlError(f"cannot read stream {self._stream}: {e.description or e}") from None
        if info.num_pending == 0 and info.delivered.consumer_seq == 0:
            self._caught_up = True  # nothing stored yet; no message will come to say so
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._sub is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        self._last_seq = meta.sequence.stream
        self._ready.append(Stored(self._last_seq, msg.subject, msg.data))
        if meta.num_pending == 0:
            self._caught_up = True
        self._arrived.set()

    @property
    def caught_up(self) -> bool:
        """True once every message stored when the feed began (and maybe more) has been handed out."""
        return self._caught_up and not self._ready

    async def next_batch(self) -> list[Stored]:
        """What has arrived, waiting for something if nothing has."""
        while not self._ready:
            if self._nc.is_closed:
                raise Unreachable("lost the connection to NATS")
            self._arrived.clear()
            # Wake up now and then to notice a connection that closed under us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 1.0)
        batch, self._ready = self._ready, []
        return batch

    async def until_caught_up(self) -> AsyncIterator[list[Stored]]:
        """Batches of everything stored when the feed began, then stop."""
        while not self.caught_up:
            yield await self.next_batch()

    async def drain(self) -> AsyncIterator[list[Stored]]:
        """Batches until everything stored by now on the subject has been handed out (asks the server)."""
        while True:
            if self._ready:
                batch, self._ready = self._ready, []
                yield batch
                continue
            if self._nc.is_closed:
                raise Unreachable("lost the connection to NATS")
            info = await self._sub.consumer_info()
            if info.num_pending == 0 and self._last_seq >= info.delivered.stream_seq:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 0.2)

    async def forever(self) -> AsyncIterator[list[Stored]]:
        """Batches as they come, without end (the caller stops)."""
        while True:
            yield await self.next_batch()
