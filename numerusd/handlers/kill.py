"""`kill`: record the request, then stop the job's agents (TERM to their process groups, then KILL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from numerusd import domain
from numerusd.protocol.commands import KillJob, KillReply

if TYPE_CHECKING:
    from numerusd.daemon import Daemon


async def handle(daemon: Daemon, request: KillJob) -> KillReply:
    """Decide, append, then act: the agents are stopped after `KillRequested` is durable."""
    job = daemon.job(request.job)
    await daemon.record(job.id, domain.decide_kill)
    stopping = daemon.terminate_job(job.id)
    return KillReply(job=job.id, tasks=stopping)
