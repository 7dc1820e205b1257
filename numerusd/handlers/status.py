"""`status`: one job or all jobs, as the fold of their events says they are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from numerusd import domain
from numerusd.protocol.commands import GetStatus, StatusReply

if TYPE_CHECKING:
    from numerusd.daemon import Daemon


async def handle(daemon: Daemon, request: GetStatus) -> StatusReply:
    """Answered from the in-memory fold, so it costs the same with 10 or 100k events in the stream."""
    if request.job is not None:
        return StatusReply(jobs=[domain.job_view(daemon.job(request.job))])
    jobs = sorted(daemon.jobs.values(), key=lambda job: job.created, reverse=True)
    return StatusReply(jobs=[domain.job_view(job) for job in jobs])
