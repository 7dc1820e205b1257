"""Dead letters: inputs Numerus rejected, kept on `numerus.dlq.<source>.<reason>` with why, for an operator.

A request that does not decode (`cmd`), an event the projector cannot apply (`projector`): each is published
to the `NUMERUS_DLQ` stream with its reason and fields as headers. An input larger than MAX_KEPT bytes is kept
cut to that size, its whole size and SHA-256 in the headers `Numerus-Size` and `Numerus-Sha256` (the stream
refuses larger messages, and is bounded in bytes: see streams.py). Keeping one is best effort: a dead letter
that cannot be stored is logged, never fatal.
"""

from __future__ import annotations

import hashlib
import logging

from nats.js import JetStreamContext

from numerusd.errors import one_line
from numerusd.metrics import Metrics
from numerusd.protocol import subjects
from numerusd.protocol.ids import new_ulid
from numerusd.streams import DLQ_MAX_MSG_SIZE

log = logging.getLogger(__name__)

#: The most bytes of a rejected input kept; the rest of the stream's message size is left for the headers.
MAX_KEPT = DLQ_MAX_MSG_SIZE // 2


class DeadLetters:
    """Publishes rejected inputs to the dead-letter stream."""

    def __init__(self, js: JetStreamContext, metrics: Metrics | None = None) -> None:
        self.js = js
        self.metrics = metrics or Metrics()

    async def keep(self, source: str, reason: str, data: bytes, message: str, **fields: object) -> None:
        """Keep a rejected input on `numerus.dlq.<source>.<reason>` with why, for an operator to look at."""
        self.metrics.dead_letters.labels(source, reason).inc()
        headers = {"Numerus-Reason": one_line(message), "Numerus-Id": new_ulid()}
        headers |= {f"Numerus-{key.title()}": one_line(str(value)) for key, value in fields.items()}
        if len(data) > MAX_KEPT:
            headers |= {"Numerus-Size": str(len(data)), "Numerus-Sha256": hashlib.sha256(data).hexdigest()}
            data = data[:MAX_KEPT]
        try:
            await self.js.publish(subjects.dlq(source, reason), data, headers=headers)
        except Exception as e:  # a dead letter that cannot be kept is logged, never fatal
            log.warning("dead letter %s.%s not stored: %s", source, reason, e)
