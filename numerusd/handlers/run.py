"""`run`: accept a goal for a repository as a new job and start its first task."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from numerusd import domain
from numerusd.errors import BadRequest
from numerusd.protocol.commands import RunJob, RunReply
from numerusd.protocol.ids import new_ulid

if TYPE_CHECKING:
    from numerusd.daemon import Daemon


async def handle(daemon: Daemon, request: RunJob) -> RunReply:
    """Validate, record `JobSubmitted` and its task, then schedule the task."""
    repo = Path(request.repo)
    if not repo.is_absolute():
        raise BadRequest(f"repo {request.repo!r} is not an absolute path; pass the repository's full path")
    if not repo.is_dir():
        raise BadRequest(f"repo {request.repo} is not a directory; pass --repo with an existing repository")
    agent = request.agent or daemon.settings.default_agent
    if agent not in daemon.settings.agents:
        known = ", ".join(sorted(daemon.settings.agents))
        raise BadRequest(f"unknown agent {agent!r}; configured agents: {known}")
    job_id = new_ulid()
    await daemon.record(job_id, lambda _none: domain.decide_run(request.goal, str(repo), agent))
    daemon.schedule(job_id)
    return RunReply(job=job_id, subject=f"numerus.job.{job_id}.>")
