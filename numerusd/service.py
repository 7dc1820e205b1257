"""The `numerus` NATS micro service: decodes requests at the edge and turns every failure into a clear reply.

A request that does not decode gets a reply naming the bad path (`$.goal`) and is also sent, with its reason,
to `numerus.dlq.cmd.<reason>`. A refused command gets its sentence. Anything else is logged with its traceback
and answered "internal error, see the daemon log, id=…": no raw exception ever reaches the wire.
"""

from __future__ import annotations

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
from numerusd.errors import BadRequest, CommandRefused, NotFound, NumerusError, one_line
from numerusd.handlers import HANDLERS
from numerusd.handlers.context import Context
from numerusd.protocol import commands, subjects
from numerusd.protocol.commands import REQUESTS, ErrorReply
from numerusd.protocol.ids import new_ulid

log = logging.getLogger(__name__)

_DECODERS = {verb: msgspec.json.Decoder(request_type) for verb, request_type in REQUESTS.items()}
_encoder = msgspec.json.Encoder()


def _status(error: NumerusError) -> str:
    if isinstance(error, BadRequest):
        return "400"
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


async def start_service(nc: Client, context: Context, dead_letters: DeadLetters) -> Service:
    """Register one endpoint per verb on `numerus.cmd.<verb>`, each calling its handler with `context`."""
    service = await add_service(
        nc,
        name="numerus",
        version=__version__,
        description="Numerus daemon: runs coding agents on a goal, every state change an event",
    )
    for verb, handler in HANDLERS.items():
        endpoint = _endpoint(nc, context, dead_letters, verb, handler)
        await service.add_endpoint(name=verb, subject=subjects.command(verb), handler=endpoint)
    return service


def _endpoint(
    nc: Client,
    context: Context,
    dead_letters: DeadLetters,
    verb: str,
    handler: Callable[[Context, Any], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    async def endpoint(request: Request) -> None:
        try:
            reply = await handler(context, decode_request(verb, request.data))
        except NumerusError as e:
            if isinstance(e, BadRequest):
                await dead_letters.keep("cmd", "bad_request", request.data, e.message)
            await _error(request, _status(e), e.code, e.message)
            return
        except Exception:
            error_id = new_ulid()
            log.exception("internal error in %s (id=%s)", verb, error_id)
            await _error(request, "500", "internal", f"internal error, see the daemon log, id={error_id}")
            return
        body = _encoder.encode(reply)
        if len(body) > nc.max_payload:
            # NATS would refuse to carry it, and the caller would get an empty error: say what to ask instead.
            message = f"the {verb} reply is {len(body)} bytes, more than NATS carries ({nc.max_payload}); ask for less"
            await _error(request, "413", "too_large", f"{message} (one job, --limit, --tail)")
            return
        await request.respond(body)

    return endpoint


async def _error(request: Request, status: str, code: str, message: str) -> None:
    message = one_line(message)  # it may quote what was sent; the micro service puts it in a header too
    body = _encoder.encode(ErrorReply(code=code, message=message))
    await request.respond_error(status, message, data=body)
