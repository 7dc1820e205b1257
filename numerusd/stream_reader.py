"""Reading a stream fast: the lean pull loop behind startup replay, audits, projections and `--follow`.

nats-py's `fetch()` creates a future, a task and a timeout per message and tops out near 20k msg/s on a small
machine; replaying a long job history through it makes startup slow. This reader does the minimum instead:

* one ephemeral consumer (AckNone, in memory, deleted by the server after `inactive_threshold` if we vanish),
  delivering from a start sequence, optionally filtered;
* one wildcard inbox subscription, drained in bulk straight from its queue (no per-message callback);
* pull requests sent with a plain `publish` to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, each to its own
  inbox token so a status reply (404 no messages, 408 expired, 409 …) tells which request ended; a second request
  is already waiting while the first is being delivered, so the server never idles;
* the stream sequence and the count still pending taken from the reply subject, with no JSON and no header look-up.

It yields `list[StreamMessage]`, whatever has arrived, until the consumer reports nothing pending (catch-up),
or forever with `follow=True`. A consumer lost with a restarted server is re-created after the last sequence seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from numerusd.errors import NumerusError
from numerusd.streams import jetstream_errors


class StreamMessage(NamedTuple):
    """One stored message: its stream sequence, subject, payload and storage time (ns since the epoch)."""

    seq: int
    subject: str
    data: bytes
    time_ns: int


#: Messages asked for per pull request; two requests are outstanding, so up to twice this is in flight.
DEFAULT_BATCH = 2_000
#: How long one pull request waits on the server for messages before it answers 408.
DEFAULT_EXPIRES = 5.0
#: The server deletes our consumer this long after we stop pulling (a crashed reader leaves no litter).
INACTIVE_THRESHOLD = 30.0
#: No message and no status for this long past a request's expiry means the server forgot us (restart).
_WATCHDOG_GRACE = 2.0


class StreamReader:
    """An ephemeral pull consumer on `stream` and the loop that drains it; iterate it for batches.

    Use it as an async context manager so the consumer and subscription are removed promptly::

        async with StreamReader(nc, "NUMERUS_EVENTS", start_seq=1) as reader:
            async for batch in reader:
                for msg in batch:
                    ...
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        *,
        start_seq: int = 1,
        filter_subjects: Sequence[str] = (),
        follow: bool = False,
        batch: int = DEFAULT_BATCH,
        expires: float = DEFAULT_EXPIRES,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._next_seq = max(1, start_seq)
        self._filters = list(filter_subjects)
        self._follow = follow
        self._batch = batch
        self._expires = expires
        self._consumer = ""
        self._next_subject = ""
        self._sub: Subscription | None = None
        self._inbox = ""
        # Outstanding pull requests, oldest first: request token -> messages it may still deliver.
        self._requests: dict[str, int] = {}
        self._request_counter = 0
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The stream sequence of the last message yielded (start_seq - 1 before any)."""
        return self._next_seq - 1

    async def __aenter__(self) -> StreamReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[list[StreamMessage]]:
        return self._batches()

    async def close(self) -> None:
        """Unsubscribe and delete the consumer (the server would also drop it after INACTIVE_THRESHOLD)."""
        if self._closed:
            return
        self._closed = True
        await self._drop_consumer()

    async def _drop_consumer(self) -> None:
        sub, self._sub = self._sub, None
        self._requests.clear()
        if sub is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._consumer and self._nc.is_connected:
            # Fire and forget: waiting for the answer would stall a re-creation after a server restart for a
            # whole request timeout, and the inactive threshold removes the consumer anyway.
            with contextlib.suppress(Exception):
                await self._nc.publish(f"$JS.API.CONSUMER.DELETE.{self._stream}.{self._consumer}", b"")
        self._consumer = ""

    async def _create_consumer(self) -> int:
        """(Re)create the consumer from `_next_seq`; return how many messages it has to deliver."""
        config = ConsumerConfig(
            name=f"numerus_read_{self._nc._nuid.next().decode()}",
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next_seq,
            inactive_threshold=INACTIVE_THRESHOLD,
            mem_storage=True,
            num_replicas=1,
            max_waiting=16,
        )
        if len(self._filters) == 1:
            config.filter_subject = self._filters[0]
        elif self._filters:
            config.filter_subjects = self._filters
        with jetstream_errors(f"create a reader on stream {self._stream}"):
            info = await self._nc.jsm().add_consumer(self._stream, config)
        self._consumer = info.name
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}"
        self._inbox = self._nc.new_inbox()
        # No callback: the loop below drains the subscription's queue itself, in bulk.
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*", pending_msgs_limit=4 * self._batch + 64, pending_bytes_limit=0
        )
        return info.num_pending

    async def _request(self) -> None:
        self._request_counter += 1
        token = str(self._request_counter)
        self._requests[token] = self._batch
        body = json.dumps({"batch": self._batch, "expires": int(self._expires * 1e9)}).encode()
        await self._nc.publish(self._next_subject, body, reply=f"{self._inbox}.{token}")

    async def _top_up(self) -> None:
        # Keep two requests' worth of credit outstanding so the server streams without pause.
        while len(self._requests) < 2:
            await self._request()

    async def _batches(self) -> AsyncIterator[list[StreamMessage]]:
        try:
            pending = await self._create_consumer()
            if pending == 0 and not self._follow:
                return
            await self._top_up()
            while not self._closed:
                batch, caught_up = await self._receive()
                if batch:
                    self._next_seq = batch[-1].seq + 1
                    yield batch
                if caught_up and not self._follow:
                    return
                await self._top_up()
        finally:
            await self.close()

    async def _receive(self) -> tuple[list[StreamMessage], bool]:
        """Wait for at least one message or status, then take everything already queued."""
        assert self._sub is not None
        queue = self._sub._pending_queue
        try:
            first = await asyncio.wait_for(queue.get(), self._expires + _WATCHDOG_GRACE)
        except TimeoutError:
            # Neither data nor a 408 arrived after the request's expiry: the server lost the consumer
            # (a restart of an in-memory consumer); start again after the last message we have.
            await self._recreate()
            return [], False
        out: list[StreamMessage] = []
        caught_up = False
        requests = self._requests
        delivered = 0
        msg: Msg | None = first
        while msg is not None:
            queue.task_done()
            reply = msg.reply
            if reply:
                # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form
                # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<rnd>
                parts = reply.split(".")
                base = 4 if len(parts) == 9 else 6
                out.append(StreamMessage(int(parts[base + 1]), msg.subject, msg.data, int(parts[base + 3])))
                caught_up = parts[base + 4] == "0"
                delivered += 1
            else:
                self._count(delivered)
                delivered = 0
                if out:
                    self._next_seq = out[-1].seq + 1  # a re-created consumer must start after these
                # A status reply comes on the request's own inbox subject, which names the request.
                sub = self._sub
                await self._status(msg, msg.subject[len(self._inbox) + 1 :])
                if self._sub is not sub:
                    break  # the consumer was re-created: what is left in the old queue is stale
                if not requests and not self._follow and not out:
                    # Every request ended with nothing delivered: nothing (more) to read.
                    caught_up = True
            try:
                msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                msg = None
        self._count(delivered)
        return out, caught_up

    def _count(self, delivered: int) -> None:
        # A delivery arrives on the stored message's own subject, so it cannot name its request; the server
        # serves requests in order, so deliveries use up the oldest requests first.
        requests = self._requests
        while delivered and requests:
            token = next(iter(requests))
            left = requests[token]
            if left > delivered:
                requests[token] = left - delivered
                return
            del requests[token]
            delivered -= left

    async def _status(self, msg: Msg, token: str) -> None:
        """A status reply: 404/408 end a request, 409 ends it or says the consumer is gone, 503 that it is gone,
        100 is a heartbeat."""
        headers = msg.headers or {}
        code = headers.get("Status", "")
        if code == "100":
            return
        self._requests.pop(token, None)
        if code in ("404", "408"):
            return
        description = headers.get("Description", "")
        if code == "503" or (code == "409" and "Deleted" in description):
            # No responders: the consumer is gone (a restarted server forgets in-memory consumers).
            await self._recreate()

    async def _recreate(self) -> None:
        """Replace a consumer the server lost; when following, keep trying until the server is back."""
        await self._drop_consumer()
        delay = 0.05
        while True:
            try:
                await self._create_consumer()
                return
            except NumerusError:
                if not self._follow or self._closed:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def read_stream(
    nc: Client,
    stream: str,
    *,
    start_seq: int = 1,
    filter_subjects: Sequence[str] = (),
    follow: bool = False,
    batch: int = DEFAULT_BATCH,
) -> AsyncIterator[list[StreamMessage]]:
    """Yield batches of `stream` from `start_seq` until caught up (or forever with `follow`)."""
    async with StreamReader(
        nc, stream, start_seq=start_seq, filter_subjects=filter_subjects, follow=follow, batch=batch
    ) as reader:
        async for messages in reader:
            yield messages


async def last_sequence(js: JetStreamContext, stream: str) -> int:
    """The sequence of the last message stored in `stream` (0 when empty)."""
    with jetstream_errors(f"read the state of stream {stream}"):
        info = await js.stream_info(stream)
    return info.state.last_seq
