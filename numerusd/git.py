"""Git for Numerus: a job's integration branch, one worktree per task, a task's real diff, merges in order.

Branch layout (docs/git.md says more):

    numerus/<job>.integration      the job's integration branch, created from the user's HEAD at job start
    numerus/<job>/<task>           one branch per task, checked out in its own worktree

The integration branch cannot be `numerus/<job>`: git stores refs as files, so a ref `numerus/<job>` and refs
under `numerus/<job>/` cannot both exist. `<job>.integration` sits beside the task namespace and, since job and
task ids are tokens without dots, can never collide with a task branch.

Every step is built for "decide, append, then act": each function either is idempotent (creating the
integration branch, a worktree, committing a task's work) or can tell afterwards whether it already happened
(`merge_state`), so a crash between the intent event and the outcome event is repaired, never repeated blindly.
Nothing here touches the user's working tree, index or current branch: merges are computed with
`git merge-tree --write-tree` and land with one `update-ref <ref> <new> <expected-old>`.

How git runs:
- the real `git` binary, spawned by `subprocess.Popen` in a worker thread (vfork, with the GIL let go while the
  child gets to its exec) and then waited for by the event loop: its pipes and a pidfd, no thread. Measured here
  (git 2.39, `rev-parse`): asyncio subprocesses under uvloop fork the whole daemon, 5.7 ms per call at 0 and
  33.5 ms at 1 GiB resident; `subprocess.run` in a worker thread, 2.3 ms and 3.1 ms; `os.posix_spawn` is
  cheaper still (0.3 ms of the daemon's CPU against 0.95) but keeps the GIL until the child execs, which on a
  machine busy with agents stalled the event loop for a second in all over a 64-task job. A cancelled caller
  does not stop a git command already running; that is one more reason every step can tell afterwards whether
  it happened.
- a clean environment: no system or global config (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`), so the
  result does not depend on who runs the daemon (a global `color.ui=always`, `commit.gpgSign` or excludes file
  would change it); the repository's own config still applies. No prompts, C locale, and no inherited
  `GIT_DIR`-style variables. `GIT_CEILING_DIRECTORIES` stops git from looking above the directory it is given,
  so a broken worktree path can never make git act on some enclosing repository (a home directory under git).
- hooks are off (`core.hooksPath=/dev/null`): Numerus's commits and merges are bookkeeping; checks belong to the
  quality gate, where they run with a timeout and are recorded as events. A hook would run with the daemon's
  rights code that an agent with write access to `.git` could have put there.
- Numerus's own commits are made with plumbing (`commit-tree`, `update-ref`), as `Numerus <numerus@localhost>`
  unless told otherwise, never signed.

This module is the one place where failures of git become `GitError`:

    GitError(NumerusError)   a git command failed: `command`, `returncode`, the end of `stderr`, `cwd`
    ├── RefMoved             a ref was not at the value the caller expected; nothing was changed
    ├── BranchCheckedOut     refusing to move a branch that a worktree has checked out
    └── BaseNotAncestor      a task's HEAD no longer descends from the commit its worktree started from
"""

from __future__ import annotations

import asyncio
import functools
import os
import posixpath
import re
import shutil
import signal
import subprocess
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from numerusd.errors import NumerusError
from numerusd.protocol.ids import is_token

#: Who Numerus's own commits are by, unless a caller says otherwise.
NUMERUS_NAME = "Numerus"
NUMERUS_EMAIL = "numerus@localhost"
#: A git command taking longer than this is killed and reported (a huge checkout, a stuck filesystem).
TIMEOUT = 600.0
_STDERR_LINES = 20

ChangeKind = Literal["add", "modify", "delete", "rename"]
ClaimKind = Literal["file", "dir"]
#: The modes of `numerusd.protocol.claims.PathMode`; `read` covers no change at all.
ClaimMode = Literal["create", "modify", "delete", "read"]


class ClaimedPathLike(Protocol):
    """What `outside_claim` needs of a claimed path: `numerusd.protocol.claims.ClaimedPath` has it."""

    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def mode(self) -> str: ...


# --- errors ------------------------------------------------------------------------------------------------


class GitError(NumerusError):
    """A git command failed, or a repository is not in a state Numerus can work with."""

    code = "git"


class RefMoved(GitError):
    """A ref was not at the value the caller expected (somebody else moved it); nothing was changed."""

    code = "git_ref_moved"


class BranchCheckedOut(GitError):
    """Refusing to move a branch that is checked out in a worktree: its index and files would go stale."""

    code = "git_branch_checked_out"


class BaseNotAncestor(GitError):
    """A task's HEAD does not descend from its base commit (the agent rewrote history or switched branches)."""

    code = "git_base_not_ancestor"


# --- values ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Branch:
    """A branch Numerus created: its short name and the commit it was created at."""

    name: str
    sha: str


@dataclass(frozen=True, slots=True)
class Worktree:
    """A task's worktree: where it is, the branch checked out there, and the commit the branch started from."""

    path: Path
    branch: str
    base_sha: str


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path relative to a task's base: relative, POSIX. A rename also names the old path."""

    path: str
    kind: ChangeKind
    old_path: str | None = None


@dataclass(frozen=True, slots=True)
class Work:
    """A task's work, committed: the task branch's tip and every path changed since the task's base."""

    commit: str
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class Violation:
    """A change no claim covers: the path, the change, and why, in a sentence an agent can act on."""

    path: str
    change: Change
    reason: str


@dataclass(frozen=True, slots=True)
class Merged:
    """A task merged: `sha` is the integration branch's new tip, a merge commit of `parent` and `task_sha`.

    `created` is False when there was nothing to merge (the task's commits were already in the branch); then
    `sha == parent` and the branch did not move.
    """

    sha: str
    parent: str
    task_sha: str
    created: bool = True


@dataclass(frozen=True, slots=True)
class Conflict:
    """A merge that would conflict: the paths and git's conflict messages. Nothing was changed."""

    paths: tuple[str, ...]
    messages: tuple[str, ...]
    parent: str
    task_sha: str


@dataclass(frozen=True, slots=True)
class NotStarted:
    """The integration branch is still at the expected parent: merging (again) is safe."""


@dataclass(frozen=True, slots=True)
class Done:
    """The merge already happened: `sha` is the merge commit (record the outcome, do not merge again)."""

    sha: str


@dataclass(frozen=True, slots=True)
class Moved:
    """The integration branch moved, but not by this merge: decide again from `tip`."""

    tip: str


MergeResult = Merged | Conflict
MergeState = NotStarted | Done | Moved


# --- the git binary ----------------------------------------------------------------------------------------

#: `git merge-tree --write-tree`, which merges without a working tree, came with git 2.38.
MINIMUM_VERSION = (2, 38)


async def check_git() -> tuple[int, ...]:
    """The version of the `git` on PATH; GitError when there is none or it is older than MINIMUM_VERSION.

    Meant for daemon startup, so a too-old git is reported at once rather than at the first merge.
    """
    out = (await _git(Path("/"), "--version")).text()  # "git version 2.39.5" (vendors may append more)
    try:
        version = tuple(int(part) for part in out.split()[2].split(".")[:3] if part.isdigit())
    except IndexError:
        version = ()
    if version[:2] < MINIMUM_VERSION:
        wanted = ".".join(map(str, MINIMUM_VERSION))
        raise GitError(f"Numerus needs git {wanted} or newer; PATH has {out!r}", version=out)
    return version


# --- names -------------------------------------------------------------------------------------------------


def integration_branch(job: str) -> str:
    """The short name of a job's integration branch."""
    _check_token("job id", job)
    return f"numerus/{job}.integration"


def task_branch(job: str, task: str) -> str:
    """The short name of a task's branch."""
    _check_token("job id", job)
    _check_token("task id", task)
    return f"numerus/{job}/{task}"


# --- the integration branch --------------------------------------------------------------------------------


async def resolve(repo: Path, rev: str) -> str:
    """The commit sha `rev` names in `repo` (a sha, a branch, `HEAD`); GitError when it names no commit."""
    if rev.startswith("-"):
        raise GitError(f"not a revision: {rev!r}", rev=rev)
    result = await _git(repo, "rev-parse", "--verify", "-q", "--end-of-options", f"{rev}^{{commit}}", ok=(0, 1))
    if result.returncode != 0:
        raise GitError(f"{rev!r} names no commit in {repo}", rev=rev, cwd=str(repo))
    return result.text()


async def uncommitted(repo: Path) -> list[str]:
    """The paths of `repo`'s working tree whose state is not in its HEAD commit: staged, unstaged and untracked
    changes alike (an untracked directory is one path, ending in `/`); ignored files are not changes.

    A planned job works from a commit, so these are what its agents will not see.
    """
    # No optional locks: `status` would otherwise refresh the user's index, and hold index.lock while it does.
    status = ("--no-optional-locks", "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=normal")
    out = await _git(repo, *status)
    # Each entry is `XY <path>`, NUL-terminated (with --no-renames never followed by an old path).
    return [entry[3:].decode("utf-8", "surrogateescape") for entry in out.stdout.split(b"\0") if entry]


async def create_integration_branch(repo: Path, job: str, start: str = "HEAD") -> Branch:
    """Create the job's integration branch at `start` (resolved to a sha first); idempotent.

    After a crash, call it again with the sha recorded in the intent event, not with `HEAD` (the user may have
    moved on). A branch that already exists is accepted when `start` is in its history (it may have been merged
    into since); anything else raises GitError rather than adopting a stranger's branch.
    """
    name = integration_branch(job)
    sha = await resolve(repo, start)
    await _create_branch(repo, name, sha)
    return Branch(name, sha)


# --- worktrees ---------------------------------------------------------------------------------------------

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
        created = await _git(repo, "update-ref", "-m", "numerus: create branch", ref, base_sha, "", ok=(0, 128))
        if created.returncode == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            async with _worktree_lock(repo):
                added = await _git(repo, "worktree", "add", "--quiet", "--no-checkout", str(path), branch, ok=(0, 128))
            if added.returncode == 0:
                await _check_out(path)
                return Worktree(path, branch, base_sha)
    async with _worktree_lock(repo):
        await _register_worktree(repo, branch, base_sha, path)
    if not _index_path(path).exists():
        await _check_out(path)
    return Worktree(path, branch, base_sha)


async def _register_worktree(repo: Path, branch: str, base_sha: str, path: Path) -> None:
    """The careful path of `create_worktree`, under the lock: make `path` a registered worktree of `branch`."""
    ref = f"refs/heads/{branch}"
    entries = await _worktrees(repo)
    here = _find_worktree(entries, path)
    elsewhere = next((e for e in entries if e.branch == ref and e is not here), None)
    if elsewhere is not None:
        raise GitError(f"{branch} is already checked out in {elsewhere.path}", path=str(elsewhere.path))
    if here is not None and here.branch != ref:
        raise GitError(f"{path} is a worktree of {here.branch or 'a detached HEAD'}, not of {ref}", path=str(path))
    if here is None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        # Not ours to delete: git does not know it, so it may hold anything.
        raise GitError(f"cannot create a worktree at {path}: it exists and is not empty", path=str(path))
    await _create_branch(repo, branch, base_sha)

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
    await _git(repo, "worktree", "add", "--quiet", "--no-checkout", *force, str(path), branch)


async def _check_out(path: Path) -> None:
    """Fill a worktree registered with `--no-checkout`: its index and files, from its HEAD (what `add` does)."""
    await _git(path, "reset", "--hard", "--quiet", "--no-recurse-submodules")


def _index_path(path: Path) -> Path:
    """The index of the worktree at `path`, in the repository's `.git/worktrees/<name>/`: absent until checked out."""
    try:
        gitdir = (path / ".git").read_text().removeprefix("gitdir:").strip()
    except OSError:
        return path / ".git" / "index"  # not a linked worktree's `.git` file: no index to be found there
    return Path(path, gitdir) / "index"


async def remove_worktree(repo: Path, worktree: Worktree, *, delete_branch: bool = False) -> None:
    """Remove a task's worktree, uncommitted work included, and with `delete_branch` its branch; idempotent.

    A directory at `worktree.path` that git does not know as a worktree is left alone.
    """
    async with _worktree_lock(repo):
        await _remove_worktree(repo, worktree, delete_branch=delete_branch)


async def _remove_worktree(repo: Path, worktree: Worktree, *, delete_branch: bool) -> None:
    await _unregister(repo, Path(os.path.abspath(worktree.path)))
    if delete_branch:
        await _delete_branch(repo, worktree.branch)


async def task_branches(repo: Path, job: str) -> list[str]:
    """The short names of the job's task branches that exist (`numerus/<job>/<task>`; not its integration branch)."""
    parent = f"refs/heads/{task_branch(job, 'x').removesuffix('/x')}"
    # A pattern matches the refs beneath it, up to a slash: `numerus/<job>/…`, not `numerus/<job>.integration`.
    out = await _git(repo, "for-each-ref", "--format=%(refname)", parent)
    return [ref.removeprefix("refs/heads/") for ref in out.text().splitlines() if ref.startswith(parent + "/")]


async def delete_branch(repo: Path, branch: str) -> None:
    """Delete a branch whatever it holds (its work is gone with it); idempotent."""
    async with _worktree_lock(repo):
        await _delete_branch(repo, branch)


async def _delete_branch(repo: Path, branch: str) -> None:
    ref = f"refs/heads/{branch}"
    if await _ref_sha(repo, ref) is not None:
        await _git(repo, "update-ref", "-d", ref)


async def _unregister(repo: Path, path: Path) -> None:
    """Remove the worktree at `path` (an absolute path), its files and its registration, if git knows it."""
    removed = False
    if (path / ".git").is_file():
        # The usual case, a healthy worktree: one git command. Anything else takes the careful path below.
        result = await _git(repo, "worktree", "remove", "--force", "--force", str(path), ok=(0, 128))
        removed = result.returncode == 0
    if not removed and _find_worktree(await _worktrees(repo), path) is not None:
        try:
            await _git(repo, "worktree", "remove", "--force", "--force", str(path))
        except GitError:
            # A half-deleted worktree (its `.git` file gone) is not "a working tree" to git any more; without
            # its directory git removes the registration.
            if not path.exists():
                raise
            shutil.rmtree(path)
            await _git(repo, "worktree", "remove", "--force", "--force", str(path))


# --- read-only checkouts -----------------------------------------------------------------------------------


async def create_checkout(repo: Path, sha: str, path: Path) -> Path:
    """Check out commit `sha` at `path` on no branch (a detached worktree); the absolute path.

    For the agents that are only asked to read (the planner, the queen, claimers): they look at the commit the
    job's tasks start from, not at the user's working tree. Whatever is at `path` already (a checkout left by a
    crash) is replaced: the caller owns the directory.
    """
    path = Path(os.path.abspath(path))
    add = ("worktree", "add", "--quiet", "--detach", "--no-checkout", str(path), sha)
    async with _worktree_lock(repo):
        if os.path.lexists(path):
            await _remove_checkout(repo, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if (await _git(repo, *add, ok=(0, 128))).returncode != 0:
            await _remove_checkout(repo, path)  # registered, its directory gone: git refuses until it is removed
            await _git(repo, *add)
    await _check_out(path)
    return path


async def move_checkout(path: Path, sha: str) -> None:
    """Make the checkout at `path` one of commit `sha`: only the files that differ are written."""
    await _git(path, "reset", "--hard", "--quiet", "--no-recurse-submodules", sha)


async def remove_checkout(repo: Path, path: Path) -> None:
    """Remove a checkout `create_checkout` made (or began); idempotent."""
    async with _worktree_lock(repo):
        await _remove_checkout(repo, Path(os.path.abspath(path)))


async def _remove_checkout(repo: Path, path: Path) -> None:
    await _unregister(repo, path)
    if os.path.lexists(path):
        shutil.rmtree(path)


# --- a task's real diff ------------------------------------------------------------------------------------


async def commit_work(worktree: Worktree, message: str, *, author: tuple[str, str] | None = None) -> Work:
    """Commit everything the worktree holds on the task's branch; the tip, and what changed since the base.

    The commit goes on top of any commits the agent made. The tip is the new commit, or the existing HEAD when
    there was nothing left to commit (so a second call after a crash is harmless). The changes are the task's
    real diff: the worktree's files as they are against the base commit, committed, staged, unstaged and
    untracked alike, whoever made them (the agent's tools, a shell command, a commit); renames are found by
    content similarity (git's 50%). Ignored files (`.gitignore`, `info/exclude`) are neither changes nor committed.
    `author` is a (name, email) pair; the committer is always Numerus. Raises GitError when HEAD is not on the
    task's branch (the agent switched branches or detached HEAD), since the work would then not reach the
    branch that gets merged, and BaseNotAncestor when HEAD no longer descends from `base_sha`, since then the
    branch would not merge what the diff shows. Three git commands when the agent changed nothing, six when it
    did.
    """
    head = await _head(worktree)
    ref = f"refs/heads/{worktree.branch}"
    if head.ref != ref:
        where = "a detached HEAD" if head.ref == "HEAD" else head.ref
        raise GitError(
            f"{worktree.path} is on {where}, not on {ref}: refusing to commit there", path=str(worktree.path)
        )
    await _git(worktree.path, "add", "--all")
    tree = (await _git(worktree.path, "write-tree")).text()
    tip = head.sha
    if tree != head.tree:
        env = {}
        if author is not None:
            env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1]}
        commit_tree = ("commit-tree", "--no-gpg-sign", tree, "-p", head.sha, "-m", message)
        tip = (await _git(worktree.path, *commit_tree, env=env)).text()
        await _update_ref(worktree.path, ref, tip, head.sha, reason=f"numerus: commit the work of {worktree.branch}")
    changes = [] if tree == head.base_tree else await _diff(worktree, tree)
    return Work(tip, tuple(changes))


def outside_claim(
    changes: Iterable[Change], claimed: Iterable[ClaimedPathLike | tuple[str, ClaimKind, ClaimMode]]
) -> list[Violation]:
    """The changes no claim covers. Pure.

    A claim is a `ClaimedPath` or a `(path, kind, mode)` tuple: kind `file` covers exactly that path, kind `dir`
    everything beneath it (`.`, `./` or `""` is the whole repository). Modes cover change kinds:

        claim mode   a file claim covers   a dir claim covers, beneath it
        create       add                   add
        modify       modify                add, modify   (adding a file changes the directory's contents)
        delete       delete                delete
        read         nothing               nothing

    A rename needs both halves covered: a delete of the old path and an add of the new one. Paths compare
    exactly (case-sensitive, after normalising `./`, `//` and a trailing `/`).
    """
    claims = [
        (_normalise(c[0]), c[1], c[2]) if isinstance(c, tuple) else (_normalise(c.path), c.kind, c.mode)
        for c in claimed
    ]
    violations: list[Violation] = []
    for change in changes:
        if change.kind == "rename":
            if change.old_path is None:
                raise ValueError(f"a rename to {change.path} does not name its old path")
            halves = ((change.old_path, "delete"), (change.path, "add"))
        else:
            halves = ((change.path, change.kind),)
        for path, kind in halves:
            reason = _uncovered(claims, _normalise(path), kind)
            if reason is not None:
                if change.kind == "rename":
                    reason = f"renamed {change.old_path} -> {change.path}: {reason}"
                violations.append(Violation(path, change, reason))
    return violations


# --- merging -----------------------------------------------------------------------------------------------


async def merge_task(
    repo: Path,
    integration: str,
    task: str,
    message: str,
    *,
    expected_integration: str | None = None,
    task_sha: str | None = None,
) -> MergeResult:
    """Merge the task's branch into the integration branch, without touching any working tree or index.

    The merge is computed with `git merge-tree --write-tree`, committed with `commit-tree` (always a merge
    commit, two parents: integration first, task second) and lands with one `update-ref` that expects the
    integration branch to be at `expected_integration`. Pass the full shas recorded in the intent event as
    `expected_integration` and `task_sha` (default: the branches' current tips), so exactly those get merged.

    Returns Merged, or Conflict (nothing changed but some unreferenced objects in the object store). Raises
    RefMoved when the integration branch is not at `expected_integration`, BranchCheckedOut when a worktree
    has it checked out.
    """
    ref, task_ref = f"refs/heads/{integration}", f"refs/heads/{task}"
    tips = await _branch_tips(repo, ref, task_ref)
    if ref not in tips:
        raise GitError(f"the integration branch {integration} does not exist", ref=ref)
    if task_sha is None and task_ref not in tips:
        raise GitError(f"the task branch {task} does not exist", ref=task_ref)
    current = tips[ref]
    parent = expected_integration or current
    theirs = task_sha or tips[task_ref]
    async with _worktree_lock(repo):
        entries = await _worktrees(repo)
    for entry in entries:
        if entry.branch == ref:
            raise BranchCheckedOut(
                f"{integration} is checked out in {entry.path}: switch that checkout to another branch so Numerus "
                "can merge into it",
                branch=integration,
                path=str(entry.path),
            )
    if current != parent:
        raise RefMoved(
            f"{integration} is at {current}, expected {parent}: it moved since the merge was decided",
            ref=ref,
            expected=parent,
            actual=current,
        )
    if await _is_ancestor(repo, theirs, parent):
        return Merged(sha=parent, parent=parent, task_sha=theirs, created=False)
    result = await _git(repo, "merge-tree", "--write-tree", "-z", "--name-only", parent, theirs, ok=(0, 1))
    tree, paths, messages = _parse_merge_tree(result.stdout)
    if result.returncode == 1:
        return Conflict(paths=paths, messages=messages, parent=parent, task_sha=theirs)
    new = (await _git(repo, "commit-tree", "--no-gpg-sign", tree, "-p", parent, "-p", theirs, "-m", message)).text()
    await _update_ref(repo, ref, new, parent, reason=f"numerus: merge {task}")
    return Merged(sha=new, parent=parent, task_sha=theirs)


async def merge_state(repo: Path, integration: str, expected_parent: str, task_sha: str) -> MergeState:
    """Whether the merge of `task_sha` into `integration` on top of `expected_parent` already happened.

    For the restart after a crash between an intent event (MergeStarted) and its outcome (TaskMerged):
    Done(sha) when the branch holds a merge commit with parents exactly (`expected_parent`, `task_sha`) on its
    first-parent line since `expected_parent` (or when there was nothing to merge); NotStarted when the branch
    is still at `expected_parent`; Moved(tip) when it moved some other way.
    """
    ref = f"refs/heads/{integration}"
    tip = await _ref_sha(repo, ref)
    if tip is None:
        raise GitError(f"the integration branch {integration} does not exist", ref=ref)
    if tip == expected_parent:
        return Done(tip) if await _is_ancestor(repo, task_sha, tip) else NotStarted()
    if await _is_ancestor(repo, expected_parent, tip):
        lines = await _git(repo, "rev-list", "--first-parent", "--parents", tip, "--not", expected_parent)
        for line in lines.text().splitlines():
            commit, *parents = line.split()
            if parents == [expected_parent, task_sha]:
                return Done(commit)
    return Moved(tip)


# --- inside: running git -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Result:
    returncode: int
    stdout: bytes

    def text(self) -> str:
        return self.stdout.decode("utf-8", "surrogateescape").strip()


def _environment(cwd: Path) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        # Look for the repository in `cwd` itself and nowhere above it.
        "GIT_CEILING_DIRECTORIES": _ceiling(str(cwd)),
    }
    if "HOME" in os.environ:  # `~` in the repository's own config
        env["HOME"] = os.environ["HOME"]
    return env


@functools.lru_cache(maxsize=1024)
def _ceiling(cwd: str) -> str:
    """The directory above `cwd`, symlinks resolved: a stat per component, so remembered per directory."""
    return os.path.dirname(os.path.realpath(cwd))


_CONFIG = (
    "-c", "core.hooksPath=/dev/null",
    # Like a hook, core.fsmonitor names a program git runs; it only speeds up `status`-like scans.
    "-c", "core.fsmonitor=false",
    "-c", f"user.name={NUMERUS_NAME}",
    "-c", f"user.email={NUMERUS_EMAIL}",
)  # fmt: skip


async def _git(cwd: Path, *args: str, ok: Sequence[int] = (0,), env: dict[str, str] | None = None) -> _Result:
    """Run `git <args>` in `cwd` without blocking the event loop; exit codes outside `ok` raise GitError.

    A cancelled caller does not stop the command: it runs to its end (a killed git can leave a `.lock` file
    behind that fails every later command) and is reaped in the background.
    """
    cwd = Path(cwd)
    command = ["git", *args]
    where = {"command": command, "cwd": str(cwd)}
    if not cwd.is_dir():
        raise GitError(f"cannot run {_show(command)}: {cwd} is not a directory", **where)
    environment = _environment(cwd)
    if env:
        environment.update(env)
    run = asyncio.ensure_future(_run(["git", "-C", str(cwd), *_CONFIG, *args], environment))
    _running.add(run)
    run.add_done_callback(_running.discard)
    try:
        returncode, stdout, stderr = await asyncio.shield(run)
    except FileNotFoundError as e:
        raise GitError("cannot run git: no `git` executable on PATH", **where) from e
    except TimeoutError as e:
        raise GitError(f"{_show(command)} took longer than {TIMEOUT:.0f} s and was killed", **where) from e
    except OSError as e:
        raise GitError(f"cannot run {_show(command)}: {e.strerror or e}", **where) from e
    if returncode not in ok:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()[-_STDERR_LINES:]
        last = lines[-1] if lines else "(no message)"
        raise GitError(
            f"{_show(command)} failed (exit {returncode}) in {cwd}: {last}",
            **where,
            returncode=returncode,
            stderr="\n".join(lines),
        )
    return _Result(returncode, stdout)


#: Git commands whose callers were cancelled, still running: referenced here until they are reaped.
_running: set[asyncio.Future[tuple[int, bytes, bytes]]] = set()


async def _run(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Spawn `argv` with stdin from /dev/null, collect its stdout and stderr, reap it: (exit code, out, err).

    The spawn runs in a worker thread: `subprocess` spawns with vfork (as cheap at 1 GiB resident as at 50 MiB)
    and lets go of the GIL while the child gets to its exec, which on a busy machine can take milliseconds that
    the event loop would otherwise spend blocked (`os.posix_spawn` keeps the GIL). The output is read and the
    exit noticed (through a pidfd) by the event loop itself. Killed after TIMEOUT seconds (TimeoutError).
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = await asyncio.to_thread(
            subprocess.Popen, argv, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w
        )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    pid = popen.pid
    pidfd = os.pidfd_open(pid)
    output: dict[int, list[bytes]] = {out_r: [], err_r: []}
    reading = {out_r, err_r}
    ended = loop.create_future()

    def readable(fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            output[fd].append(data)
            return
        loop.remove_reader(fd)
        reading.discard(fd)
        if not reading and not ended.done():
            ended.set_result(None)

    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable, fd)
    try:
        async with asyncio.timeout(TIMEOUT):
            await ended
            await exited
    except TimeoutError:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        raise
    finally:
        for fd in (out_r, err_r, pidfd):
            loop.remove_reader(fd)
            os.close(fd)
        returncode = popen.wait()  # at once once exited; a moment after a SIGKILL
    return returncode, b"".join(output[out_r]), b"".join(output[err_r])


def _show(command: Sequence[str]) -> str:
    shown = " ".join(command)
    return shown if len(shown) <= 160 else shown[:159] + "…"


# --- inside: refs and worktrees ----------------------------------------------------------------------------


def _check_token(what: str, value: str) -> None:
    if not is_token(value):
        raise GitError(
            f"{what} {value!r} cannot name a branch (letters, digits, _ and - only, not starting with -)", value=value
        )


async def _ref_sha(repo: Path, ref: str) -> str | None:
    result = await _git(repo, "rev-parse", "--verify", "-q", "--end-of-options", f"{ref}^{{commit}}", ok=(0, 1))
    return result.text() if result.returncode == 0 else None


async def _branch_tips(repo: Path, *refs: str) -> dict[str, str]:
    """The commits the given full ref names point at, in one call; a missing ref is absent from the answer."""
    out = await _git(repo, "for-each-ref", "--format=%(objectname) %(refname)", *refs)
    tips = {name: sha for sha, name in (line.split(" ", 1) for line in out.text().splitlines())}
    # for-each-ref also lists refs beneath a pattern (`a` matches `a/b`); keep only the ones asked for.
    return {ref: tips[ref] for ref in refs if ref in tips}


async def _is_ancestor(repo: Path, ancestor: str, descendant: str) -> bool:
    result = await _git(repo, "merge-base", "--is-ancestor", ancestor, descendant, ok=(0, 1))
    return result.returncode == 0


async def _update_ref(cwd: Path, ref: str, new: str, old: str, *, reason: str) -> None:
    """Move `ref` from `old` to `new` atomically; RefMoved when it is not at `old` any more."""
    try:
        await _git(cwd, "update-ref", "-m", reason, ref, new, old)
    except GitError as e:
        actual = await _ref_sha(cwd, ref)
        if actual != old:
            raise RefMoved(
                f"{ref} is at {actual}, expected {old}: it moved while Numerus was updating it",
                ref=ref,
                expected=old,
                actual=actual,
            ) from e
        raise


async def _create_branch(repo: Path, name: str, sha: str) -> None:
    """Create `name` at `sha`, or accept it if it exists and contains `sha`."""
    ref = f"refs/heads/{name}"
    existing = await _ref_sha(repo, ref)
    if existing is None:
        # An empty old value means "must not exist": two racing creators cannot both win.
        result = await _git(repo, "update-ref", "-m", "numerus: create branch", ref, sha, "", ok=(0, 128))
        if result.returncode == 0:
            return
        existing = await _ref_sha(repo, ref)
        if existing is None:
            raise GitError(f"cannot create branch {name} at {sha}", ref=ref)
    if existing != sha and not await _is_ancestor(repo, sha, existing):
        raise GitError(
            f"branch {name} already exists at {existing}, which does not contain {sha}: left alone",
            ref=ref,
            expected=sha,
            actual=existing,
        )


@dataclass(frozen=True, slots=True)
class _WorktreeEntry:
    path: Path
    branch: str | None
    locked: str | None


async def _worktrees(repo: Path) -> list[_WorktreeEntry]:
    out = (await _git(repo, "worktree", "list", "--porcelain", "-z")).stdout
    entries = []
    for block in out.split(b"\0\0"):
        fields = {}
        for line in block.split(b"\0"):
            key, _, value = line.decode("utf-8", "surrogateescape").partition(" ")
            if key:
                fields[key] = value
        if "worktree" in fields:
            branch = fields.get("branch")
            entries.append(_WorktreeEntry(Path(fields["worktree"]), branch, fields.get("locked")))
    return entries


def _find_worktree(entries: Iterable[_WorktreeEntry], path: Path) -> _WorktreeEntry | None:
    wanted = os.path.realpath(path)
    name = os.path.basename(wanted)
    # realpath costs a stat per component: only for entries that can be it (same last name), not for all.
    return next((e for e in entries if e.path.name == name and os.path.realpath(e.path) == wanted), None)


#: One lock per event loop and repository around `git worktree` commands: two of them at once in one repository
#: race (`git worktree list` reads a half-written `.git/worktrees/<name>/commondir` of a concurrent `add`).
_worktree_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _worktree_lock(repo: Path) -> asyncio.Lock:
    locks = _worktree_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(os.path.realpath(repo), asyncio.Lock())


# --- inside: diffs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Head:
    """Where a task's worktree stands: HEAD's commit and tree, the ref HEAD is on, the base's tree."""

    sha: str
    tree: str
    ref: str  # "HEAD" when detached
    base_tree: str


async def _head(worktree: Worktree) -> _Head:
    """Read the worktree's HEAD in one command; GitError unless it is the top of a worktree descending from base."""
    info = await _git(
        worktree.path, "rev-parse", "--show-toplevel", "HEAD", "HEAD^{tree}",
        f"{worktree.base_sha}^{{tree}}", "--symbolic-full-name", "HEAD",
    )  # fmt: skip
    toplevel, sha, tree, base_tree, ref = info.stdout.decode("utf-8", "surrogateescape").splitlines()
    if os.path.realpath(toplevel) != os.path.realpath(worktree.path):
        raise GitError(f"{worktree.path} is not the top of a worktree", path=str(worktree.path))
    if sha != worktree.base_sha and not await _is_ancestor(worktree.path, worktree.base_sha, sha):
        raise BaseNotAncestor(
            f"HEAD of {worktree.path} does not descend from the task's base {worktree.base_sha}: history was "
            "rewritten or another branch checked out",
            path=str(worktree.path),
            base_sha=worktree.base_sha,
        )
    return _Head(sha, tree, ref, base_tree)


async def _diff(worktree: Worktree, tree: str) -> list[Change]:
    """The changes from the task's base to `tree`, renames found."""
    out = await _git(
        worktree.path, "diff-tree", "-r", "-z", "--no-commit-id", "--find-renames", "--name-status",
        worktree.base_sha, tree,
    )  # fmt: skip
    return _parse_name_status(out.stdout)


_KINDS: dict[str, ChangeKind] = {"A": "add", "M": "modify", "T": "modify", "D": "delete"}


def _parse_name_status(out: bytes) -> list[Change]:
    fields = [f.decode("utf-8", "surrogateescape") for f in out.split(b"\0")]
    changes = []
    i = 0
    while i < len(fields) and fields[i]:
        status = fields[i]
        if status[0] in "RC":
            old, new = fields[i + 1], fields[i + 2]
            changes.append(Change(new, "rename", old) if status[0] == "R" else Change(new, "add"))
            i += 3
        else:
            changes.append(Change(fields[i + 1], _KINDS.get(status[0], "modify")))
            i += 2
    return changes


def _parse_merge_tree(out: bytes) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(tree, conflicted paths, conflict messages) from `merge-tree --write-tree -z --name-only`."""
    fields = [f.decode("utf-8", "surrogateescape") for f in out.split(b"\0")]
    tree = fields[0]
    paths: list[str] = []
    i = 1
    while i < len(fields) and fields[i]:
        paths.append(fields[i])
        i += 1
    i += 1
    messages: list[str] = []
    # Then records: <number of paths> NUL <paths…> NUL <conflict type> NUL <message> NUL.
    while i < len(fields) and fields[i]:
        n = int(fields[i])
        involved, kind, text = fields[i + 1 : i + 1 + n], fields[i + 1 + n], fields[i + 2 + n]
        if kind.startswith("CONFLICT"):
            messages.append(text.strip())
            paths.extend(p for p in involved if p not in paths)
        i += n + 3
    return tree, tuple(sorted(set(paths))), tuple(messages)


# --- inside: claims ----------------------------------------------------------------------------------------

_FILE_COVERS: dict[str, frozenset[str]] = {
    "create": frozenset({"add"}),
    "modify": frozenset({"modify"}),
    "delete": frozenset({"delete"}),
}
_DIR_COVERS: dict[str, frozenset[str]] = {
    "create": frozenset({"add"}),
    "modify": frozenset({"add", "modify"}),
    "delete": frozenset({"delete"}),
}
_VERB = {"add": "created", "modify": "modified", "delete": "deleted"}


def _normalise(path: str) -> str:
    path = posixpath.normpath(path.strip()) if path.strip() else "."
    return "" if path == "." else path.removeprefix("./")


def _beneath(path: str, directory: str) -> bool:
    return directory == "" or path == directory or path.startswith(directory + "/")


def _uncovered(claims: Sequence[tuple[str, str, str]], path: str, kind: str) -> str | None:
    """None when some claim covers `kind` at `path`, else why not."""
    near: list[str] = []
    for claim_path, claim_kind, mode in claims:
        if claim_kind == "dir":
            if not _beneath(path, claim_path):
                continue
            if kind in _DIR_COVERS.get(mode, frozenset()):
                return None
            near.append(f"directory {claim_path or '.'} is claimed for {mode}")
        else:
            if path != claim_path:
                continue
            if kind in _FILE_COVERS.get(mode, frozenset()):
                return None
            near.append(f"it is claimed for {mode}")
    if near:
        return f"{_VERB[kind]}, but {'; '.join(near)}"
    return f"{_VERB[kind]}, but no claim covers it"
