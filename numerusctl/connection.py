"""How numerusctl finds and talks to numerusd: where to connect, and one request/reply.

Where: `--nats-url` (or `$NUMERUS_NATS_URL`) with `--nats-user/--nats-password` or `--creds`, else the
connection file the daemon writes in its state directory (`--state-dir`, `$NUMERUS_STATE_DIR`, or the default),
read through `numerusd.protocol.connection`, with the login of the role asked (`--role`, default `operator`;
see `numerusd/bus_roles.py` for what each may do). A cluster's URL is its nodes', comma separated: they are tried
in turn. The client connects once, with a short timeout and no reconnect loop: a command that cannot reach the
daemon fails fast with one line, exit code 3 when no daemon runs and 4 when the daemon named in the connection
file runs but its bus does not answer (an embedded server being restarted, or held up). Reading streams (for
following and auditing) is `feed.py`'s, imported only by the commands that read them.

Every failure here is a `CtlError` carrying its exit code and one line for the user; nothing below lets a
third-party exception out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import os
import weakref
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
import nats.errors
from nats.aio.client import Client

from numerusd.protocol import subjects
from numerusd.protocol.commands import DEFAULT_STATE_DIR, REPLIES, ErrorReply, Request
from numerusd.protocol.connection import (
    CLIENT_ROLES,
    FILE_NAME,
    TRACE_HEADER,
    USER_HEADER,
    decode_connection,
    inbox_prefix,
    server_urls,
)
from numerusd.protocol.exit_codes import CtlExit

_HINT = "start it with 'numerusd' or pass --state-dir/--nats-url"
_error_decoder = msgspec.json.Decoder(ErrorReply)


#: The `code` of an error under `--json` when nothing more precise is known: one per exit code.
EXIT_NAMES: dict[int, str] = {
    CtlExit.FAILED: "failed",
    CtlExit.USAGE: "usage",
    CtlExit.UNREACHABLE: "unreachable",
    CtlExit.BUS_DOWN: "bus_down",
}


class CtlError(click.ClickException):
    """A failure the user sees as `numerusctl: <message>` on one line, with its own exit code; `code` names it
    under `--json` (the daemon's own code for an error reply, e.g. `not_found`)."""

    def __init__(self, message: str, exit_code: int = CtlExit.FAILED, code: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code or EXIT_NAMES.get(exit_code, "failed")

    def show(self, file: Any = None) -> None:
        """One line on stderr, no traceback, no 'Error:' prefix."""
        click.echo(f"numerusctl: {self.message}", err=True, file=file)


class Unreachable(CtlError):
    """The daemon (or its NATS server) cannot be reached: exit 3, or 4 when the daemon runs and its bus is down."""

    def __init__(self, message: str, exit_code: int = CtlExit.UNREACHABLE) -> None:
        super().__init__(message, exit_code)


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
    #: The role logged in as, from the connection file (None with --nats-url: whatever that login may do).
    role: str | None = None
    #: Where replies come: the inbox of the role asked (`--role`), the only one a role's login may read, whatever
    #: the server (the embedded one, or a shared one configured as `deploy/nats-server.conf`).
    inbox: str = inbox_prefix(CLIENT_ROLES[0])


class _Refusals:
    """What the server refused on one connection (its permissions), as they arrive: a refused publish gets no
    reply, only an asynchronous error, so a request waits for either."""

    def __init__(self, role: str | None) -> None:
        self.role = role
        self.subjects: set[str] = set()
        self.arrived = asyncio.Event()

    def note(self, error: BaseException) -> None:
        """Record the subject of a `permissions violation for publish to "<subject>"` error."""
        text = str(error)
        if "permissions violation" in text and '"' in text:
            self.subjects.add(text.split('"')[1].lower())  # the server reports it lower-cased
            self.arrived.set()

    async def refused(self, subject: str) -> None:
        """Return once the server has refused `subject`."""
        while subject.lower() not in self.subjects:
            self.arrived.clear()
            await self.arrived.wait()


_T = TypeVar("_T")
_refusals: weakref.WeakKeyDictionary[Client, _Refusals] = weakref.WeakKeyDictionary()


def state_dir_or_default(state_dir: Path | None) -> Path:
    """The state directory to look in: the option (click also reads `$NUMERUS_STATE_DIR` into it), or the default."""
    return (state_dir or Path(DEFAULT_STATE_DIR)).expanduser()


def read_connection_file(path: Path, role: str = CLIENT_ROLES[0]) -> Target:
    """The daemon's connection file, logging in as `role`, or Unreachable saying that no daemon has written one
    there; CtlError when the file gives no login for `role`."""
    try:
        info = decode_connection(path.read_bytes())
    except FileNotFoundError:
        raise Unreachable(f"cannot reach numerusd: no {path} (numerusd writes it when it starts); {_HINT}") from None
    except PermissionError:
        raise CtlError(f"cannot read {path}: permission denied (it belongs to the user running numerusd)") from None
    except OSError as e:
        raise Unreachable(f"cannot reach numerusd: {path} is unreadable ({e.strerror}); {_HINT}") from None
    except msgspec.DecodeError as e:
        raise Unreachable(f"cannot reach numerusd: {path} is not numerusd's connection file ({e}); {_HINT}") from None
    login = info.roles.get(role)
    if login is not None:
        return Target(
            url=info.url,
            source=str(path),
            user=login.user,
            password=login.password,
            pid=info.pid,
            role=role,
            inbox=inbox_prefix(role),
        )
    if info.roles or role != CLIENT_ROLES[0]:
        raise CtlError(
            f"{path} gives no login for the role {role!r} (numerusd's server is external: pass its --nats-url, "
            "--nats-user and --nats-password)",
            CtlExit.USAGE,
        )
    # An external server, or an older daemon: the one login it gives.
    return Target(
        url=info.url,
        source=str(path),
        user=info.user or None,
        password=info.password or None,
        pid=info.pid,
        inbox=inbox_prefix(role),
    )


def resolve_target(
    *,
    state_dir: Path | None,
    nats_url: str | None,
    nats_user: str | None = None,
    nats_password: str | None = None,
    creds: Path | None = None,
    role: str = CLIENT_ROLES[0],
) -> Target:
    """`--nats-url` and its credentials when given, else the connection file in the state directory, logging in
    as `role`."""
    if nats_url:
        return Target(
            url=nats_url,
            source="--nats-url",
            user=nats_user,
            password=nats_password,
            creds=creds,
            inbox=inbox_prefix(role),
        )
    return read_connection_file(state_dir_or_default(state_dir) / FILE_NAME, role)


def redact(url: str) -> str:
    """The URL (or a cluster's URLs, comma separated) without any `user:password@` in it, for messages."""
    parts = []
    for server in server_urls(url):
        scheme, sep, rest = server.rpartition("://")
        parts.append(f"{scheme}{sep}{rest.rpartition('@')[2]}")
    return ",".join(parts)


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


def _daemon_running(pid: int | None) -> bool:
    """Whether `pid` is a live numerusd (not a stale file's pid taken over by another program since)."""
    if pid is None or _pid_gone(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc to ask (or not ours to read): the pid is alive, take it for the daemon
    # `numerusd ...`, or `python /path/to/numerusd ...` as a console script runs
    return any(os.path.basename(part) == b"numerusd" for part in command[:2])


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
    """One connection attempt to each server named (a cluster's nodes in their order) until one answers, or
    Unreachable with the reason."""
    errors: list[BaseException] = []
    refusals = _Refusals(target.role)

    async def record(error: Exception) -> None:
        errors.append(error)
        refusals.note(error)

    options: dict[str, Any] = {
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
    # Its role's own inbox: the only one a client role may subscribe to (numerusd.bus_roles).
    options["inbox_prefix"] = target.inbox
    if target.user:
        options["user"] = target.user
        options["password"] = target.password or ""
    if target.creds:
        options["user_credentials"] = str(target.creds)
    # A cluster's nodes (the url lists them, comma separated) are tried in their order until one answers.
    failure: BaseException | None = None
    for url in server_urls(target.url):
        nc = Client()
        try:
            await asyncio.wait_for(nc.connect(servers=[url], **options), timeout * 2 + 1)
            _refusals[nc] = refusals
            return nc
        except Exception as e:  # every way of failing ends in the same one line
            with contextlib.suppress(Exception):
                await nc.close()  # a refused login leaves nats-py's socket open otherwise
            failure = errors[-1] if isinstance(e, nats.errors.NoServersError) and errors else e
    why = _why(failure)
    if _daemon_running(target.pid) and not why.startswith("authorization"):
        raise Unreachable(
            f"numerusd (pid {target.pid}) is running, but its bus at {redact(target.url)} does not answer "
            f"({why}); an embedded server is restarted by numerusd itself: try again shortly",
            CtlExit.BUS_DOWN,
        ) from None
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
    subject = subjects.command(verb)
    payload = msgspec.json.encode(body)
    if len(payload) > nc.max_payload:
        raise CtlError(
            f"the {verb} request is {len(payload)} bytes, over the {nc.max_payload} bytes a NATS message may carry "
            "on this server (a smaller plan or goal)"
        )
    try:
        sent = nc.request(subject, payload, timeout=timeout, headers=request_headers())
        reply = await unless_refused(nc, subject, sent)
    except nats.errors.NoRespondersError:
        raise Unreachable(f"numerusd is not running on {server_of(nc)}: nothing answers {subject}; {_HINT}") from None
    except nats.errors.TimeoutError:
        raise Unreachable(
            f"numerusd did not answer {subject} within {timeout:g} s (see its log, or raise --timeout)"
        ) from None
    headers = reply.headers or {}
    if "Nats-Service-Error" in headers or "Nats-Service-Error-Code" in headers:
        try:
            error = _error_decoder.decode(reply.data)
            message, code = error.message, error.code
        except msgspec.DecodeError:
            message = headers.get("Nats-Service-Error") or f"error {headers.get('Nats-Service-Error-Code')}"
            code = None
        raise CtlError(message, code=code)
    return reply.data


def request_headers() -> dict[str, str]:
    """The headers of every request: who asks, and the W3C trace context of `$TRACEPARENT` when there is one (sent
    as given, on one line; the daemon keeps it only if it is W3C-shaped), so the events it causes join that trace."""
    headers = {USER_HEADER: os_user()}
    trace = os.environ.get("TRACEPARENT", "").strip()
    if trace and trace.isprintable():
        headers[TRACE_HEADER] = trace
    return headers


@functools.cache
def os_user() -> str:
    """The OS user running numerusctl, named to the daemon for the events a command causes."""
    try:
        name = getpass.getuser()  # $LOGNAME or $USER first: any text, which must not break a header line
    except (KeyError, OSError):  # no name for this uid (a container)
        return str(os.getuid())
    return "".join(c for c in name[:64] if c.isprintable()) or str(os.getuid())


async def unless_refused(nc: Client, subject: str, awaitable: Awaitable[_T]) -> _T:
    """What `awaitable` (a request on `subject`) gives, or CtlError as soon as the server refuses `subject` to this
    login (a role's permissions: `numerusd/bus_roles.py`), instead of a timeout."""
    refusals = _refusals.get(nc)
    if refusals is None:
        return await awaitable
    answer = asyncio.ensure_future(awaitable)
    refused = asyncio.ensure_future(refusals.refused(subject))
    try:
        await asyncio.wait({answer, refused}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        refused.cancel()
    if answer.done():
        return answer.result()
    answer.cancel()
    who = f"the {refusals.role} role" if refusals.role else "this login"
    raise CtlError(f"not allowed: {who} may not publish on {subject} (the NATS server refused it)")


@functools.cache
def _reply_decoder(verb: str) -> msgspec.json.Decoder[Any]:
    # Built once, but when the verb's reply first arrives rather than at import: a process runs one command, and
    # building every verb's decoder resolves every reply type, a cost each command would pay for the others.
    return msgspec.json.Decoder(REPLIES[verb])


def decode_reply(verb: str, data: bytes) -> Any:
    """Decode the reply to `verb` as its protocol type (`REPLIES`); a reply of another shape is a version mismatch."""
    try:
        return _reply_decoder(verb).decode(data)
    except msgspec.DecodeError as e:
        raise CtlError(
            f"cannot read numerusd's reply to {verb} ({e}); are numerusd and numerusctl the same version?"
        ) from None
