"""`retry`: failed, killed or interrupted tasks get new attempts; an ended job reopens."""

from __future__ import annotations

from numerusd.domain.observations import Retry
from numerusd.handlers.context import Context
from numerusd.protocol.commands import RetryJob, RetryReply
from numerusd.protocol.events import TaskRetryRequested


async def handle(context: Context, request: RetryJob) -> RetryReply:
    """Record `TaskRetryRequested` for each task that runs again (`JobReopened` first for an ended job), then
    give the job's pipeline its new work."""
    job = context.book.job(request.job)
    sealed = await context.book.decide(job.id, Retry(by=context.asker, tasks=tuple(request.tasks)))
    context.jobs.wake(job.id)
    retried = [event.envelope.task or "" for event in sealed if isinstance(event.envelope.data, TaskRetryRequested)]
    return RetryReply(job=job.id, tasks=retried, status=context.book.jobs[job.id].status)
