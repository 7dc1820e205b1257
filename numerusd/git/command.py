"""Running the `git` binary for Numerus: a clean environment, no hooks, a timeout, failures as `GitError`.

How git runs:
- the real `git` binary, started the daemon's one way (`numerusd.processes`: vfork in a worker thread, its pipes
  and a pidfd read by the event loop), which costs the same at 1 GiB resident as at 50 MiB; docs/git.md has the
  measurements. A cancelled caller does not stop a git command already running (a killed git can leave a
  `.lock` file behind that fails every later command); that is one more reason every step of the package can
  tell afterwards whether it happened.
- a clean environment: no system or global config (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`), so the
  result does not depend on who runs the daemon (a global `color.ui=always`, `commit.gpgSign` or excludes file
  would change it); the repository's own config still applies. No prompts, C locale, and no inherited
  `GIT_DIR`-style variables. `GIT_CEILING_DIRECTORIES` stops git from looking above the directory it is given,
  so a broken worktree path can never make git act on some enclosing repository (a home directory under git).
- hooks are off (`core.hooksPath=/dev/null`): Numerus's commits and merges are bookkeeping; checks belong to the
  quality gate, where they run with a timeout and are recorded as events. A hook would run with the daemon's
  rights code that an agent with write access to `.git` could have put there. So is `core.fsmonitor` (a program
  too), and no pager runs; readers of diffs pass `--no-ext-diff --no-textconv`.
- a task's worktree is given to git as `--git-dir`/`--work-tree` (the `git_dir` argument), never found through
  the `.git` the agent could rewrite; and every repository Numerus writes is its own mirror (`mirror.py`).
- Numerus's own commits are made with plumbing (`commit-tree`, `update-ref`), as `Numerus <numerus@localhost>`
  unless told otherwise, never signed.

This module is the one place where a git command that fails, or cannot run, becomes a `GitError`.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from numerusd import processes
from numerusd.git.errors import GitError

#: Who Numerus's own commits are by, unless a caller says otherwise.
NUMERUS_NAME = "Numerus"
NUMERUS_EMAIL = "numerus@localhost"
#: A git command taking longer than this is killed and reported (a huge checkout, a stuck filesystem).
TIMEOUT = 600.0
#: `git merge-tree --write-tree`, which merges without a working tree, came with git 2.38.
MINIMUM_VERSION = (2, 38)
_STDERR_LINES = 20


@dataclass(frozen=True, slots=True)
class Output:
    """What a git command that ended with an accepted exit code printed on its standard output."""

    returncode: int
    stdout: bytes

    def text(self) -> str:
        """The output as text, stripped: a sha, a ref name, lines."""
        return self.stdout.decode("utf-8", "surrogateescape").strip()


async def check_git() -> tuple[int, ...]:
    """The version of the `git` on PATH; GitError when there is none or it is older than MINIMUM_VERSION.

    Meant for daemon startup, so a too-old git is reported at once rather than at the first merge.
    """
    out = (await git(Path("/"), "--version")).text()  # "git version 2.39.5" (vendors may append more)
    try:
        version = tuple(int(part) for part in out.split()[2].split(".")[:3] if part.isdigit())
    except IndexError:
        version = ()
    if version[:2] < MINIMUM_VERSION:
        wanted = ".".join(map(str, MINIMUM_VERSION))
        raise GitError(f"Numerus needs git {wanted} or newer; PATH has {out!r}", version=out)
    return version


_CONFIG = (
    "-c", "core.hooksPath=/dev/null",
    # Like a hook, core.fsmonitor names a program git runs; it only speeds up `status`-like scans.
    "-c", "core.fsmonitor=false",
    "-c", f"user.name={NUMERUS_NAME}",
    "-c", f"user.email={NUMERUS_EMAIL}",
)  # fmt: skip


async def git(
    cwd: Path,
    *args: str,
    ok: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
    git_dir: Path | None = None,
) -> Output:
    """Run `git <args>` in `cwd` without blocking the event loop; exit codes outside `ok` raise GitError.

    `env` adds to the clean environment (an author for `commit-tree`). With `git_dir`, `cwd` is a worktree whose
    repository is `git_dir`, given to git explicitly: whatever `.git` the worktree holds (an agent may have
    replaced it) is then only a path in the tree, never a repository git reads. A cancelled caller does not stop
    the command: it runs to its end and is reaped in the background.
    """
    cwd = Path(cwd)
    command = ["git", *args]
    where = {"command": command, "cwd": str(cwd)}
    if not cwd.is_dir():
        raise GitError(f"cannot run {_show(command)}: {cwd} is not a directory", **where)
    environment = _environment(cwd)
    if env:
        environment.update(env)
    repository = () if git_dir is None else (f"--git-dir={git_dir}", f"--work-tree={cwd}")
    run = asyncio.ensure_future(
        processes.run(["git", "-C", str(cwd), *repository, *_CONFIG, *args], env=environment, timeout=TIMEOUT)
    )
    _running.add(run)
    run.add_done_callback(_running.discard)
    try:
        completed = await asyncio.shield(run)
    except FileNotFoundError as e:
        raise GitError("cannot run git: no `git` executable on PATH", **where) from e
    except TimeoutError as e:
        raise GitError(f"{_show(command)} took longer than {TIMEOUT:.0f} s and was killed", **where) from e
    except OSError as e:
        raise GitError(f"cannot run {_show(command)}: {e.strerror or e}", **where) from e
    if completed.returncode not in ok:
        lines = completed.stderr.decode("utf-8", "replace").strip().splitlines()[-_STDERR_LINES:]
        last = lines[-1] if lines else "(no message)"
        raise GitError(
            f"{_show(command)} failed (exit {completed.returncode}) in {cwd}: {last}",
            **where,
            returncode=completed.returncode,
            stderr="\n".join(lines),
        )
    return Output(completed.returncode, completed.stdout)


#: Git commands whose callers were cancelled, still running: referenced here until they are reaped.
_running: set[asyncio.Future[processes.Completed]] = set()


def _environment(cwd: Path) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_PAGER": "cat",
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


def _show(command: Sequence[str]) -> str:
    shown = " ".join(command)
    return shown if len(shown) <= 160 else shown[:159] + "…"
