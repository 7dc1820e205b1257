"""Branches and refs: the names of a job's branches, resolving revisions, and moving refs only from where expected.

A job's integration branch is `numerus/<job>.integration`, each task's branch `numerus/<job>/<task>`. It cannot be
`numerus/<job>`: git stores refs as files, so a ref `numerus/<job>` and refs under `numerus/<job>/` cannot both
exist. `<job>.integration` sits beside the task namespace and, since job and task ids are tokens without dots, can
never collide with a task branch.

Every ref is moved with `update-ref <ref> <new> <expected-old>`: a ref that moved meanwhile is left as it is
(`RefMoved`), and creating a branch that exists is accepted only when it already contains the wanted commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from numerusd.git.command import git
from numerusd.git.errors import GitError, RefMoved
from numerusd.protocol.ids import is_token


@dataclass(frozen=True, slots=True)
class Branch:
    """A branch Numerus created: its short name and the commit it was created at."""

    name: str
    sha: str


def integration_branch(job: str) -> str:
    """The short name of a job's integration branch."""
    _check_token("job id", job)
    return f"numerus/{job}.integration"


def accepted_branch(job: str) -> str:
    """The short name of the branch `numerusctl accept` puts a job's result on when it cannot move the user's own
    branch forward: `numerus/<job>.accepted`, beside the integration branch (a task branch cannot collide with
    it), and the user's, not Numerus's: `discard` leaves it."""
    _check_token("job id", job)
    return f"numerus/{job}.accepted"


def task_branch(job: str, task: str) -> str:
    """The short name of a task's branch."""
    _check_token("job id", job)
    _check_token("task id", task)
    return f"numerus/{job}/{task}"


async def resolve(repo: Path, rev: str) -> str:
    """The commit sha `rev` names in `repo` (a sha, a branch, `HEAD`); GitError when it names no commit."""
    if rev.startswith("-"):
        raise GitError(f"not a revision: {rev!r}", rev=rev)
    result = await git(repo, "rev-parse", "--verify", "-q", "--end-of-options", f"{rev}^{{commit}}", ok=(0, 1))
    if result.returncode != 0:
        raise GitError(f"{rev!r} names no commit in {repo}", rev=rev, cwd=str(repo))
    return result.text()


async def create_integration_branch(repo: Path, job: str, start: str = "HEAD") -> Branch:
    """Create the job's integration branch at `start` (resolved to a sha first); idempotent.

    After a crash, call it again with the sha recorded in the intent event, not with `HEAD` (the user may have
    moved on). A branch that already exists is accepted when `start` is in its history (it may have been merged
    into since); anything else raises GitError rather than adopting a stranger's branch.
    """
    name = integration_branch(job)
    sha = await resolve(repo, start)
    await create_branch(repo, name, sha)
    return Branch(name, sha)


async def task_branches(repo: Path, job: str) -> list[str]:
    """The short names of the job's task branches that exist (`numerus/<job>/<task>`; not its integration branch)."""
    parent = f"refs/heads/{task_branch(job, 'x').removesuffix('/x')}"
    # A pattern matches the refs beneath it, up to a slash: `numerus/<job>/…`, not `numerus/<job>.integration`.
    out = await git(repo, "for-each-ref", "--format=%(refname)", parent)
    return [ref.removeprefix("refs/heads/") for ref in out.text().splitlines() if ref.startswith(parent + "/")]


async def ref_sha(repo: Path, ref: str, git_dir: Path | None = None) -> str | None:
    """The commit `ref` (a full ref name) points at; None when there is no such ref."""
    verify = ("rev-parse", "--verify", "-q", "--end-of-options", f"{ref}^{{commit}}")
    result = await git(repo, *verify, ok=(0, 1), git_dir=git_dir)
    return result.text() if result.returncode == 0 else None


async def branch_tips(repo: Path, *refs: str) -> dict[str, str]:
    """The commits the given full ref names point at, in one call; a missing ref is absent from the answer."""
    out = await git(repo, "for-each-ref", "--format=%(objectname) %(refname)", *refs)
    tips = {name: sha for sha, name in (line.split(" ", 1) for line in out.text().splitlines())}
    # for-each-ref also lists refs beneath a pattern (`a` matches `a/b`); keep only the ones asked for.
    return {ref: tips[ref] for ref in refs if ref in tips}


async def is_ancestor(repo: Path, ancestor: str, descendant: str, git_dir: Path | None = None) -> bool:
    """Whether commit `ancestor` is in the history of `descendant` (a commit is its own ancestor)."""
    result = await git(repo, "merge-base", "--is-ancestor", ancestor, descendant, ok=(0, 1), git_dir=git_dir)
    return result.returncode == 0


async def update_ref(cwd: Path, ref: str, new: str, old: str, *, reason: str, git_dir: Path | None = None) -> None:
    """Move `ref` from `old` to `new` atomically; RefMoved when it is not at `old` any more."""
    try:
        await git(cwd, "update-ref", "-m", reason, ref, new, old, git_dir=git_dir)
    except GitError as e:
        actual = await ref_sha(cwd, ref, git_dir)
        if actual != old:
            raise RefMoved(
                f"{ref} is at {actual}, expected {old}: it moved while Numerus was updating it",
                ref=ref,
                expected=old,
                actual=actual,
            ) from e
        raise


async def create_branch(repo: Path, name: str, sha: str) -> None:
    """Create branch `name` at `sha`, or accept it if it exists and contains `sha`; GitError otherwise."""
    ref = f"refs/heads/{name}"
    existing = await ref_sha(repo, ref)
    if existing is None:
        # An empty old value means "must not exist": two racing creators cannot both win.
        result = await git(repo, "update-ref", "-m", "numerus: create branch", ref, sha, "", ok=(0, 128))
        if result.returncode == 0:
            return
        existing = await ref_sha(repo, ref)
        if existing is None:
            raise GitError(f"cannot create branch {name} at {sha}", ref=ref)
    if existing != sha and not await is_ancestor(repo, sha, existing):
        raise GitError(
            f"branch {name} already exists at {existing}, which does not contain {sha}: left alone",
            ref=ref,
            expected=sha,
            actual=existing,
        )


async def remove_branch(repo: Path, branch: str) -> None:
    """Delete `branch` whatever it holds, if it exists. Unlocked: `worktrees.delete_branch` is the public way."""
    ref = f"refs/heads/{branch}"
    if await ref_sha(repo, ref) is not None:
        await git(repo, "update-ref", "-d", ref)


def _check_token(what: str, value: str) -> None:
    if not is_token(value):
        raise GitError(
            f"{what} {value!r} cannot name a branch (letters, digits, _ and - only, not starting with -)", value=value
        )
