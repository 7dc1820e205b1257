"""`resume`: an interrupted job goes on where it was (with `resume = "manual"`, or after `resume` was off)."""

from __future__ import annotations

from numerusd.domain.observations import Resume
from numerusd.handlers.context import Context
from numerusd.protocol.commands import ResumeJob, ResumeReply


async def handle(context: Context, request: ResumeJob) -> ResumeReply:
    """Record `JobResumed`, then run the job's pipeline from its last recorded steps."""
    job = context.book.job(request.job)
    await context.book.decide(job.id, Resume(by=context.asker))
    context.jobs.wake(job.id)
    return ResumeReply(job=job.id, status=context.book.jobs[job.id].status)
