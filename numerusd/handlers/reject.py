"""`reject`: the job that waits for approval fails there (a budget's agents are stopped as `kill` stops them), or
one task that waits for approval fails and its dependents are skipped. Recorded with who rejected, and why."""

from __future__ import annotations

from numerusd.domain.observations import Reject
from numerusd.handlers.context import Context
from numerusd.protocol.commands import RejectJob, RejectReply
from numerusd.protocol.events import JobRejected


async def handle(context: Context, request: RejectJob) -> RejectReply:
    """Decide, append, then act: a rejected budget stops the job's agents once the rejection is durable."""
    job = context.book.job(request.job)
    sealed = await context.book.decide(job.id, Reject(by=context.asker, task=request.task, reason=request.reason))
    gate = next((event.envelope.data.gate for event in sealed if isinstance(event.envelope.data, JobRejected)), "task")
    if gate == "budget":
        context.jobs.stop_agents(job.id)
    context.jobs.wake(job.id)
    return RejectReply(job=job.id, gate=gate, task=request.task)
