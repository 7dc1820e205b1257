"""`skip`: a task will not run; the tasks that depend on it go on without it."""

from __future__ import annotations

from numerusd.domain.observations import Skip
from numerusd.handlers.context import Context
from numerusd.protocol.commands import SkipReply, SkipTask
from numerusd.protocol.events import TaskRetryRequested


async def handle(context: Context, request: SkipTask) -> SkipReply:
    """Record `TaskSkipped` with who asked (and reopen the dependents a failure had skipped), then wake the job."""
    job = context.book.job(request.job)
    sealed = await context.book.decide(job.id, Skip(by=context.asker, task=request.task))
    context.jobs.stop_agents(job.id, request.task)  # a claim it was being asked for is not waited for
    context.jobs.wake(job.id)
    reopened = [event.envelope.task or "" for event in sealed if isinstance(event.envelope.data, TaskRetryRequested)]
    return SkipReply(job=job.id, task=request.task, tasks=reopened, status=context.book.jobs[job.id].status)
