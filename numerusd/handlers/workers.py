"""`workers`: the remote workers this daemon has heard from, their pools and capacity, what each runs, and when
each was last heard of (numerusd/dispatch.py keeps them from their heartbeats)."""

from __future__ import annotations

from numerusd.handlers.context import Context
from numerusd.protocol.commands import ListWorkers, WorkersReply


async def handle(context: Context, request: ListWorkers) -> WorkersReply:
    """Answered from what the heartbeats said; none heard from (or no dispatcher): an empty list."""
    return context.workers.view() if context.workers is not None else WorkersReply(workers=[])
