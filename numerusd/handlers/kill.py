"""`kill`: record the request, then stop the job's agents (TERM to their process groups, then KILL)."""

from __future__ import annotations

from numerusd.handlers.context import Context
from numerusd.protocol.commands import KillJob, KillReply


async def handle(context: Context, request: KillJob) -> KillReply:
    """Decide, append, then act: the agents are stopped after `KillRequested` is durable."""
    job = context.book.job(request.job)
    await context.book.decide(job.id, request)
    stopping = context.jobs.stop_agents(job.id)
    return KillReply(job=job.id, tasks=stopping)
