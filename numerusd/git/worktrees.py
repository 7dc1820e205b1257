"""Worktrees: one per task on its own branch, read-only checkouts of a commit, and their removal.

Worktrees live where the daemon says (`<state>/worktrees/<job>/<task>`), outside the user's checkout, whose
working tree, index and current branch are never touched. Creating and removing are idempotent and repair what a
crash left half done (a branch without its worktree, a registration without its directory, a checkout that was
interrupted), so a step recorded as intended but not as done can simply be taken again.

Concurrent `git worktree` commands in one repository race (one reads the half-written registration of another):
each is run under `worktree_lock(repo)`, and only they are, so the rest of a task's steps run beside other tasks'.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from numerusd.git.command import git
from numerusd.git.errors import BranchCheckedOut, GitError
from numerusd.git.refs import create_branch, remove_branch, resolve, task_branch


@dataclass(frozen=True, slots=True)
class Worktree:
    """A task's worktree: where it is, the branch checked out there, and the commit the branch started from.

    `git_dir` is its administrative directory in the repository (`<repo>/worktrees/<name>`), which git is given
    explicitly for every command in the worktree (see `admin_dir`); None where only its removal is wanted.
    """

    path: Path
    branch: str
    base_sha: str
    git_dir: Path | None = field(default=None, compare=False)


#: A full commit id (SHA-1 or SHA-256), which needs no `rev-parse` to be used as a base.
_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


async def create_worktree(repo: Path, job: str, task: str, base: str, path: Path) -> Worktree:
    """Check out the task's branch `numerus/<job>/<task>` in a worktree at `path`, branched from `base`.

    Idempotent, and it repairs: a branch left without its worktree gets one, a worktree whose creation or
    checkout was interrupted or whose directory vanished is recreated or checked out, and a healthy one is
    reused as it is, with any work in it. `base` is resolved to a sha; after a crash pass the sha recorded in
    the intent event. Refuses (GitError) a path holding another branch, a non-empty directory git does not know
    as a worktree, and an existing branch that does not contain `base`.

    Concurrent `git worktree` commands in one repository race (one reads the half-written registration of
    another), so only the registration (`worktree add --no-checkout`) runs under the repository's lock; the
    branch is created before it and the files are checked out after it, beside other tasks' steps.
    """
    branch = task_branch(job, task)
    ref = f"refs/heads/{branch}"
    path = Path(os.path.abspath(path))
    base_sha = base if _FULL_SHA.fullmatch(base) else await resolve(repo, base)
    if not os.path.lexists(path):
        # The usual case, a new task: its branch created (refused when it exists), registered, checked out.
        # Any refusal (a branch left by a crash, a stale registration of the path) takes the careful path
        # below, which can tell these cases apart.
        created = await git(repo, "update-ref", "-m", "numerus: create branch", ref, base_sha, "", ok=(0, 128))
        if created.returncode == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            async with worktree_lock(repo):
                added = await git(repo, "worktree", "add", "--quiet", "--no-checkout", str(path), branch, ok=(0, 128))
            if added.returncode == 0:
                git_dir = await _admin_dir_of(repo, path)
                await _check_out(path, git_dir)
                return Worktree(path, branch, base_sha, git_dir)
    async with worktree_lock(repo):
        await _register_worktree(repo, branch, base_sha, path)
    git_dir = await _admin_dir_of(repo, path)
    if not (git_dir / "index").exists():
        await _check_out(path, git_dir)
    return Worktree(path, branch, base_sha, git_dir)


async def _register_worktree(repo: Path, branch: str, base_sha: str, path: Path) -> None:
    """The careful path of `create_worktree`, under the lock: make `path` a registered worktree of `branch`."""
    ref = f"refs/heads/{branch}"
    entries = await list_worktrees(repo)
    here = find_worktree(entries, path)
    elsewhere = next((e for e in entries if e.branch == ref and e is not here), None)
    if elsewhere is not None:
        raise GitError(f"{branch} is already checked out in {elsewhere.path}", path=str(elsewhere.path))
    if here is not None and here.branch != ref:
        raise GitError(f"{path} is a worktree of {here.branch or 'a detached HEAD'}, not of {ref}", path=str(path))
    if here is None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        # Not ours to delete: git does not know it, so it may hold anything.
        raise GitError(f"cannot create a worktree at {path}: it exists and is not empty", path=str(path))
    await create_branch(repo, branch, base_sha)

    force: tuple[str, ...] = ()
    if here is not None:
        if here.locked != "initializing" and (path / ".git").is_file():
            return  # registered; checked out unless it has no index yet
        # An interrupted `git worktree add` (git locks a new worktree "initializing" until it is complete) or a
        # directory removed behind git's back. Git knows this path as this branch's worktree, so what is left
        # of it is ours to clear; `add -f -f` then replaces the stale registration (and only it, unlike
        # `git worktree prune`, which would also drop a user's worktree on an unmounted disk).
        if path.exists():
            shutil.rmtree(path)
        force = ("--force", "--force")
    path.parent.mkdir(parents=True, exist_ok=True)
    await git(repo, "worktree", "add", "--quiet", "--no-checkout", *force, str(path), branch)


async def _check_out(path: Path, git_dir: Path) -> None:
    """Fill a worktree registered with `--no-checkout`: its index and files, from its HEAD (what `add` does)."""
    await git(path, "reset", "--hard", "--quiet", "--no-recurse-submodules", git_dir=git_dir)


def admin_dir(repo: Path, path: Path) -> Path | None:
    """The administrative directory (`<repo>/worktrees/<name>`) of the worktree at `path`, found from the
    repository's side: each one's `gitdir` file names its worktree's `.git`. The worktree's own `.git` file is
    never read for it, since whoever works in the worktree can rewrite that file."""
    wanted = _dot_git(os.path.join(path, ".git"))
    common = Path(repo) if not (Path(repo) / ".git").is_dir() else Path(repo) / ".git"
    try:
        names = os.listdir(common / "worktrees")
    except OSError:
        return None
    for name in names:
        try:
            named = (common / "worktrees" / name / "gitdir").read_text().strip()
        except OSError:
            continue
        if _dot_git(named) == wanted:
            return common / "worktrees" / name
    return None


def _dot_git(name: str) -> str:
    """A worktree's `.git` path with the directories above it resolved, not the `.git` itself (it may be a link)."""
    return os.path.join(os.path.realpath(os.path.dirname(name)), os.path.basename(name))


async def _admin_dir_of(repo: Path, path: Path) -> Path:
    found = admin_dir(repo, path)
    if found is None:
        raise GitError(f"{path} is not a worktree of {repo}", path=str(path))
    return found


async def remove_worktree(repo: Path, worktree: Worktree, *, delete_branch: bool = False) -> None:
    """Remove a task's worktree, uncommitted work included, and with `delete_branch` its branch; idempotent.

    A directory at `worktree.path` that git does not know as a worktree is left alone.
    """
    async with worktree_lock(repo):
        await _remove_worktree(repo, worktree, delete_branch=delete_branch)


async def _remove_worktree(repo: Path, worktree: Worktree, *, delete_branch: bool) -> None:
    await _unregister(repo, Path(os.path.abspath(worktree.path)))
    if delete_branch:
        await remove_branch(repo, worktree.branch)


async def delete_branch(repo: Path, branch: str) -> None:
    """Delete a branch whatever it holds (its work is gone with it); idempotent."""
    async with worktree_lock(repo):
        await remove_branch(repo, branch)


async def _unregister(repo: Path, path: Path) -> None:
    """Remove the worktree at `path` (an absolute path), its files and its registration, if git knows it."""
    removed = False
    if (path / ".git").is_file():
        # The usual case, a healthy worktree: one git command. Anything else takes the careful path below.
        result = await git(repo, "worktree", "remove", "--force", "--force", str(path), ok=(0, 128))
        removed = result.returncode == 0
    if not removed and find_worktree(await list_worktrees(repo), path) is not None:
        try:
            await git(repo, "worktree", "remove", "--force", "--force", str(path))
        except GitError:
            # A half-deleted worktree (its `.git` file gone) is not "a working tree" to git any more; without
            # its directory git removes the registration.
            if not path.exists():
                raise
            shutil.rmtree(path)
            await git(repo, "worktree", "remove", "--force", "--force", str(path))


async def move_worktree(worktree: Worktree, sha: str) -> None:
    """The task's worktree and branch at commit `sha`, a descendant of its base already in the repository (the
    work a remote worker sent back, see numerusd.bundles): the files that differ are written, nothing is kept."""
    reset = ("reset", "--hard", "--quiet", "--no-recurse-submodules", sha)
    await git(worktree.path, *reset, git_dir=worktree.git_dir)


# --- read-only checkouts -----------------------------------------------------------------------------------


async def create_checkout(repo: Path, sha: str, path: Path) -> Path:
    """Check out commit `sha` at `path` on no branch (a detached worktree); the absolute path.

    For the agents that are only asked to read (the planner, the queen, claimers): they look at the commit the
    job's tasks start from, not at the user's working tree. Whatever is at `path` already (a checkout left by a
    crash) is replaced: the caller owns the directory.
    """
    path = Path(os.path.abspath(path))
    add = ("worktree", "add", "--quiet", "--detach", "--no-checkout", str(path), sha)
    async with worktree_lock(repo):
        if os.path.lexists(path):
            await _remove_checkout(repo, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if (await git(repo, *add, ok=(0, 128))).returncode != 0:
            await _remove_checkout(repo, path)  # registered, its directory gone: git refuses until it is removed
            await git(repo, *add)
    await _check_out(path, await _admin_dir_of(repo, path))
    return path


async def move_checkout(repo: Path, path: Path, sha: str) -> None:
    """Make the checkout of `repo` at `path` one of commit `sha`: only the files that differ are written."""
    git_dir = await _admin_dir_of(repo, Path(os.path.abspath(path)))
    await git(path, "reset", "--hard", "--quiet", "--no-recurse-submodules", sha, git_dir=git_dir)


async def remove_checkout(repo: Path, path: Path) -> None:
    """Remove a checkout `create_checkout` made (or began); idempotent."""
    async with worktree_lock(repo):
        await _remove_checkout(repo, Path(os.path.abspath(path)))


async def _remove_checkout(repo: Path, path: Path) -> None:
    await _unregister(repo, path)
    if os.path.lexists(path):
        shutil.rmtree(path)


# --- the repository's list of worktrees -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorktreeEntry:
    """One worktree as `git worktree list` knows it: where, the full ref it has checked out (None: detached), and
    why it is locked (`initializing` while `git worktree add` is not done)."""

    path: Path
    branch: str | None
    locked: str | None


async def refuse_checked_out(repo: Path, branch: str, so: str = "Numerus can merge into it") -> None:
    """BranchCheckedOut when a worktree of `repo` has `branch` checked out: Numerus never moves a branch under a
    checkout (git would refuse to fetch into it, and the checkout's files would no longer match its branch), nor
    deletes one. `so`: what switching that checkout to another branch lets Numerus do."""
    ref = f"refs/heads/{branch}"
    async with worktree_lock(repo):
        entries = await list_worktrees(repo)
    for entry in entries:
        if entry.branch == ref:
            raise BranchCheckedOut(
                f"{branch} is checked out in {entry.path}: switch that checkout to another branch so {so}",
                branch=branch,
                path=str(entry.path),
            )


async def list_worktrees(repo: Path) -> list[WorktreeEntry]:
    """Every worktree of `repo`, the main one first. Call it under `worktree_lock`."""
    out = (await git(repo, "worktree", "list", "--porcelain", "-z")).stdout
    entries = []
    for block in out.split(b"\0\0"):
        fields = {}
        for line in block.split(b"\0"):
            key, _, value = line.decode("utf-8", "surrogateescape").partition(" ")
            if key:
                fields[key] = value
        if "worktree" in fields:
            branch = fields.get("branch")
            entries.append(WorktreeEntry(Path(fields["worktree"]), branch, fields.get("locked")))
    return entries


def find_worktree(entries: Iterable[WorktreeEntry], path: Path) -> WorktreeEntry | None:
    """The entry for the worktree at `path` (symlinks resolved), if there is one."""
    wanted = os.path.realpath(path)
    name = os.path.basename(wanted)
    # realpath costs a stat per component: only for entries that can be it (same last name), not for all.
    return next((e for e in entries if e.path.name == name and os.path.realpath(e.path) == wanted), None)


#: One lock per event loop and repository around `git worktree` commands: two of them at once in one repository
#: race (`git worktree list` reads a half-written `.git/worktrees/<name>/commondir` of a concurrent `add`).
_worktree_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def worktree_lock(repo: Path) -> asyncio.Lock:
    """The lock this event loop holds around `git worktree` commands in `repo`."""
    locks = _worktree_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(os.path.realpath(repo), asyncio.Lock())
