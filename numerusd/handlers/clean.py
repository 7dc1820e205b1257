"""`clean`: remove what ended jobs left on disk (see `numerusd.clean`), then record what went."""

from __future__ import annotations

from numerusd import domain
from numerusd.clean import clean_job
from numerusd.errors import BadRequest
from numerusd.handlers.context import Context
from numerusd.protocol.commands import JOB_DONE, CleanedJob, CleanJobs, CleanReply


async def handle(context: Context, request: CleanJobs) -> CleanReply:
    """Every job named must have ended, or nothing is removed; with `ended`, every ended job not cleaned yet (or,
    with `logs`, whose logs are still there)."""
    if bool(request.jobs) == request.ended:
        raise BadRequest("name the jobs to clean, or ask for every ended job with --ended (not both)")
    if request.ended:
        jobs = sorted(
            (
                job
                for job in context.book.jobs.values()
                if job.status in JOB_DONE and not (job.cleaned and (job.logs_removed or not request.logs))
            ),
            key=lambda job: job.created,
        )
    else:
        jobs = [context.book.job(job_id) for job_id in dict.fromkeys(request.jobs)]
        for job in jobs:
            domain.check_cleanable(job)
    cleaned = []
    for job in jobs:
        removed = await clean_job(context.settings, job, logs=request.logs)
        await context.book.decide(job.id, removed.observation())
        cleaned.append(
            CleanedJob(
                job=job.id,
                worktrees=removed.worktrees,
                branches=removed.branches,
                logs=removed.logs,
                freed_bytes=removed.freed_bytes,
                kept=job.integration,
                problems=removed.problems,
            )
        )
    return CleanReply(jobs=cleaned)
