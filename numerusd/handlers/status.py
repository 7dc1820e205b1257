"""`status`: one job or all jobs, as the fold of their events says they are."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from numerusd import domain
from numerusd.protocol.commands import GetStatus, StatusReply

if TYPE_CHECKING:
    from numerusd.daemon import Daemon


async def handle(daemon: Daemon, request: GetStatus) -> StatusReply:
    """Answered from the in-memory fold, so it costs the same with 10 or 100k events in the stream."""
    if request.job is not None:
        return StatusReply(jobs=[domain.job_view(daemon.job(request.job))], total=len(daemon.jobs))
    newest = heapq.nlargest(request.limit or len(daemon.jobs), daemon.jobs.values(), key=lambda job: job.created)
    cleanable = sum(1 for job in daemon.jobs.values() if domain.leftovers(job))
    return StatusReply(
        jobs=[domain.job_view(job, tasks=False) for job in newest], total=len(daemon.jobs), cleanable=cleanable
    )
