"""Running one check command of the quality gate (a job's configured tests and linters) in a task's worktree.

A check is `/bin/sh -c COMMAND` in the worktree, in the executor's sandbox (it runs the code the agent wrote),
started the daemon's one way (`numerusd.processes`), with the daemon's environment without its secrets, as agents
get it. Its standard output and error are one text, in the order written. It leads its own process group, and the
group goes with it: when the shell exits, when the check runs out of time, and when the gate is cancelled (a job
killed), so nothing a check started outlives it.
"""

from __future__ import annotations

import time
from pathlib import Path

from numerusd import processes
from numerusd.sandbox import Sandbox

#: The most of a check's output the daemon holds: its end (what the gate records is shorter still), however much a
#: test the agent wrote prints.
KEEP_BYTES = 64 * 1024


async def run_check(
    cwd: Path, command: str, *, timeout: float, sandbox: Sandbox | None = None
) -> tuple[int | None, str, float]:
    """Run `command` in `cwd`: its exit code (None when it ran out of `timeout` seconds), output (its last
    `KEEP_BYTES`) and duration (s).

    A check runs code an agent wrote (its tests, its build), so it runs in `sandbox` as the agent did (None: as
    it is). The output of a check that ran out of time is a sentence saying so. OS errors (no such directory) are
    raised.
    """
    started = time.monotonic()
    shell = ["/bin/sh", "-c", command]
    try:
        completed = await processes.run(
            [*sandbox.prefix(), *shell] if sandbox is not None else shell,
            cwd=cwd,
            env=processes.inherited_environment(),
            timeout=timeout,
            merge_stderr=True,
            new_session=True,
            keep_last=KEEP_BYTES,
        )
    except TimeoutError:
        return None, f"stopped after {timeout:g} s", time.monotonic() - started
    return completed.returncode, completed.stdout.decode("utf-8", "replace"), time.monotonic() - started
