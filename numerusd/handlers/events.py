"""`events`: a page of a job's events (or all jobs') exactly as stored in the stream."""

from __future__ import annotations

from numerusd.errors import BadRequest
from numerusd.handlers.context import Context
from numerusd.protocol import subjects
from numerusd.protocol.commands import EventsReply, GetEvents


async def handle(context: Context, request: GetEvents) -> EventsReply:
    """Read from JetStream itself (filtered by subject), so the reply is the record, not a copy of it."""
    if not 0 < request.limit <= 5000:
        raise BadRequest("limit must be between 1 and 5000")
    if request.after_seq < 0:
        raise BadRequest("after_seq must be 0 or more")
    subject = subjects.job_events(None if request.job is None else context.book.job(request.job).id)
    return await context.history.read(subject, request.after_seq, request.limit)
