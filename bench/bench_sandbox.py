"""What the agents' sandbox adds to starting an agent: a sandboxed spawn against a bare spawn of the same program.

    python bench/bench_sandbox.py [--spawns 200] [--block 20]

This process plays the daemon. Each spawn starts `printf x` through `numerusd.terminal.spawn` under uvloop, as
the daemon starts an agent (a PTY, `setsid --ctty`), bare or inside the sandbox an executor gets
(`numerusd.sandbox.for_agent`: bwrap with a read-only root, a private /tmp, the state directory and the
repository hidden, the task's worktree bound back writable and its git metadata read-only), and is timed until
its first output has been read (bwrap's set-up is all before the program runs) and until it has exited and been
reaped. Bare and sandboxed spawns take turns in blocks of `--block`, so load on the machine hits both alike.
Reports p50 and p90 in milliseconds of each, and the sandbox's overhead at p50.

Target (issue 14): the sandbox adds at most 10 ms to a spawn at p50.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, report, run

from numerusd.agents.base import AgentProfile
from numerusd.agents.registry import adapter_for
from numerusd.sandbox import Sandbox, for_agent
from numerusd.terminal import spawn

#: The child: one byte of output, then exit.
CHILD = [shutil.which("printf") or "/usr/bin/printf", "x"]
WARMUP = 5


async def spawn_block(n: int, cwd: Path, sandbox: Sandbox | None, firsts: list[float], ends: list[float]) -> None:
    """`n` spawns of CHILD, in `sandbox` or bare; ms until the first output and until reaped."""
    for _ in range(n):
        started = time.perf_counter()
        terminal = await spawn(CHILD, cwd=cwd, sandbox=sandbox)
        first = await terminal.read()
        output = time.perf_counter()
        assert first.startswith(b"x"), first
        try:
            while await terminal.read():
                pass
            assert await terminal.wait() == (0, None)
        finally:
            terminal.close()
        firsts.append((output - started) * 1000)
        ends.append((time.perf_counter() - started) * 1000)


def executor_sandbox(root: Path) -> Sandbox:
    """The sandbox of an executor whose worktree is in a state directory, beside the user's repository."""
    state, repo = root / "state", root / "repo"
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "base"], check=True)
    worktree = state / "worktrees" / "job" / "t1"
    subprocess.run([*git, "-C", str(repo), "worktree", "add", "-q", str(worktree)], check=True)
    profile = AgentProfile(kind="scripted")
    jail = for_agent(profile, adapter_for(profile), workdir=worktree, writable=True, hidden=(state, repo))
    assert jail is not None
    return jail


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="numerus-bench-sandbox-") as tmp:
        root = Path(tmp)
        jail = executor_sandbox(root)
        ways: dict[str, Sandbox | None] = {"bare": None, "sandboxed": jail}
        firsts: dict[str, list[float]] = {way: [] for way in ways}
        ends: dict[str, list[float]] = {way: [] for way in ways}
        for sandbox in ways.values():
            await spawn_block(WARMUP, root, sandbox, [], [])
        done = 0
        while done < args.spawns:
            n = min(args.block, args.spawns - done)
            for way, sandbox in ways.items():
                await spawn_block(n, root, sandbox, firsts[way], ends[way])
            done += n
    figures: dict[str, float | int] = {"spawns": args.spawns}
    for way in ways:
        figures[f"{way}_first_ms_p50"] = round(statistics.median(firsts[way]), 2)
        figures[f"{way}_first_ms_p90"] = round(percentile(firsts[way], 90), 2)
        figures[f"{way}_exit_ms_p50"] = round(statistics.median(ends[way]), 2)
        figures[f"{way}_exit_ms_p90"] = round(percentile(ends[way], 90), 2)
    figures["overhead_ms_p50"] = round(figures["sandboxed_exit_ms_p50"] - figures["bare_exit_ms_p50"], 2)
    report("sandbox", **figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, default=200, help="spawns of each way")
    parser.add_argument("--block", type=int, default=20, help="spawns of one way before the other's turn")
    arguments = parser.parse_args()
    run(lambda: main(arguments))
