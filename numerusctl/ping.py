"""`numerusctl ping`: whether numerusd is up and serving, for a container's HEALTHCHECK or a monitor.

It asks what `nats micro ping numerus` asks, `$SRV.PING.numerus`, a request the NATS micro framework answers on
the daemon's own connection and event loop: an answer proves that the daemon runs, is connected to its bus and
serves its endpoints, and costs the daemon no view, no event, nothing a command would. A viewer may ask it
(`numerusd/bus_roles.py`: the service's discovery subjects are in every role's allow list) and no client may
answer it: no role may subscribe to anything but its own inbox, so on the embedded server, or a shared one
configured as `deploy/nats-server.conf`, only the daemon's login can serve `$SRV.PING.numerus`.

An answer that is not a micro ping reply of the `numerus` service (something else answering on a server that
lets anyone subscribe) is refused with one line, as is no answer within the timeout.
"""

from __future__ import annotations

import time

import msgspec
import nats.errors
from nats.aio.client import Client

from numerusctl.connection import CtlError, Unreachable, server_of, unless_refused
from numerusd.protocol import subjects

#: The `type` of a NATS micro service's answer to a ping.
PING_RESPONSE_TYPE = "io.nats.micro.v1.ping_response"


class Pong(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon's answer to a ping, as the micro framework sends it, with the round trip measured here."""

    name: str
    id: str
    version: str
    type: str
    #: Milliseconds from sending the ping to reading its answer (0 in the daemon's own reply: measured here).
    round_trip_ms: float = 0.0


_decoder = msgspec.json.Decoder(Pong)


async def ping(nc: Client, timeout: float) -> Pong:
    """Ping numerusd's micro service once: its answer, or Unreachable (nothing answered in `timeout` seconds),
    or CtlError (the server refused the ping to this login, or what answered is not numerusd's service)."""
    subject = subjects.service_ping()
    started = time.perf_counter()
    try:
        reply = await unless_refused(nc, subject, nc.request(subject, b"", timeout=timeout))
    except nats.errors.NoRespondersError:
        raise Unreachable(f"numerusd is not serving on {server_of(nc)}: nothing answers {subject}") from None
    except nats.errors.TimeoutError:
        raise Unreachable(f"numerusd did not answer {subject} within {timeout:g} s") from None
    round_trip_ms = (time.perf_counter() - started) * 1000
    try:
        pong = _decoder.decode(reply.data)
    except msgspec.DecodeError as e:
        raise CtlError(f"what answered {subject} is not a NATS micro service's ping reply ({e})") from None
    if pong.type != PING_RESPONSE_TYPE or pong.name != subjects.SERVICE:
        what = f"type {pong.type[:60]!r}, name {pong.name[:60]!r}"  # cut: it is whatever answered's own words
        raise CtlError(f"what answered {subject} is not numerusd's service ({what})")
    return msgspec.structs.replace(pong, round_trip_ms=round(round_trip_ms, 3))
