"""`status`: one job or all jobs, as the fold of their events says they are; a queued job with its position in the
daemon's queue, computed from the queued jobs (numerusd.domain.queueing), never stored."""

from __future__ import annotations

import heapq

import msgspec

from numerusd import domain
from numerusd.config import Settings
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
    `queued` counts the daemon's whole queue.

    Answered on the command thread (`numerusd.service`) while the daemon's loop changes the book: every figure comes
    from one copy of it, taken at once (the job states themselves are immutable values)."""
    agents = sorted(context.settings.agents)
    every = list(context.book.jobs.values())  # one C call: the loop cannot add a job in the middle of it
    queue = {job.id: place for place, job in enumerate(domain.queue_order(every), start=1)}
    if request.job is not None:
        job = context.book.job(request.job)
        view = _placed(priced(domain.job_view(job), job, context.settings), queue)
        return StatusReply(jobs=[view], total=len(every), agents=agents, queued=len(queue))
    jobs = every
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
        view = _placed(_short(priced(domain.job_view(job, tasks=False), job, context.settings)), queue)
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


def priced(view: JobView, job: domain.JobState, settings: Settings) -> JobView:
    """`view` with what its tokens cost by the `prices` table: a task's at its profile's `model`, the job's own
    calls (planner, queen) at the planner's. Tokens of a profile without a `model`, or of a model with no price,
    cost nothing known: the job's cost is then None unless some of it is priced. Not recorded: prices change,
    and the cost is the tokens (which are recorded) times today's prices."""
    if not settings.prices:
        return view

    def cost(profile: str, input_tokens: int, cached: int, output_tokens: int) -> float | None:
        agent = settings.agents.get(profile)
        price = settings.prices.get(agent.model) if agent is not None and agent.model else None
        return None if price is None else price.cost(input_tokens, cached, output_tokens)

    own = cost(job.roles.get("planner", job.agent), job.input_tokens, job.cached_input_tokens, job.output_tokens)
    tasks = {
        task.id: cost(task.agent, task.input_tokens, task.cached_input_tokens, task.output_tokens)
        for task in job.tasks.values()
    }
    known = [value for value in (own, *tasks.values()) if value is not None]
    shown = [msgspec.structs.replace(task, cost=_rounded(tasks.get(task.id))) for task in view.tasks]
    return msgspec.structs.replace(view, cost=_rounded(sum(known)) if known else None, tasks=shown)


def _rounded(cost: float | None) -> float | None:
    # To a millionth of the price unit: sums of many small costs otherwise print float noise.
    return None if cost is None else round(cost, 6)


def _order(job: domain.JobState) -> tuple[object, str]:
    # Newest first, and the id breaks ties, so a cursor names one place in the list.
    return job.created, job.id


def _short(view: JobView) -> JobView:
    if len(view.goal) <= LISTED_TEXT and len(view.reason or "") <= LISTED_TEXT:
        return view
    reason = None if view.reason is None else cut_text(view.reason, LISTED_TEXT)
    return msgspec.structs.replace(view, goal=cut_text(view.goal, LISTED_TEXT), reason=reason)
