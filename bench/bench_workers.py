"""What running executors on remote workers costs: 64 one-second tasks on two workers against the daemon alone.

    python bench/bench_workers.py [--tasks 64] [--pairs 2] [--keep DIR]

Each measurement starts the real `numerusd` on a fresh state directory and a fresh git repository, with one
scripted agent profile playing every role: the planner answers a plan of `--tasks` independent tasks (claims from
the plan, review off), each executor writes its task's file and sleeps 1 s. The wall time is that of
`numerusctl run GOAL --wait`, from its start until it exits with the job completed.

- `local`: the daemon runs every executor itself, `max_agents = 16`, `parallel = 16`.
- `workers`: the job goes to pool `bench` (`default_pool`), `parallel = 16`, served by two `numerusd worker`
  processes of 8 slots each, in their own directories, sharing nothing with the daemon but the bus (on this
  machine: the figure is what the bus, the bundles and the reports cost, not what more machines bring).

The target (issue 17): `throughput_ratio` = local wall time / workers wall time >= 0.9. The two runs alternate
`--pairs` times (local first, then workers); the ratio of each pair is reported and the median is the figure,
with the spread (lowest and highest pair).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import BIN, git_repo, report, scripted_state, start_numerusd, stop_numerusd


def scenario(tasks: int) -> dict:
    plan = {
        "summary": f"{tasks} sleeping tasks",
        "tasks": [
            {
                "id": f"t{n}",
                "title": f"T{n}",
                "instructions": f"Write t{n}.txt.",
                "intents": [{"path": f"t{n}.txt", "mode": "create"}],
            }
            for n in range(1, tasks + 1)
        ],
    }
    return {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "executor"},
                "steps": [{"write": "{task}.txt", "content": "{task}\n"}, {"sleep": 1.0}, {"say": "done"}],
            },
        ]
    }


@contextlib.contextmanager
def workers(state: Path, where: Path, count: int, slots: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` workers of pool `bench` with `slots` each, in their own directories; stopped (SIGTERM) after."""
    started = []
    try:
        for n in range(1, count + 1):
            home = where / f"worker-{n}"
            home.mkdir(parents=True)
            with open(home.parent / f"worker-{n}.stderr", "ab") as log:
                started.append(
                    subprocess.Popen(
                        [
                            str(BIN / "numerusd"),
                            "--log-level",
                            "warning",
                            "worker",
                            *("--name", f"w{n}", "--pool", "bench", "--slots", str(slots)),
                            *("--dir", str(home), "--connection", str(state / "worker.json")),
                            *("--config", str(state / "numerus.toml")),
                        ],
                        stdout=log,
                        stderr=log,
                    )
                )
        yield started
    finally:
        for worker in started:
            worker.terminate()
        for worker in started:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def one_run(where: Path, tasks: int, remote: bool) -> float:
    """The wall time of `run --wait` of the job, in seconds (inf when it did not complete)."""
    settings = 'claims = "plan"\nreview = false\nparallel = 16\nmax_agents = 16\n'
    if remote:
        settings += 'default_pool = "bench"\n'
    state = scripted_state(where, scenario(tasks), settings)
    repo = git_repo(where / "repo")
    daemon = start_numerusd(state)
    try:
        with workers(state, where, 2, 8) if remote else contextlib.nullcontext():
            ctl = [str(BIN / "numerusctl"), "--state-dir", str(state), "--timeout", "30"]
            if remote:  # both workers heard from before the clock starts, as a running team's are
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    listed = subprocess.run([*ctl, "--json", "workers"], capture_output=True, text=True)
                    if listed.returncode == 0 and len(json.loads(listed.stdout)["workers"]) == 2:
                        break
                    time.sleep(0.1)
            started = time.perf_counter()
            done = subprocess.run([*ctl, "run", "sleeping tasks", "--repo", str(repo), "--wait"], capture_output=True)
            wall = time.perf_counter() - started
            return wall if done.returncode == 0 else float("inf")
    finally:
        stop_numerusd(daemon)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep every state directory here")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="numerus-bench-workers-"))
    local_s, remote_s, ratios = [], [], []
    try:
        for pair in range(args.pairs):
            local = one_run(root / f"local-{pair}", args.tasks, remote=False)
            remote = one_run(root / f"workers-{pair}", args.tasks, remote=True)
            local_s.append(local)
            remote_s.append(remote)
            ratios.append(local / remote)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    report(
        "workers",
        tasks=args.tasks,
        local_s=round(statistics.median(local_s), 2),
        workers_s=round(statistics.median(remote_s), 2),
        throughput_ratio=round(statistics.median(ratios), 3),
        ratio_min=round(min(ratios), 3),
        ratio_max=round(max(ratios), 3),
        pairs=args.pairs,
    )


if __name__ == "__main__":
    main()
