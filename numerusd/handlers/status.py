"""`status`: one job or all jobs, as the fold of their events says they are."""

from __future__ import annotations

import heapq

from numerusd import domain
from numerusd.handlers.context import Context
from numerusd.protocol.commands import GetStatus, StatusReply


async def handle(context: Context, request: GetStatus) -> StatusReply:
    """Answered from the in-memory fold, so it costs the same with 10 or 100k events in the stream."""
    jobs = context.book.jobs
    if request.job is not None:
        return StatusReply(jobs=[domain.job_view(context.book.job(request.job))], total=len(jobs))
    newest = heapq.nlargest(request.limit or len(jobs), jobs.values(), key=lambda job: job.created)
    cleanable = sum(1 for job in jobs.values() if domain.leftovers(job))
    return StatusReply(jobs=[domain.job_view(job, tasks=False) for job in newest], total=len(jobs), cleanable=cleanable)
