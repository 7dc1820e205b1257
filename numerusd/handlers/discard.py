"""`discard`: remove an ended job's branches and worktrees (`clean`, plus its integration branch), then record it."""

from __future__ import annotations

from numerusd import domain
from numerusd.clean import clean_job
from numerusd.handlers.context import Context
from numerusd.protocol.commands import DiscardJob, DiscardReply


async def handle(context: Context, request: DiscardJob) -> DiscardReply:
    """Refused for a job that has not ended; what could not be removed is listed, and discarding again removes
    what is left. A branch `accept` made or moved stays: it is the user's."""
    job = context.book.job(request.job)
    domain.check_cleanable(job)
    removed = await clean_job(context.settings, job, logs=False, integration=True)
    await context.book.decide(job.id, removed.discarded(by=context.asker))
    return DiscardReply(
        job=job.id,
        worktrees=removed.worktrees,
        branches=removed.branches,
        freed_bytes=removed.freed_bytes,
        problems=removed.problems,
    )
