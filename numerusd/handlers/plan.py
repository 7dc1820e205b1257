"""`plan`: a job's current plan as a DAG, drawn as text, Graphviz dot or Mermaid, with each task's status."""

from __future__ import annotations

from numerusd import plans
from numerusd.errors import BadRequest, NotFound
from numerusd.handlers.context import Context
from numerusd.protocol.commands import GetPlan, PlanReply

RENDERERS = {"text": plans.render_text, "dot": plans.render_dot, "mermaid": plans.render_mermaid}


async def handle(context: Context, request: GetPlan) -> PlanReply:
    """The plan the job's tasks were created from; NotFound while it is still being planned or on --no-plan."""
    render = RENDERERS.get(request.format)
    if render is None:
        raise BadRequest(f"unknown format {request.format!r}; use one of: {', '.join(RENDERERS)}")
    job = context.book.job(request.job)
    if job.plan is None or job.plan_hash is None:
        if not job.planned:
            raise NotFound(f"job {job.id} has no plan: it was run with --no-plan")
        raise NotFound(f"job {job.id} has no plan yet ({job.status}, {job.plan_attempts} planner answers so far)")
    return PlanReply(
        job=job.id,
        version=job.plan_version,
        hash=job.plan_hash,
        summary=job.plan.summary,
        statuses={task.id: task.status for task in job.tasks.values()},
        rendered=render(job.plan),
        status=job.status,
        approval=job.approval,
    )
