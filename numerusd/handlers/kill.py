"""`kill`: record the request, then stop the job's agents (TERM to their process groups, then KILL); with a task,
that task's agents alone."""

from __future__ import annotations

from numerusd.domain.observations import Kill
from numerusd.handlers.context import Context
from numerusd.protocol.commands import KillJob, KillReply


async def handle(context: Context, request: KillJob) -> KillReply:
    """Decide, append, then act: the agents are stopped after `KillRequested` (or `TaskKillRequested`) is durable."""
    job = context.book.job(request.job)
    await context.book.decide(job.id, Kill(by=context.asker, task=request.task))
    stopping = context.jobs.stop_agents(job.id, request.task)
    return KillReply(job=job.id, tasks=stopping)
