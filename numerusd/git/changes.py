"""What a task changed: its work committed on its branch, its real diff against its base, and what a user's
working tree holds that its HEAD does not.

A task's real diff is what the quality gate checks against the task's claim (`numerusd.claims`) and what its
reviewer sees: the worktree's files as they are against the commit the task started from, whoever changed them.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from numerusd.git.command import git
from numerusd.git.errors import BaseNotAncestor, GitError
from numerusd.git.refs import is_ancestor, update_ref
from numerusd.git.worktrees import Worktree

#: How a path changed; a rename also names the path it had before.
ChangeKind = Literal["add", "modify", "delete", "rename"]


#: Git's modes for what is not a plain file: a symbolic link, and a gitlink (a submodule's commit).
SYMLINK_MODE = "120000"
GITLINK_MODE = "160000"


@dataclass(frozen=True, slots=True)
class Change:
    """One changed path relative to a task's base: relative, POSIX. A rename also names the old path.

    `mode` is the path's mode in the committed tree (its old mode for a delete), as git writes it (`100644`,
    `120000` a symlink, `160000` a gitlink); `target` is where a symlink added or changed points.
    """

    path: str
    kind: ChangeKind
    old_path: str | None = None
    mode: str = ""
    old_mode: str = ""
    target: str | None = None


@dataclass(frozen=True, slots=True)
class Work:
    """A task's work, committed: the task branch's tip and every path changed since the task's base."""

    commit: str
    changes: tuple[Change, ...]


async def uncommitted(repo: Path) -> list[str]:
    """The paths of `repo`'s working tree whose state is not in its HEAD commit: staged, unstaged and untracked
    changes alike (an untracked directory is one path, ending in `/`); ignored files are not changes.

    A planned job works from a commit, so these are what its agents will not see.
    """
    # No optional locks: `status` would otherwise refresh the user's index, and hold index.lock while it does.
    status = ("--no-optional-locks", "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=normal")
    out = await git(repo, *status)
    # Each entry is `XY <path>`, NUL-terminated (with --no-renames never followed by an old path).
    return [entry[3:].decode("utf-8", "surrogateescape") for entry in out.stdout.split(b"\0") if entry]


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
    planted = _planted_dot_git(worktree)
    await git(worktree.path, "add", "--all", git_dir=worktree.git_dir)
    tree = (await git(worktree.path, "write-tree", git_dir=worktree.git_dir)).text()
    tip = head.sha
    if tree != head.tree:
        env = {}
        if author is not None:
            env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1]}
        commit_tree = ("commit-tree", "--no-gpg-sign", tree, "-p", head.sha, "-m", message)
        tip = (await git(worktree.path, *commit_tree, env=env, git_dir=worktree.git_dir)).text()
        await update_ref(
            worktree.path,
            ref,
            tip,
            head.sha,
            reason=f"numerus: commit the work of {worktree.branch}",
            git_dir=worktree.git_dir,
        )
    changes = [] if tree == head.base_tree else await _diff(worktree, tree)
    return Work(tip, tuple(changes) + planted)


# --- inside ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Head:
    """Where a task's worktree stands: HEAD's commit and tree, the ref HEAD is on, the base's tree."""

    sha: str
    tree: str
    ref: str  # "HEAD" when detached
    base_tree: str


async def _head(worktree: Worktree) -> _Head:
    """Read the worktree's HEAD in one command; GitError unless it is the top of a worktree descending from base."""
    info = await git(
        worktree.path, "rev-parse", "--show-toplevel", "HEAD", "HEAD^{tree}",
        f"{worktree.base_sha}^{{tree}}", "--symbolic-full-name", "HEAD", git_dir=worktree.git_dir,
    )  # fmt: skip
    toplevel, sha, tree, base_tree, ref = info.stdout.decode("utf-8", "surrogateescape").splitlines()
    if os.path.realpath(toplevel) != os.path.realpath(worktree.path):
        raise GitError(f"{worktree.path} is not the top of a worktree", path=str(worktree.path))
    if sha != worktree.base_sha and not await is_ancestor(worktree.path, worktree.base_sha, sha, worktree.git_dir):
        raise BaseNotAncestor(
            f"HEAD of {worktree.path} does not descend from the task's base {worktree.base_sha}: history was "
            "rewritten or another branch checked out",
            path=str(worktree.path),
            base_sha=worktree.base_sha,
        )
    return _Head(sha, tree, ref, base_tree)


def _planted_dot_git(worktree: Worktree) -> tuple[Change, ...]:
    """Every `.git` in the worktree that git did not put there, as a change: the root's own `.git` when it is not
    the file git wrote (naming this worktree's administrative directory), and a `.git` anywhere below (a planted
    repository, or a directory only named so). Git never adds a `.git` to a tree, so the diff cannot show them;
    the gate names them from here. The walk follows no symlink."""
    if worktree.git_dir is None:
        return ()
    planted: list[Change] = []
    dot_git = worktree.path / ".git"
    try:
        if not stat.S_ISREG(os.lstat(dot_git).st_mode):
            planted.append(Change(".git", "modify"))
        else:
            named = dot_git.read_text("utf-8", "surrogateescape").strip().removeprefix("gitdir:").strip()
            if os.path.realpath(named) != os.path.realpath(worktree.git_dir):
                planted.append(Change(".git", "modify"))
    except OSError:
        planted.append(Change(".git", "delete"))
    for root, dirs, files in os.walk(worktree.path):
        here = os.path.relpath(root, worktree.path)
        for name in (*dirs, *files):
            # The root's own `.git` was checked above; git refuses `.GIT`, `.git.` and the like as it does `.git`.
            if name.rstrip(". ").lower() == ".git" and (here != "." or name != ".git"):
                planted.append(Change(posixpath.normpath(posixpath.join(Path(here).as_posix(), name)), "add"))
        dirs[:] = [name for name in dirs if name.rstrip(". ").lower() != ".git"]
    return tuple(planted)


async def _diff(worktree: Worktree, tree: str) -> list[Change]:
    """The changes from the task's base to `tree`, renames found, with their modes and symlinks' targets."""
    out = await git(
        worktree.path, "diff-tree", "-r", "-z", "--no-commit-id", "--find-renames", "--raw", "--no-ext-diff",
        "--no-textconv", worktree.base_sha, tree, git_dir=worktree.git_dir,
    )  # fmt: skip
    changes = []
    for change, blob in _parse_raw(out.stdout):
        if change.mode == SYMLINK_MODE and change.kind != "delete":
            # The target is the link's blob in the tree: never a link followed on disk.
            target = (await git(worktree.path, "cat-file", "blob", blob, git_dir=worktree.git_dir)).stdout
            change = replace(change, target=target.decode("utf-8", "surrogateescape"))
        changes.append(change)
    return changes


_KINDS: dict[str, ChangeKind] = {"A": "add", "M": "modify", "T": "modify", "D": "delete"}


def _parse_raw(out: bytes) -> list[tuple[Change, str]]:
    """`diff-tree -r -z --raw`: `:<old mode> <new mode> <old sha> <new sha> <status>` NUL path [NUL new path] NUL;
    each change with the sha of its new blob."""
    fields = [f.decode("utf-8", "surrogateescape") for f in out.split(b"\0")]
    changes = []
    i = 0
    while i < len(fields) and fields[i]:
        old_mode, new_mode, _old, blob, status = fields[i].lstrip(":").split(" ")
        mode = old_mode if status[0] == "D" else new_mode
        if status[0] in "RC":
            old, new = fields[i + 1], fields[i + 2]
            kind: ChangeKind = "rename" if status[0] == "R" else "add"
            changes.append((Change(new, kind, old if kind == "rename" else None, mode, old_mode), blob))
            i += 3
        else:
            changes.append((Change(fields[i + 1], _KINDS.get(status[0], "modify"), None, mode, old_mode), blob))
            i += 2
    return changes
