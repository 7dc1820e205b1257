"""What a running `numerusctl top` costs the daemon: its CPU while a job of 200 quick tasks runs, with and without.

    python bench/bench_top.py [--tasks 200] [--parallel 8] [--pairs 2] [--keep DIR]

Each run starts the real `numerusd` on a fresh state directory and repository with one scripted profile playing
every role (the plan of `bench_pipeline.py`: independent tasks, each claiming its own file, claims from the plan,
review off, an executor that says one line), then times `numerusctl run GOAL --wait`. In the runs "with top", a
`TopApp` (the view `numerusctl top` runs) is running headless in this process, logged in as the operator, from
before the job is submitted to its end: it follows `numerus.job.>`, redraws the 200 rows as they change, and
follows the terminal of the task under its cursor. The figure is the daemon's own CPU seconds (user + system, from
/proc) from the submission to the end of the job; its reaped children (agents, git) and its nats-server are left
out, as they are not the daemon's work.

Runs alternate without and with (`--pairs` of each); `ratio` is the median with top over the median without
(target: at most 1.10). `top_rows` is how many task rows the view showed at the end (every task, or it missed some);
`top_cpu_s` the CPU seconds of this process during a run with top (the view's own cost, on the same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BIN, git_repo, report, run, scripted_state, start_numerusd, stop_numerusd
from bench_pipeline import GOAL, NOOP, cpu_seconds, scenario

from numerusctl.connection import connected, resolve_target
from numerusctl.top import TopApp


async def one_run(where: Path, *, tasks: int, parallel: int, with_top: bool) -> tuple[float, float, int, float]:
    """The daemon's CPU seconds and the wall seconds of one job, the task rows top showed (0 without top), and the
    CPU seconds of this process meanwhile (the view's own cost)."""
    repo = git_repo(where / "repo")
    state = scripted_state(where, scenario(tasks, NOOP), f'parallel = {parallel}\nreview = false\nclaims = "plan"')
    daemon = start_numerusd(state)
    try:
        async with contextlib.AsyncExitStack() as stack:
            app: TopApp | None = None
            if with_top:
                nc = await stack.enter_async_context(connected(resolve_target(state_dir=state, nats_url=None), 5.0))
                app = TopApp(nc, timeout=5.0)
                await stack.enter_async_context(app.run_test(size=(200, 60)))
                while not app.ready:
                    await asyncio.sleep(0.05)
            before = cpu_seconds(daemon.pid)[0]
            own_before = _own_cpu()
            started = time.perf_counter()
            ctl = [str(BIN / "numerusctl"), "--state-dir", str(state)]
            job_run = await asyncio.create_subprocess_exec(
                *ctl, "run", GOAL, "--repo", str(repo), "--agent", "bench", "--wait", stdout=subprocess.PIPE
            )
            out, _ = await job_run.communicate()
            wall = time.perf_counter() - started
            spent = cpu_seconds(daemon.pid)[0] - before
            own = _own_cpu() - own_before
            if job_run.returncode != 0:
                raise SystemExit(f"the job did not complete: {out.decode()[-1500:]}")
            rows = 0
            if app is not None:
                job = out.decode().splitlines()[0].strip()
                deadline = time.monotonic() + 10
                while app.board.jobs.get(job) is None or app.board.jobs[job].status != "completed":
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                shown = app.board.jobs.get(job)
                rows = sum(task.status == "completed" for task in shown.tasks.values()) if shown else 0
    finally:
        stop_numerusd(daemon)
    return spent, wall, rows, own


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(args: argparse.Namespace) -> None:
    root = args.keep or Path(tempfile.mkdtemp(prefix="numerus-bench-top-"))
    without: list[float] = []
    with_top: list[float] = []
    walls: dict[bool, list[float]] = {False: [], True: []}
    top_cpu: list[float] = []
    rows = 0
    for pair in range(args.pairs):
        for top in (False, True):
            cpu, wall, shown, own = await one_run(
                root / f"{'top' if top else 'plain'}-{pair}", tasks=args.tasks, parallel=args.parallel, with_top=top
            )
            (with_top if top else without).append(cpu)
            walls[top].append(wall)
            if top:
                if shown != args.tasks:  # a view that missed rows did less work: its figure would flatter it
                    raise SystemExit(f"top showed {shown} of {args.tasks} tasks completed: no figure")
                rows = shown
                top_cpu.append(own)
            print(f"pair {pair} {'with' if top else 'without'} top: daemon cpu {cpu:.2f} s, wall {wall:.1f} s")
    if args.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    report(
        "top",
        tasks=args.tasks,
        pairs=args.pairs,
        daemon_cpu_s=round(statistics.median(without), 2),
        daemon_cpu_with_top_s=round(statistics.median(with_top), 2),
        ratio=round(statistics.median(with_top) / statistics.median(without), 3),
        wall_s=round(statistics.median(walls[False]), 1),
        wall_with_top_s=round(statistics.median(walls[True]), 1),
        top_rows=rows,
        top_cpu_s=round(statistics.median(top_cpu), 2),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep every state directory and repository here")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    arguments = parser.parse_args()
    run(lambda: main(arguments), arguments.loop)
