"""`start`: a paused job goes on; a queued job moves to the front of the daemon's queue."""

from __future__ import annotations

from numerusd.domain.observations import Start
from numerusd.handlers.context import Context
from numerusd.protocol.commands import StartJob, StartReply
from numerusd.protocol.events import JobPromoted


async def handle(context: Context, request: StartJob) -> StartReply:
    """Record `JobUnpaused` or `JobPromoted` with who asked, then hand out the free agent slots again."""
    job = context.book.job(request.job)
    sealed = await context.book.decide(job.id, Start(by=context.asker))
    context.jobs.queue_changed()
    promoted = any(isinstance(event.envelope.data, JobPromoted) for event in sealed)
    return StartReply(job=job.id, by=context.asker, promoted=promoted)
