"""`accept`: take an ended job's result into the user's repository, then record where it went (`JobAccepted`).

The result is the tip of the job's integration branch. It goes, in this order of preference:

1. onto the user's current branch (the one the job started from when HEAD is detached), moved forward to it
   when it can be (`git.take`: the branch holds nothing the result does not; if it is checked out, the files the
   move changes hold no uncommitted work, and the checkout is updated as `git merge --ff-only` does);
2. when that branch moved or diverged since the job started, onto a branch of its own, `numerus/<job>.accepted`,
   created or moved forward, and the reply says why and how to merge it.

`--branch NAME` asks for 2 with that name. Uncommitted work in the way refuses the whole request (nothing
changes; the reply names the files and suggests `--branch`), as does a `--branch` holding commits the result
does not: no branch ever loses a commit, and no merge is made in the user's checkout. `--push REMOTE` then
pushes the branch taken to that remote of the repository (checked before anything moves).
"""

from __future__ import annotations

from pathlib import Path

from numerusd import domain, git
from numerusd.domain.observations import Accepted
from numerusd.errors import BadRequest, CommandRefused
from numerusd.handlers.context import Context
from numerusd.protocol.commands import AcceptJob, AcceptReply


async def handle(context: Context, request: AcceptJob) -> AcceptReply:
    """Check, move the branch, push it, then record `JobAccepted` with who asked."""
    job = context.book.job(request.job)
    domain.check_acceptable(job, partial=request.partial)
    assert job.integration is not None and job.integration_tip is not None  # check_acceptable says so
    repo, tip = Path(job.repo), job.integration_tip
    try:
        if request.branch is not None:
            await git.check_branch_name(request.branch)
        if request.push is not None:
            await git.check_remote(repo, request.push)
    except git.GitError as e:
        raise BadRequest(f"{e.message}. Nothing was changed") from None
    await git.bring(repo, git.mirror_path(context.settings.repos_dir, job.repo), tip)
    how, reason = "fast-forward", ""
    own = git.accepted_branch(job.id)
    try:
        if request.branch is not None:
            taken = await git.take(repo, request.branch, tip)
            how = "fast-forward" if taken.branch == await git.current_branch(repo) else "branch"
        else:
            target = await git.current_branch(repo) or job.start_branch
            try:
                if target is None:
                    raise git.NotFastForward(f"HEAD is detached in {repo} and the job recorded no branch")
                taken = await git.take(repo, target, tip, create=False)
            except git.NotFastForward as e:
                how, reason = "branch", e.message
                taken = await git.take(repo, own, tip)
    except git.NotFastForward as e:
        raise CommandRefused(
            f"{e.message}; name another branch with --branch, or merge it yourself: "
            f"git -C {repo} merge {job.integration}. Nothing was changed"
        ) from None
    except git.UncommittedWork as e:
        raise CommandRefused(
            f"{e.message}. Nothing was changed: commit or stash them, or take the result on a branch of its own: "
            f"'numerusctl accept {job.id} --branch {own}'"
        ) from None
    pushed, push_error = None, None
    if request.push is not None:
        try:
            await git.push(repo, request.push, taken.branch)
            pushed = request.push
        except git.GitError as e:
            push_error = e.message
    checkout = None if taken.checkout is None else str(taken.checkout)
    await context.book.decide(
        job.id,
        Accepted(
            branch=taken.branch,
            sha=tip,
            how=how,
            previous=taken.previous,
            checkout=checkout,
            reason=reason,
            pushed=pushed or "",
            by=context.asker,
            partial=request.partial,
        ),
    )
    return AcceptReply(
        job=job.id,
        repo=job.repo,
        branch=taken.branch,
        sha=tip,
        how=how,
        previous=taken.previous,
        checkout=checkout,
        reason=reason,
        pushed=pushed,
        push_error=push_error,
    )
