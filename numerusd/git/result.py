"""A job's result, reviewed and taken: its diff (bounded), a branch of the user's moved to it, that branch pushed.

Everything else of the package works in Numerus's mirror; `take` and `push` are the two places where Numerus
moves a ref of the user's repository other than by fetching its own branches (`mirror.publish`), and each is
asked for by the user (`numerusctl accept`). They keep the promises of the rest of the package:

- a branch only moves forward: one holding a commit the result does not (the user committed on it, or it
  diverged) is refused (`NotFastForward`) and left as it is;
- uncommitted work is never touched: a branch checked out in one of the user's worktrees moves only when none of
  the files the move changes holds uncommitted work (staged, unstaged, untracked or ignored), which
  `UncommittedWork` names; otherwise the checkout is updated as `git merge --ff-only` updates it (that command
  does it, and itself refuses to overwrite local changes), never by a merge commit;
- hooks never run (`command.git`: `core.hooksPath=/dev/null`; `post-merge`, `reference-transaction`,
  `pre-push`), nor does autostash, and a push goes only to a remote the repository names (never a URL given
  by whoever asks), never over the `ext::` transport, which runs a command.

The diff is written by git into a file and only the part shown is read: a job may have committed a file of
gigabytes, which must not become the daemon's memory.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from numerusd.git.command import git
from numerusd.git.errors import GitError, NotFastForward, UncommittedWork
from numerusd.git.refs import is_ancestor, ref_sha, update_ref
from numerusd.git.worktrees import list_worktrees, worktree_lock

#: Longest branch name `accept --branch` takes (git allows more; nobody types more).
MAX_BRANCH_NAME = 200
#: Paths per `git status` when looking for uncommitted work among the paths a move changes (the command line's
#: length is bounded).
_PATHS_PER_STATUS = 500


@dataclass(frozen=True, slots=True)
class DiffText:
    """A diff, or its first part: `text` holds its first `shown` bytes (cut at a line's end) of `size`."""

    text: str
    size: int
    shown: int

    @property
    def cut(self) -> bool:
        """Whether part of the diff was left out."""
        return self.shown < self.size


@dataclass(frozen=True, slots=True)
class Taken:
    """A branch of the user's moved to the result: where it was (`previous`, None: it was created) and the
    worktree whose files were updated with it (None: it was not checked out)."""

    branch: str
    sha: str
    previous: str | None
    checkout: Path | None


async def diff(
    repo: Path, base: str, head: str, *, limit: int, scratch: Path, stat: bool = False, width: int = 80
) -> DiffText:
    """`git diff base head` in `repo`, or with `stat` its `--stat` summary `width` columns wide: at most `limit`
    bytes of it.

    Renames are found; no colour, external diff or textconv program. git writes it to a file in `scratch`,
    removed afterwards, of which only `limit` bytes are read.
    """
    for rev in (base, head):
        if rev.startswith("-"):
            raise GitError(f"not a revision: {rev!r}", rev=rev)
    fd, name = tempfile.mkstemp(dir=scratch, prefix="diff-")
    os.close(fd)
    try:
        options = ["--no-color", "--no-ext-diff", "--no-textconv", "--find-renames", f"--output={name}"]
        if stat:
            options.append(f"--stat={width}")
        await git(repo, "diff", *options, base, head, "--")
        size, data = await asyncio.to_thread(_head_of, name, limit)
    finally:
        os.unlink(name)
    if size > limit:
        data = data[: data.rfind(b"\n") + 1]  # whole lines only (nothing when the first line is longer)
    return DiffText(data.decode("utf-8", "replace"), size, len(data))


def _head_of(path: str, limit: int) -> tuple[int, bytes]:
    with open(path, "rb") as file:
        return os.fstat(file.fileno()).st_size, file.read(limit)


async def check_branch_name(name: str) -> None:
    """GitError, saying why, unless `name` may name a branch `accept` creates or moves.

    Refused besides what git refuses (`..`, spaces, `~^:?*[\\`, `@{`, a leading `-` or `.`, …): a full ref name
    (`refs/heads/main`: a branch is named by its short name), `HEAD`, and the branches that are Numerus's own
    (a job's integration and task branches, which `discard` deletes).
    """
    why = None
    if not name or name.startswith("-"):
        why = "a branch name cannot be empty or start with '-'"
    elif len(name) > MAX_BRANCH_NAME:
        why = f"a branch name of at most {MAX_BRANCH_NAME} characters"
    elif name.startswith("refs/") or name == "HEAD":
        why = "name the branch by its short name (main, not refs/heads/main)"
    elif name.startswith("numerus/") and (name.endswith(".integration") or "/" in name.removeprefix("numerus/")):
        why = "that is a branch Numerus keeps for a job (its integration or a task's branch)"
    elif (await git(Path("/"), "check-ref-format", f"refs/heads/{name}", ok=(0, 1))).returncode != 0:
        why = "git does not take it as a branch name (see 'git help check-ref-format')"
    if why is not None:
        raise GitError(f"cannot use {name!r} as the branch: {why}", branch=name)


async def current_branch(repo: Path) -> str | None:
    """The branch `repo`'s HEAD is on (its short name); None when HEAD is detached."""
    result = await git(repo, "symbolic-ref", "-q", "HEAD", ok=(0, 1))
    ref = result.text()
    return ref.removeprefix("refs/heads/") if result.returncode == 0 and ref.startswith("refs/heads/") else None


async def bring(repo: Path, source: Path, sha: str) -> None:
    """Make sure `repo` holds commit `sha`, fetching it from the repository `source` (Numerus's mirror) by its sha
    if not: objects only, no ref is written."""
    if (await git(repo, "cat-file", "-e", f"{sha}^{{commit}}", ok=(0, 1, 128))).returncode != 0:
        fetch = ("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", "--no-auto-gc")
        await git(repo, *fetch, str(source), sha)


async def take(repo: Path, branch: str, tip: str, *, create: bool = True) -> Taken:
    """Move `branch` of the user's repository `repo` forward to commit `tip` (which `repo` must hold), creating it
    if it does not exist (without `create`: NotFastForward).

    NotFastForward when the branch holds a commit `tip` does not contain. When one of `repo`'s worktrees has the
    branch checked out, its files are updated with it (`git merge --ff-only` in that worktree), and only if none
    of the files the move changes holds uncommitted work: else UncommittedWork naming them. Nothing is changed
    when it refuses. Taking a branch already at `tip` changes nothing.
    """
    ref = f"refs/heads/{branch}"
    async with worktree_lock(repo):  # no worktree of Numerus's is added or removed in `repo` meanwhile
        previous = await ref_sha(repo, ref)
        if previous is None and not create:
            raise NotFastForward(f"{branch} does not exist in {repo}", branch=branch, tip=tip)
        if previous is None:
            await git(repo, "update-ref", "-m", "numerus: accept", ref, tip, "")
            return Taken(branch, tip, None, None)
        if previous == tip:
            return Taken(branch, tip, previous, None)
        if not await is_ancestor(repo, previous, tip):
            raise NotFastForward(
                f"{branch} is at {previous[:12]}, which the result ({tip[:12]}) does not contain: it moved or "
                "diverged since the job started",
                branch=branch,
                actual=previous,
                tip=tip,
            )
        checkout = next((entry.path for entry in await list_worktrees(repo) if entry.branch == ref), None)
        if checkout is None:
            await update_ref(repo, ref, tip, previous, reason="numerus: accept (fast-forward)")
            return Taken(branch, tip, previous, None)
        dirty = await _uncommitted_among(checkout, await _changed_paths(repo, previous, tip))
        if dirty:
            shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            raise UncommittedWork(
                f"{branch} is checked out in {checkout} with uncommitted changes to files the result changes: {shown}",
                branch=branch,
                paths=dirty,
            )
        # As `git merge --ff-only` does it, because it is that: the index and files move with the branch, and git
        # itself refuses (changing nothing) if local changes appeared since the look above. No autostash.
        await git(checkout, "merge", "--ff-only", "--no-autostash", "--quiet", tip)
        return Taken(branch, tip, previous, checkout)


async def _changed_paths(repo: Path, old: str, new: str) -> list[str]:
    """The paths that differ between two commits (both halves of a rename)."""
    out = await git(repo, "diff", "--name-only", "-z", "--no-renames", "--no-ext-diff", "--no-textconv", old, new)
    return [path.decode("utf-8", "surrogateescape") for path in out.stdout.split(b"\0") if path]


async def _uncommitted_among(checkout: Path, paths: list[str]) -> list[str]:
    """Which of `paths` hold work the checkout's HEAD does not: staged, unstaged, untracked, or ignored (a move
    would overwrite an ignored file, a `.env`, silently)."""
    found: list[str] = []
    status = ("--literal-pathspecs", "--no-optional-locks", "status", "--porcelain=v1", "-z", "--no-renames")
    for start in range(0, len(paths), _PATHS_PER_STATUS):
        chunk = paths[start : start + _PATHS_PER_STATUS]
        out = await git(checkout, *status, "--untracked-files=all", "--ignored=matching", "--", *chunk)
        found += [entry[3:].decode("utf-8", "surrogateescape") for entry in out.stdout.split(b"\0") if entry]
    return sorted(found)


async def check_remote(repo: Path, remote: str) -> None:
    """GitError unless `remote` is the name of one of `repo`'s remotes (`git remote`): never a URL or a path given
    by whoever asks, so no transport that runs a command (`ext::`) can be named."""
    remotes = (await git(repo, "remote")).text().splitlines()
    if remote not in remotes:
        known = ", ".join(remotes) if remotes else "it has none"
        raise GitError(f"{remote!r} is not a remote of {repo} ({known}): name one 'git remote' lists", remote=remote)


async def push(repo: Path, remote: str, branch: str) -> None:
    """Push `branch` of `repo` to its remote named `remote` (see `check_remote`), as a fast-forward (never forced).

    The `ext` transport is refused whatever the repository's configuration says, and no pre-push hook runs.
    """
    await check_remote(repo, remote)
    ref = f"refs/heads/{branch}"
    await git(repo, "-c", "protocol.ext.allow=never", "push", "--quiet", "--no-verify", remote, f"{ref}:{ref}")
