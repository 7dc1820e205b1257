"""How numerusctl reads the streams itself: following a job, its logs or every event, and auditing the history.

One reader, `StreamFeed`: a JetStream ordered consumer. Ordered consumers are ephemeral, in memory and never
acknowledged: nothing is left behind on the server and nothing a reader does can disturb the daemon's own
consumers. The stream names and subjects are the protocol's (`numerusd.protocol.subjects`); every failure is
a `CtlError`. Only the commands that read a stream import this module (`status` and the like never do).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from numerusctl.connection import CtlError, Unreachable, server_of


def _no_stream(nc: Client, stream: str) -> CtlError:
    return CtlError(f"stream {stream} does not exist on {server_of(nc)}: has numerusd ever run against this server?")


class Stored(NamedTuple):
    """One message as JetStream stores it."""

    seq: int
    subject: str
    data: bytes


class StreamFeed:
    """An ordered consumer on one stream and subject filter, from a start sequence, handing out batches.

    Messages are collected by a callback (far cheaper in nats-py than `next_msg`) and handed out in whatever
    batches have arrived.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        subject: str,
        start_seq: int = 1,
        *,
        only: Literal["last", "new"] | None = None,
        since: datetime | None = None,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._subject = subject
        self._start_seq = start_seq
        #: `last`: from the last message stored on the subject; `new`: only what is stored from now on; `since`:
        #: what was stored from that time on.
        self._only = only
        self._since = since
        self._ready: list[Stored] = []
        self._arrived = asyncio.Event()
        self._caught_up = False
        self._last_seq = 0
        self._sub: Any = None

    async def __aenter__(self) -> StreamFeed:
        if self._since is not None:
            start = self._since.astimezone(UTC).isoformat().replace("+00:00", "Z")
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        elif self._only is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST if self._only == "last" else DeliverPolicy.NEW)
        else:
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
