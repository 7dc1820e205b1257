"""Read-only checkouts of a job's commits, for the agents that are only asked questions.

The planner, the queen and the claimers read the repository to answer: they should read what the job's tasks
will start from, not the user's working tree (which may hold uncommitted work the tasks never see, and lacks
what the job has merged so far). `Checkouts.at(sha)` lends a detached worktree of `sha`, shared by the calls
asking at that commit. A checkout nobody reads is moved to the next commit asked for (git rewrites only the
files that differ, where a new checkout writes them all: a task's claim in a large repository then costs little
more than its worktree does); the newest stays until the job ends, the others are removed once nobody reads them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from numerusd import git

#: A job's checkouts are in `<worktrees>/<job><CHECKOUTS_SUFFIX>/`, beside its tasks' `<worktrees>/<job>/`.
CHECKOUTS_SUFFIX = ".checkouts"


class Checkouts:
    """The read-only checkouts of one job, directories of `root`."""

    def __init__(self, repo: Path, root: Path) -> None:
        self._repo = repo
        self._root = root
        self._made: dict[str, Path] = {}
        self._readers: collections.Counter[str] = collections.Counter()
        self._newest: str | None = None
        self._made_count = 0
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def at(self, sha: str) -> AsyncIterator[Path]:
        """A checkout of commit `sha`, for as long as the block runs."""
        async with self._lock:
            self._newest = sha
            if sha not in self._made:
                self._made[sha] = await self._checkout(sha)
            self._readers[sha] += 1
            path = self._made[sha]  # while it has readers, nothing moves or removes it
        try:
            yield path
        finally:
            self._readers[sha] -= 1
            await asyncio.shield(self._tidy())  # a cancelled reader still lets go of what it read

    async def _tidy(self) -> None:
        async with self._lock:
            await self._drop(lambda made: made != self._newest and not self._readers[made])

    async def _checkout(self, sha: str) -> Path:
        idle = next((made for made in self._made if not self._readers[made]), None)
        if idle is not None:
            path = self._made.pop(idle)
            del self._readers[idle]
            try:
                await git.move_checkout(self._repo, path, sha)
                return path
            except git.GitError:
                await git.remove_checkout(self._repo, path)  # damaged: made again below
        self._made_count += 1
        return await git.create_checkout(self._repo, sha, self._root / str(self._made_count))

    async def clear(self) -> None:
        """Remove every checkout, also those a crashed daemon left in `root`, and `root` itself (made again when
        a checkout is asked for)."""
        async with self._lock:
            await self._drop(lambda _made: True)
            for name in os.listdir(self._root) if self._root.is_dir() else ():
                await git.remove_checkout(self._repo, self._root / name)
            with contextlib.suppress(FileNotFoundError):
                self._root.rmdir()

    async def _drop(self, unused: Callable[[str], bool]) -> None:
        for sha in [sha for sha in self._made if unused(sha)]:
            await git.remove_checkout(self._repo, self._made.pop(sha))
            del self._readers[sha]
