"""`status`: one job or all jobs, as the fold of their events says they are."""

from __future__ import annotations

import heapq

import msgspec

from numerusd import domain
from numerusd.event_caps import cut_text
from numerusd.handlers.context import Context
from numerusd.protocol.commands import GetStatus, JobView, StatusReply

#: Characters of a goal or a reason a list of jobs shows (one job shows them whole): a list of many jobs with long
#: goals must still fit in one reply, and a table shows the first 60 anyway.
LISTED_TEXT = 1000


async def handle(context: Context, request: GetStatus) -> StatusReply:
    """Answered from the in-memory fold, so it costs the same with 10 or 100k events in the stream."""
    jobs = context.book.jobs
    if request.job is not None:
        return StatusReply(jobs=[domain.job_view(context.book.job(request.job))], total=len(jobs))
    newest = heapq.nlargest(request.limit or len(jobs), jobs.values(), key=lambda job: job.created)
    cleanable = sum(1 for job in jobs.values() if domain.leftovers(job))
    listed = [_short(domain.job_view(job, tasks=False)) for job in newest]
    return StatusReply(jobs=listed, total=len(jobs), cleanable=cleanable)


def _short(view: JobView) -> JobView:
    if len(view.goal) <= LISTED_TEXT and len(view.reason or "") <= LISTED_TEXT:
        return view
    reason = None if view.reason is None else cut_text(view.reason, LISTED_TEXT)
    return msgspec.structs.replace(view, goal=cut_text(view.goal, LISTED_TEXT), reason=reason)
