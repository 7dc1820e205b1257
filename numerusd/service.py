"""The `numerus` NATS micro service: decodes requests at the edge and turns every failure into a clear reply.

A request larger than `max_request_bytes` is refused before it is decoded (`too_large`, naming the limit); one
that does not decode gets a reply naming the bad path (`$.goal`); both are also sent, with their reason, to
`numerus.dlq.cmd.<reason>` (cut to the dead letters' size cap). A refused command gets its sentence. Anything else
is logged with its traceback and answered "internal error, see the daemon log, id=…": no raw exception ever
reaches the wire.

The service has a thread of its own (`CommandService`), with its own event loop and NATS connection, so that a
busy daemon (twenty jobs' agents, spawns, git calls and projections on its loop) still reads every request and
sends every reply at once. `status` and `plan` are answered on that thread, from the job book as it is (a read
of memory: no lock, the states are immutable values); every other verb is handled on the daemon's loop, each
request in a task of its own, so a `run` never waits for another client's `run` (its git calls, its fsync). Each
verb has at most `MAX_IN_FLIGHT` requests under way; while it has that many, its further requests wait their turn
in the subscription (a client flooding one verb takes that verb's slots, not other verbs'). The verbs that change
the user's repository or the worktrees (`ONE_AT_A_TIME`) are handled one at a time, in the order they came.

Every reply fits the server's max_payload: one that would not has its longest strings cut with a mark (lists are
paged by their handlers: `events` by bytes as well as count); one that still does not fit, or fails to send, is
logged with the request's subject and size and answered with a small `reply_too_large` error instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import uvloop
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request

from numerusd import __version__, logs, tracing
from numerusd.config import NatsAddress
from numerusd.dead_letters import DeadLetters
from numerusd.errors import BadRequest, CommandRefused, NatsUnavailable, NotFound, NumerusError, TooLarge, one_line
from numerusd.event_caps import shrink
from numerusd.handlers import HANDLERS
from numerusd.handlers.context import Context
from numerusd.protocol import commands, subjects
from numerusd.protocol.commands import REQUESTS, ErrorReply
from numerusd.protocol.connection import USER_HEADER, asker, server_urls
from numerusd.protocol.ids import new_ulid

log = logging.getLogger(__name__)

#: Requests of one verb handled at once; more wait in the subscription until one is answered.
MAX_IN_FLIGHT = 64
#: Verbs handled one at a time: two of them at once could move the same branch or remove the same worktree.
ONE_AT_A_TIME = frozenset({"accept", "discard", "clean"})
#: Verbs answered on the command thread, never waiting for the daemon's loop: their handlers read the job book
#: only (immutable job states), and change nothing.
ON_THREAD = frozenset({"status", "plan"})

#: A verb's handler (`numerusd.handlers`).
Handler = Callable[[Context, Any], Awaitable[Any]]

#: Room kept under the server's max_payload for a reply's headers.
_REPLY_HEADROOM = 4096

_DECODERS = {verb: msgspec.json.Decoder(request_type) for verb, request_type in REQUESTS.items()}
_encoder = msgspec.json.Encoder()


def _status(error: NumerusError) -> str:
    if isinstance(error, BadRequest):
        return "413" if isinstance(error, TooLarge) else "400"
    if isinstance(error, NotFound):
        return "404"
    if isinstance(error, CommandRefused):
        return "409"
    return "503"


def decode_request(verb: str, data: bytes | None) -> commands.Request:
    """The typed request `data` carries for `verb`; BadRequest, naming the bad path, for anything else."""
    try:
        return _DECODERS[verb].decode(data or b"{}")
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError; both name the bad path
        raise BadRequest(one_line(f"bad {verb} request: {e}")) from e


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """A request answered with an error: its status, code and sentence."""

    status: str
    code: str
    message: str


class CommandService:
    """The `numerus` micro service, served by a thread of its own: its own event loop and NATS connection.

    Reading requests and sending replies never waits for the daemon's loop, whatever the jobs have it doing
    (agents' output, spawns, git, projections). The verbs in `ON_THREAD` are answered right there, from the job
    book as it is (they read memory only); every other request is handled on the daemon's loop, as a task of its
    own, while the thread goes on answering (each verb has at most `MAX_IN_FLIGHT` under way; the verbs in
    `ONE_AT_A_TIME` one at a time). Use `await start()`, then `await stop()`.
    """

    def __init__(self, address: NatsAddress, context: Context, dead_letters: DeadLetters) -> None:
        self.address = address
        self.context = context
        self.dead_letters = dead_letters
        self._main: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the thread's
        self._stopping: asyncio.Event | None = None  # set on the thread's loop
        self._forwarding: set[asyncio.Task[None]] = set()  # on the thread's loop: requests under way on the daemon's

    async def start(self) -> None:
        """Connect and register every endpoint, in the thread; returns once the service answers."""
        self._main = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=uvloop.run, args=(self._serve(ready),), name="numerus commands")
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            raise

    async def stop(self) -> None:
        """Take no more requests, stop those under way (as the micro service stopped its handlers before), close."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)
        await asyncio.to_thread(self._thread.join)  # this loop runs meanwhile: its cancelled handlers end
        self._thread = None

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        """The thread's whole life: connect, serve until `stop()`, then stop the service and close."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        nc = Client()
        try:
            await nc.connect(
                server_urls(self.address.url),  # a cluster's nodes: fail over as the daemon's connection does
                name="numerusd commands",
                dont_randomize=True,  # the first node that answers, as the daemon's own connection
                connect_timeout=5,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,  # as the daemon's own connection: outages are weathered for ever
                error_cb=_log_nats_error,
                **self.address.options(),
            )
            service = await add_service(
                nc,
                name=subjects.SERVICE,
                version=__version__,
                description="Numerus daemon: runs coding agents on a goal, every state change an event",
            )
            for verb, handler in HANDLERS.items():
                await service.add_endpoint(
                    name=verb, subject=subjects.command(verb), handler=self._endpoint(nc, verb, handler)
                )
            # The server knows every endpoint before the daemon tells anyone where to ask (connection.json): a
            # client quick enough got "no responders" for a verb whose subscription was still on its way.
            await nc.flush()
        except BaseException as e:
            with contextlib.suppress(Exception):
                await nc.close()
            ready.set_exception(NatsUnavailable(f"cannot serve commands on {self.address.url}: {e}"))
            return
        ready.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            await service.stop()
            for task in list(self._forwarding):
                task.cancel()  # and with it the handler on the daemon's loop
            await asyncio.gather(*self._forwarding, return_exceptions=True)
            with contextlib.suppress(Exception):
                await nc.drain()

    def _endpoint(self, nc: Client, verb: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
        """What the subscription of `verb` calls (on the thread) for each request."""
        if verb in ON_THREAD:

            async def here(request: Request) -> None:
                answer = await self._answer(
                    verb, handler, request.data or b"{}", _asker(request), _traceparent(request)
                )
                await _send(nc, request, verb, answer)

            return here
        slots = asyncio.Semaphore(1 if verb in ONE_AT_A_TIME else MAX_IN_FLIGHT)

        async def forward(request: Request) -> None:
            await slots.acquire()  # while the verb has all its requests under way, the rest queue in NATS
            task = asyncio.ensure_future(self._forward(nc, verb, handler, request))
            self._forwarding.add(task)

            def done(task: asyncio.Task[None]) -> None:
                self._forwarding.discard(task)
                slots.release()

            task.add_done_callback(done)

        return forward

    async def _forward(self, nc: Client, verb: str, handler: Handler, request: Request) -> None:
        """Handle `request` on the daemon's loop, then reply from the thread."""
        assert self._main is not None
        answer = self._answer(verb, handler, request.data or b"{}", _asker(request), _traceparent(request))
        outcome = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(answer, self._main))
        await _send(nc, request, verb, outcome)

    async def _answer(
        self, verb: str, handler: Handler, data: bytes, who: str, traceparent: str
    ) -> msgspec.Struct | _Failure:
        """The reply to one request of `verb`, or the error it gets; never raises. Its log lines name the job (and
        task) it concerns, and it is one span of the caller's trace (`traceparent`)."""
        max_request = self.context.settings.max_request_bytes  # read each time: a reload may change it
        try:
            if len(data) > max_request:
                # Before decoding: a client must not make the daemon parse (and hold) megabytes per request.
                raise TooLarge(
                    f"the {verb} request is {len(data)} bytes, over the limit of {max_request} bytes "
                    "(max_request_bytes; a goal may hold at most 128 KiB)"
                )
            typed = decode_request(verb, data)
            concerns = logs.scope(**_concerns(self.context, typed), traceparent=traceparent)
            with concerns, tracing.span(subjects.command(verb)):
                return await handler(dataclasses.replace(self.context, asker=who), typed)
        except NumerusError as e:
            if isinstance(e, BadRequest):
                await self._on_main(self.dead_letters.keep("cmd", e.code, data, e.message))
            return _Failure(_status(e), e.code, e.message)
        except Exception:
            error_id = new_ulid()
            log.exception("internal error in %s (id=%s)", verb, error_id)
            return _Failure("500", "internal", f"internal error, see the daemon log, id={error_id}")

    async def _on_main(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on the daemon's loop (where its connection and JetStream context live) and wait for it."""
        if asyncio.get_running_loop() is self._main:
            await work
        else:
            assert self._main is not None
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._main))


async def start_service(address: NatsAddress, context: Context, dead_letters: DeadLetters) -> CommandService:
    """Serve one endpoint per verb on `numerus.cmd.<verb>`, each calling its handler with `context`."""
    service = CommandService(address, context, dead_letters)
    await service.start()
    return service


async def _log_nats_error(e: Exception) -> None:
    log.warning("NATS (commands): %s", e)


async def _send(nc: Client, request: Request, verb: str, outcome: msgspec.Struct | _Failure) -> None:
    if isinstance(outcome, _Failure):
        await _error(request, outcome.status, outcome.code, outcome.message)
    else:
        await _respond(nc, request, verb, outcome)


def reply_limit(nc: Client) -> int:
    """The most bytes a reply may take: the server's max_payload less room for headers."""
    return nc.max_payload - _REPLY_HEADROOM


def _asker(request: Request) -> str:
    """Who sent `request`: the user its header names, the role its reply inbox proves. nats-py's micro Request
    does not expose the reply subject, so it is read from the message it wraps."""
    reply = getattr(getattr(request, "_msg", None), "reply", None)
    return asker((request.headers or {}).get(USER_HEADER), reply)


def _concerns(context: Context, request: commands.Request) -> dict[str, str]:
    """The job (and task) a request names, for its log lines: a job by its whole id only (`last` or a prefix is
    resolved by the handler, which logs what it found)."""
    job, task = getattr(request, "job", None), getattr(request, "task", None)
    state = context.book.jobs.get(job) if isinstance(job, str) else None
    if state is None:
        return {"job": "", "task": ""}
    # A task by a name the job has: the client's text (up to max_request_bytes) never becomes every log line's.
    return {"job": job, "task": task if isinstance(task, str) and task in state.tasks else ""}


def _traceparent(request: Request) -> str:
    """The W3C trace context the request carries in its `traceparent` header, or "" (none, or not W3C-shaped)."""
    return tracing.checked((request.headers or {}).get(tracing.HEADER))


async def _respond(nc: Client, request: Request, verb: str, reply: msgspec.Struct) -> None:
    """Send `reply`, its longest strings cut if it would not fit the server's max_payload; if it still cannot be
    sent, log why with the request's subject and size and answer a small error instead."""
    body = _encoder.encode(reply)
    limit = reply_limit(nc)
    if len(body) > limit:
        body = _encoder.encode(shrink(reply, limit)[0])
    try:
        if len(body) > limit:
            raise ValueError(f"{len(body)} bytes after cutting its text, over the {limit} bytes the server takes")
        await request.respond(body)
    except Exception as e:
        log.warning(
            "reply to %s on %s (request of %d bytes, reply of %d bytes) not sent: %s",
            verb, request.subject, len(request.data or b""), len(body), e,
        )  # fmt: skip
        message = (
            f"the {verb} reply ({len(body)} bytes) does not fit in a NATS message ({nc.max_payload} bytes): "
            "ask for less (one job, a smaller --limit)"
        )
        await _error(request, "500", "reply_too_large", message)


async def _error(request: Request, status: str, code: str, message: str) -> None:
    message = one_line(message)  # it may quote what was sent; the micro service puts it in a header too
    body = _encoder.encode(ErrorReply(code=code, message=message))
    await request.respond_error(status, message, data=body)
