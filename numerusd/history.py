"""The stored history, read back: a page of events exactly as JetStream holds them (the `events` verb)."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from numerusd.protocol.commands import EventsReply
from numerusd.protocol.subjects import EVENTS
from numerusd.stream_reader import StreamReader


class EventHistory:
    """Reads stored events from the events stream, filtered by subject."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    def page_bytes(self) -> int:
        """The bytes a page of a list (events, jobs) may take: half the server's max_payload, leaving room for
        the rest of the reply and its headers."""
        return self.nc.max_payload // 2

    async def read(self, subject: str, after_seq: int, limit: int, max_bytes: int | None = None) -> EventsReply:
        """Up to `limit` stored events on `subject` after stream sequence `after_seq`, and no more than `max_bytes`
        of them (default: `page_bytes`); at least one."""
        budget = self.page_bytes() if max_bytes is None else max_bytes
        events: list[msgspec.Raw] = []
        seqs: list[int] = []
        last_seq = after_seq
        more = False
        taken = 0
        async with StreamReader(self.nc, EVENTS, start_seq=after_seq + 1, filter_subjects=[subject]) as reader:
            async for batch in reader:
                for message in batch:
                    # Each event is under the event cap, so a page of one always fits; `more` sends for the rest.
                    taken += len(message.data) + 24  # its JSON, a comma and its sequence number
                    if len(events) == limit or (events and taken > budget):
                        more = True
                        break
                    events.append(msgspec.Raw(message.data))
                    seqs.append(message.seq)
                    last_seq = message.seq
                if more:
                    break
        return EventsReply(events=events, seqs=seqs, last_seq=last_seq, more=more)
