"""Merging a task's branch into its job's integration branch, and telling after a crash whether that happened.

Nothing here touches a working tree, an index or the user's current branch: a merge is computed with
`git merge-tree --write-tree`, committed with `commit-tree` (always a merge commit, integration first, task
second) and lands with one `update-ref <ref> <new> <expected-old>`. `merge_state` answers the question a restart
asks between an intent event (MergeStarted) and its outcome (TaskMerged): done, not started, or moved otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from numerusd.git.command import git
from numerusd.git.errors import GitError, RefMoved
from numerusd.git.refs import branch_tips, is_ancestor, ref_sha, update_ref
from numerusd.git.worktrees import refuse_checked_out


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
    tips = await branch_tips(repo, ref, task_ref)
    if ref not in tips:
        raise GitError(f"the integration branch {integration} does not exist", ref=ref)
    if task_sha is None and task_ref not in tips:
        raise GitError(f"the task branch {task} does not exist", ref=task_ref)
    current = tips[ref]
    parent = expected_integration or current
    theirs = task_sha or tips[task_ref]
    await refuse_checked_out(repo, integration)
    if current != parent:
        raise RefMoved(
            f"{integration} is at {current}, expected {parent}: it moved since the merge was decided",
            ref=ref,
            expected=parent,
            actual=current,
        )
    if await is_ancestor(repo, theirs, parent):
        return Merged(sha=parent, parent=parent, task_sha=theirs, created=False)
    result = await git(repo, "merge-tree", "--write-tree", "-z", "--name-only", parent, theirs, ok=(0, 1))
    tree, paths, messages = _parse_merge_tree(result.stdout)
    if result.returncode == 1:
        return Conflict(paths=paths, messages=messages, parent=parent, task_sha=theirs)
    new = (await git(repo, "commit-tree", "--no-gpg-sign", tree, "-p", parent, "-p", theirs, "-m", message)).text()
    await update_ref(repo, ref, new, parent, reason=f"numerus: merge {task}")
    return Merged(sha=new, parent=parent, task_sha=theirs)


async def merge_state(repo: Path, integration: str, expected_parent: str, task_sha: str) -> MergeState:
    """Whether the merge of `task_sha` into `integration` on top of `expected_parent` already happened.

    For the restart after a crash between an intent event (MergeStarted) and its outcome (TaskMerged):
    Done(sha) when the branch holds a merge commit with parents exactly (`expected_parent`, `task_sha`) on its
    first-parent line since `expected_parent` (or when there was nothing to merge); NotStarted when the branch
    is still at `expected_parent`; Moved(tip) when it moved some other way.
    """
    ref = f"refs/heads/{integration}"
    tip = await ref_sha(repo, ref)
    if tip is None:
        raise GitError(f"the integration branch {integration} does not exist", ref=ref)
    if tip == expected_parent:
        return Done(tip) if await is_ancestor(repo, task_sha, tip) else NotStarted()
    if await is_ancestor(repo, expected_parent, tip):
        lines = await git(repo, "rev-list", "--first-parent", "--parents", tip, "--not", expected_parent)
        for line in lines.text().splitlines():
            commit, *parents = line.split()
            if parents == [expected_parent, task_sha]:
                return Done(commit)
    return Moved(tip)


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
