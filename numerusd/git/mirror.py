"""The repository Numerus owns: a bare mirror of each user repository, where all of a job's git work happens.

Task worktrees, the integration branch, the read-only checkouts and the merges all live in a bare repository
under the state directory (`<state>/repos/<name>-<hash>.git`, one per user repository), never in the user's own
`.git`: an agent that writes into the repository its worktree belongs to (a hook, a config with a command in it)
writes into the mirror, which nothing of the user's ever runs. The mirror is cloned the first time a job needs it
(`git clone --bare --no-hardlinks`, so no object file is shared with the user's repository, and without templates,
so it starts with no hooks) and fetches the commit each job starts from.

Results reach the user's repository only as fetched refs (`publish`): the job's branches are fetched from the
mirror by name, the integration branch fast-forward only, so a branch the user moved or checked out is refused,
never overwritten. Both fetches run through `command.git`, hooks off (`reference-transaction` hooks run on fetch).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from numerusd.git.command import git
from numerusd.git.errors import RefMoved
from numerusd.git.refs import branch_tips, is_ancestor, ref_sha, remove_branch, resolve
from numerusd.git.worktrees import refuse_checked_out, worktree_lock


def mirror_path(repos_dir: Path, repo: Path | str) -> Path:
    """Where the mirror of the user repository `repo` (as the job recorded it) lives: stable across restarts."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(repo).name)[:40].strip(".") or "repo"
    digest = hashlib.sha256(str(repo).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return repos_dir / f"{name}-{digest}.git"


async def prepare_mirror(repo: Path, mirror: Path, base: str) -> str:
    """Make sure `mirror` exists and holds commit `base` of `repo` (a revision of the user's repository); its sha.

    Idempotent: a clone interrupted by a crash is made again, and a commit the mirror has is not fetched again.
    """
    sha = await resolve(repo, base)
    async with worktree_lock(mirror):
        if not mirror.is_dir():
            partial = mirror.with_name(mirror.name + ".partial")
            if os.path.lexists(partial):
                shutil.rmtree(partial)
            mirror.parent.mkdir(parents=True, exist_ok=True)
            clone = ("clone", "--bare", "--quiet", "--no-hardlinks", "--template=", str(repo), str(partial))
            await git(mirror.parent, *clone)
            os.rename(partial, mirror)  # only a complete clone is ever the mirror
    if (await git(mirror, "cat-file", "-e", f"{sha}^{{commit}}", ok=(0, 1, 128))).returncode != 0:
        fetch = ("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", "--no-auto-gc")
        await git(mirror, *fetch, str(repo), sha)
    return sha


async def publish(mirror: Path, repo: Path, *branches: str) -> None:
    """Make the user's `branches` what they are in the mirror: fetched when the mirror has them, deleted when not.

    Only fast-forwards are fetched: a branch the user moved elsewhere, or has checked out in one of their
    worktrees, is refused (GitError naming it) and left as it is.
    """
    refs = [f"refs/heads/{branch}" for branch in branches]
    present = await branch_tips(mirror, *refs)
    if present:
        fetch = ("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules", "--no-auto-gc")
        await git(repo, *fetch, str(mirror), *(f"{ref}:{ref}" for ref in refs if ref in present))
    for branch, ref in zip(branches, refs, strict=True):
        if ref not in present:
            await remove_branch(repo, branch)


async def check_published(repo: Path, mirror: Path, branch: str, expected: str) -> None:
    """Before the mirror's `branch` moves from `expected`: the user's copy must not have moved elsewhere, and must
    not be checked out.

    RefMoved when the user's branch holds a commit the mirror's `expected` does not contain (somebody committed
    on it: Numerus alone moves it); a copy behind `expected` (a publication refused earlier) is fine.
    BranchCheckedOut when one of the user's worktrees has it checked out (fetching into it would be refused).
    """
    ref = f"refs/heads/{branch}"
    actual = await ref_sha(repo, ref)
    if actual is not None and actual != expected and not await _contains(mirror, expected, actual):
        raise RefMoved(
            f"{ref} is at {actual} in {repo}, expected {expected}: it moved while Numerus was updating it",
            ref=ref,
            expected=expected,
            actual=actual,
        )
    await refuse_checked_out(repo, branch)


async def _contains(mirror: Path, tip: str, commit: str) -> bool:
    """Whether the mirror's `tip` has `commit` in its history (False when the mirror has no such commit)."""
    if (await git(mirror, "cat-file", "-e", f"{commit}^{{commit}}", ok=(0, 1, 128))).returncode != 0:
        return False
    return await is_ancestor(mirror, commit, tip)
