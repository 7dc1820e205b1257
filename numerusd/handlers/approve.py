"""`approve`: the job goes on from where it waits for approval (its plan, its merge, a token cap), or one task that
waits for approval after its escalation makes one more attempt. Recorded with who approved."""

from __future__ import annotations

from numerusd.domain.observations import Approve
from numerusd.handlers.context import Context
from numerusd.protocol.commands import ApproveJob, ApproveReply


async def handle(context: Context, request: ApproveJob) -> ApproveReply:
    """Decide and append, then wake the job's pipeline, which waits on the job's status."""
    job = context.book.job(request.job)
    approve = Approve(by=context.asker, task=request.task, add_tokens=request.add_tokens)
    await context.book.decide(job.id, approve)  # refused unless the job (or the task) awaits approval
    context.jobs.wake(job.id)
    gate = "task" if request.task is not None else job.approval or ""
    return ApproveReply(job=job.id, gate=gate, task=request.task, added_tokens=request.add_tokens or 0)
