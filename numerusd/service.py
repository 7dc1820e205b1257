"""The `numerus` NATS micro service: decodes requests at the edge and turns every failure into a clear reply.

A request larger than `max_request_bytes` is refused before it is decoded (`too_large`, naming the limit); one
that does not decode gets a reply naming the bad path (`$.goal`); both are also sent, with their reason, to
`numerus.dlq.cmd.<reason>` (cut to the dead letters' size cap). A refused command gets its sentence. Anything else
is logged with its traceback and answered "internal error, see the daemon log, id=…": no raw exception ever
reaches the wire.

Requests are answered side by side: each is handled in a task of its own, so a `status` or a `run` never waits
for another client's `run` (its git calls, its fsync) to finish. Each verb has at most `MAX_IN_FLIGHT` requests
under way; while it has that many, its further requests wait their turn in the subscription (a client flooding one
verb takes its slots, not the daemon's loop, nor other verbs'). The verbs that change the user's repository or the
worktrees (`ONE_AT_A_TIME`) are still handled one at a time, in the order they came.

Every reply fits the server's max_payload: one that would not has its longest strings cut with a mark (lists are
paged by their handlers: `events` by bytes as well as count); one that still does not fit, or fails to send, is
logged with the request's subject and size and answered with a small `reply_too_large` error instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from numerusd import __version__
from numerusd.dead_letters import DeadLetters
from numerusd.errors import BadRequest, CommandRefused, NotFound, NumerusError, TooLarge, one_line
from numerusd.event_caps import shrink
from numerusd.handlers import HANDLERS
from numerusd.handlers.context import Context
from numerusd.protocol import commands, subjects
from numerusd.protocol.commands import REQUESTS, ErrorReply
from numerusd.protocol.connection import USER_HEADER, asker
from numerusd.protocol.ids import new_ulid

log = logging.getLogger(__name__)

#: Requests of one verb handled at once; more wait in the subscription until one is answered.
MAX_IN_FLIGHT = 64
#: Verbs handled one at a time: two of them at once could move the same branch or remove the same worktree.
ONE_AT_A_TIME = frozenset({"accept", "discard", "clean"})

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


class CommandService:
    """The `numerus` micro service and the requests it is answering; `stop()` ends both."""

    def __init__(self, service: Service) -> None:
        self.service = service
        #: The requests under way, each in its own task.
        self.answering: set[asyncio.Task[None]] = set()

    def answer(self, verb: str, work: Awaitable[None], slots: asyncio.Semaphore) -> None:
        """Run `work` (the handling of one request, holding one of its verb's `slots`) in a task of its own."""
        task = asyncio.ensure_future(work)
        task.set_name(f"numerus.cmd.{verb}")
        self.answering.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self.answering.discard(task)
            slots.release()

        task.add_done_callback(done)

    async def stop(self) -> None:
        """Take no more requests, then stop those under way (as the micro service stopped its handlers before)."""
        await self.service.stop()
        for task in list(self.answering):
            task.cancel()
        await asyncio.gather(*self.answering, return_exceptions=True)


async def start_service(nc: Client, context: Context, dead_letters: DeadLetters) -> CommandService:
    """Register one endpoint per verb on `numerus.cmd.<verb>`, each calling its handler with `context`."""
    service = CommandService(
        await add_service(
            nc,
            name="numerus",
            version=__version__,
            description="Numerus daemon: runs coding agents on a goal, every state change an event",
        )
    )
    for verb, handler in HANDLERS.items():
        endpoint = _endpoint(nc, context, dead_letters, verb, handler)
        await service.service.add_endpoint(
            name=verb, subject=subjects.command(verb), handler=_side_by_side(service, verb, endpoint)
        )
    return service


def _side_by_side(
    service: CommandService, verb: str, endpoint: Callable[[Request], Awaitable[None]]
) -> Callable[[Request], Awaitable[None]]:
    """What the subscription of `verb` calls for each request: it returns once the request is under way in its own
    task, waiting first while the verb has all its requests under way (the rest then queue in NATS)."""
    slots = asyncio.Semaphore(1 if verb in ONE_AT_A_TIME else MAX_IN_FLIGHT)

    async def take(request: Request) -> None:
        await slots.acquire()
        service.answer(verb, endpoint(request), slots)

    return take


def reply_limit(nc: Client) -> int:
    """The most bytes a reply may take: the server's max_payload less room for headers."""
    return nc.max_payload - _REPLY_HEADROOM


def _endpoint(
    nc: Client,
    context: Context,
    dead_letters: DeadLetters,
    verb: str,
    handler: Callable[[Context, Any], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    async def endpoint(request: Request) -> None:
        data = request.data or b"{}"
        max_request = context.settings.max_request_bytes  # read each time: a reload may change it
        try:
            if len(data) > max_request:
                # Before decoding: a client must not make the daemon parse (and hold) megabytes per request.
                raise TooLarge(
                    f"the {verb} request is {len(data)} bytes, over the limit of {max_request} bytes "
                    "(max_request_bytes; a goal may hold at most 128 KiB)"
                )
            asked = dataclasses.replace(context, asker=_asker(request))
            reply = await handler(asked, decode_request(verb, data))
        except NumerusError as e:
            if isinstance(e, BadRequest):
                await dead_letters.keep("cmd", e.code, data, e.message)
            await _error(request, _status(e), e.code, e.message)
            return
        except Exception:
            error_id = new_ulid()
            log.exception("internal error in %s (id=%s)", verb, error_id)
            await _error(request, "500", "internal", f"internal error, see the daemon log, id={error_id}")
            return
        await _respond(nc, request, verb, reply)

    return endpoint


def _asker(request: Request) -> str:
    """Who sent `request`: the user its header names, the role its reply inbox proves. nats-py's micro Request
    does not expose the reply subject, so it is read from the message it wraps."""
    reply = getattr(getattr(request, "_msg", None), "reply", None)
    return asker((request.headers or {}).get(USER_HEADER), reply)


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
