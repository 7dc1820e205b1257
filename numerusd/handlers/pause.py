"""`pause`: the job takes no new agent slot of the daemon; its running agents finish their step."""

from __future__ import annotations

from numerusd.domain.observations import Pause
from numerusd.handlers.context import Context
from numerusd.protocol.commands import PauseJob, PauseReply


async def handle(context: Context, request: PauseJob) -> PauseReply:
    """Record `JobPaused` with who asked; nothing is stopped (a kill does that)."""
    job = context.book.job(request.job)
    await context.book.decide(job.id, Pause(by=context.asker))
    context.jobs.queue_changed()
    return PauseReply(job=job.id, by=context.asker)
