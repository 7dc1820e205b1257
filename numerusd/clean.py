"""`numerusctl clean` and `discard`: remove what an ended job left on disk (their handlers record it).

A job leaves behind, in Numerus's mirror of the repository and as fetched refs in the user's repository, the
worktrees and branches of the tasks that did not merge (a merged task's go as soon as
it merges), whatever read-only checkouts a crash left, and its run directory: terminal logs, prompts, the
agents' answers. None of it is state (the events are), so removing it loses no history, only the files a user
looks at to see why a task failed. It goes on request only, for ended jobs only, and the integration branch,
the job's result, stays, unless the user discards the job (`numerusctl discard`: cleaning, plus the integration
branch). A branch checked out in one of the user's worktrees is never deleted (their HEAD would name nothing).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from numerusd import git
from numerusd.checkouts import CHECKOUTS_SUFFIX, Checkouts
from numerusd.config import Settings
from numerusd.domain import JobState
from numerusd.domain.observations import CleanedUp, Discarded
from numerusd.errors import NumerusError
from numerusd.git.refs import branch_tips
from numerusd.git.worktrees import refuse_checked_out


@dataclass
class Removed:
    """What cleaning one job removed, and what it could not (one line each)."""

    worktrees: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)
    logs: bool = False
    freed_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def observation(self) -> CleanedUp:
        """What the job book is told, to record as `JobCleaned`."""
        return CleanedUp(
            worktrees=tuple(self.worktrees), branches=tuple(self.branches), logs=self.logs, freed_bytes=self.freed_bytes
        )

    def discarded(self, by: str) -> Discarded:
        """What the job book is told, to record as `JobDiscarded`."""
        return Discarded(
            worktrees=tuple(self.worktrees), branches=tuple(self.branches), freed_bytes=self.freed_bytes, by=by
        )


async def clean_job(settings: Settings, job: JobState, *, logs: bool, integration: bool = False) -> Removed:
    """Remove the job's task worktrees and branches, its checkouts, with `logs` its run directory, and with
    `integration` its integration branch (`discard`).

    Each removal stands alone: one that fails is reported and the others go on. Cleaning again finds only
    what is still there.
    """
    removed = Removed()
    user_repo = Path(job.repo)
    # Worktrees and branches live in Numerus's mirror; the task branches were fetched into the user's repository.
    repo = user_repo if job.in_place else git.mirror_path(settings.repos_dir, job.repo)
    # A mirror (or repository) deleted since: its worktrees' registrations went with it, and its branches.
    known = repo.is_dir()
    checkouts = settings.worktrees_dir / f"{job.id}{CHECKOUTS_SUFFIX}"
    if checkouts.is_dir():
        await _attempt(removed, f"remove the checkouts in {checkouts}", _remove_checkouts(repo, checkouts, known))
    for task in job.tasks.values():
        if task.worktree is None or not os.path.lexists(task.worktree):
            continue
        path = Path(task.worktree)
        if not known and not path.resolve().is_relative_to(settings.worktrees_dir.resolve()):
            # With no repository to ask, only a directory of ours is removed (the state directory may have moved).
            removed.problems.append(f"not removing {path}: no git repository at {repo} says it is a worktree")
            continue
        size = await asyncio.to_thread(_disk_usage, path)
        worktree = git.Worktree(path, task.branch or git.task_branch(job.id, task.id), task.base_sha or "")
        done = git.remove_worktree(repo, worktree) if known else asyncio.to_thread(shutil.rmtree, path)
        if await _attempt(removed, f"remove the worktree of task {task.id} at {path}", done):
            removed.worktrees.append(str(path))
            removed.freed_bytes += size
    branches: dict[str, list[Path]] = {}
    places = [repo] if known else []
    if user_repo != repo and os.path.lexists(user_repo / ".git"):
        places.append(user_repo)
    for where in places:
        try:
            for branch in await git.task_branches(where, job.id):
                branches.setdefault(branch, []).append(where)
            if (
                integration
                and job.integration is not None
                and await branch_tips(where, f"refs/heads/{job.integration}")
            ):
                branches.setdefault(job.integration, []).append(where)
        except (NumerusError, OSError) as e:
            removed.problems.append(f"cannot list the branches in {where}: {e}")
    for branch, places in branches.items():
        deleted = [
            await _attempt(removed, f"delete branch {branch} in {where}", _delete_branch(where, branch, user_repo))
            for where in places
        ]
        if all(deleted):
            removed.branches.append(branch)
    # What is left in the job's worktree directory git did not know (a worktree half made when a daemon died);
    # kept if any worktree could not be removed, as git may still count on its files.
    left = settings.worktrees_dir / job.id
    if left.is_dir() and not removed.problems:
        size = await asyncio.to_thread(_disk_usage, left)
        if await _attempt(removed, f"remove {left}", asyncio.to_thread(shutil.rmtree, left)):
            removed.freed_bytes += size
    runs = settings.runs_dir / job.id
    if logs and runs.is_dir():
        size = await asyncio.to_thread(_disk_usage, runs)
        if await _attempt(removed, f"remove the logs in {runs}", asyncio.to_thread(shutil.rmtree, runs)):
            removed.logs = True
            removed.freed_bytes += size
    return removed


async def _delete_branch(repo: Path, branch: str, user_repo: Path) -> None:
    if repo == user_repo:
        await refuse_checked_out(repo, branch, so="it can be deleted")
    await git.delete_branch(repo, branch)


async def _remove_checkouts(repo: Path, root: Path, known: bool) -> None:
    if known:
        await Checkouts(repo, root).clear()
    else:
        await asyncio.to_thread(shutil.rmtree, root)


async def _attempt(removed: Removed, what: str, step: Awaitable[object]) -> bool:
    """Await `step`; on failure note "cannot <what>: <why>" and say False."""
    try:
        await step
    except (NumerusError, OSError) as e:
        removed.problems.append(f"cannot {what}: {e}")
        return False
    return True


def _disk_usage(path: Path) -> int:
    """The bytes of disk the files under `path` take (as `du` counts them), links not followed."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total
