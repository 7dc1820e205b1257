"""`status`: one job or all jobs, as the fold of their events says they are; a queued job with its position in the
daemon's queue, computed from the queued jobs (numerusd.domain.queueing), never stored."""

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

_encode = msgspec.json.Encoder().encode


async def handle(context: Context, request: GetStatus) -> StatusReply:
    """Answered from the in-memory fold, so it costs the same with 10 or 100k events in the stream. A list may be
    only one repository's jobs (`repo`, as `run` recorded its path); `total` and `cleanable` then count its own.
    `queued` counts the daemon's whole queue."""
    agents = sorted(context.settings.agents)
    queue = {job.id: place for place, job in enumerate(domain.queue_order(context.book.jobs.values()), start=1)}
    if request.job is not None:
        view = _placed(domain.job_view(context.book.job(request.job)), queue)
        return StatusReply(jobs=[view], total=len(context.book.jobs), agents=agents, queued=len(queue))
    jobs = list(context.book.jobs.values())
    if request.repo is not msgspec.UNSET:
        jobs = [job for job in jobs if job.repo == request.repo]
    older: list[domain.JobState] = jobs
    if request.before:
        cursor = _order(context.book.job(request.before))
        older = [job for job in jobs if _order(job) < cursor]
    newest = heapq.nlargest(request.limit or len(jobs), older, key=_order)
    cleanable = sum(1 for job in jobs if domain.leftovers(job))
    listed: list[JobView] = []
    room = context.history.page_bytes()
    for job in newest:
        view = _placed(_short(domain.job_view(job, tasks=False)), queue)
        room -= len(_encode(view)) + 1
        if room < 0 and listed:  # the page is full: the client asks for the rest after the last job listed
            return StatusReply(
                jobs=listed, total=len(jobs), cleanable=cleanable, next=listed[-1].id, agents=agents, queued=len(queue)
            )
        listed.append(view)
    return StatusReply(jobs=listed, total=len(jobs), cleanable=cleanable, agents=agents, queued=len(queue))


def _placed(view: JobView, queue: dict[str, int]) -> JobView:
    """The view with its position in the queue, while it is queued."""
    if view.id not in queue:
        return view
    return msgspec.structs.replace(view, queue_position=queue[view.id], queue_length=len(queue))


def _order(job: domain.JobState) -> tuple[object, str]:
    # Newest first, and the id breaks ties, so a cursor names one place in the list.
    return job.created, job.id


def _short(view: JobView) -> JobView:
    if len(view.goal) <= LISTED_TEXT and len(view.reason or "") <= LISTED_TEXT:
        return view
    reason = None if view.reason is None else cut_text(view.reason, LISTED_TEXT)
    return msgspec.structs.replace(view, goal=cut_text(view.goal, LISTED_TEXT), reason=reason)
