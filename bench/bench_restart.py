"""How soon a planned job goes on after its daemon is killed: a restart with a 20-task job in flight.

    python bench/bench_restart.py [--tasks 20] [--rounds 3]

Each round starts the real `numerusd` on a fresh state directory and repository, submits a planned job of
`--tasks` independent tasks (claims from the plan, no review, as many at once as there are tasks) whose scripted
executors sleep for ten minutes, waits until every one of them runs, kills the daemon with SIGKILL (its agents die
with it), starts a new one and waits until every task's agent runs again. Reported, per round and as medians:

- `ready_s`: from starting the new daemon to its connection file (it answers commands);
- `all_running_s`: from starting the new daemon to every task's agent running again (after `JobResumed`);
- `agents_start_s`: the agents' own start, measured in the first daemon: from the first executor's `TaskStarted`
  to the last `AgentSpawned` (every sandbox and scripted agent of the job spawned);
- `goes_on_s = all_running_s - agents_start_s`: what the restart adds to the agents' own start.

Target (issue 15): `goes_on_s` at most 2 s.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BIN, base_parser, git_repo, report, scripted_state, start_numerusd, stop_numerusd
from bench_pipeline import scenario

SLEEP = [{"say": "working"}, {"sleep": 600}]


def ctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "numerusctl"), "--state-dir", str(state), *args], capture_output=True, text=True, check=False
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def all_running(state: Path, job: str, tasks: int, after: int = 0) -> bool:
    """Every task's agent spawned (after event number `after`): read from the job's events."""
    result = ctl(state, "--json", "events", job)
    if result.returncode != 0:
        return False
    events = [json.loads(line) for line in result.stdout.splitlines()[after:] if line.strip()]
    return len({event["task"] for event in events if event["type"] == "AgentSpawned"}) == tasks


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


def one_round(where: Path, tasks: int) -> dict[str, float]:
    repo = git_repo(where / "repo")
    settings = f'parallel = {tasks}\nmax_agents = {tasks}\nreview = false\nclaims = "plan"'
    state = scripted_state(where, scenario(tasks, SLEEP), settings)
    daemon = start_numerusd(state)
    try:
        job = ctl(state, "run", "sleep in every task", "--repo", str(repo), "--agent", "bench").stdout.strip()
        wait_for(lambda: all_running(state, job, tasks), 120, "every agent of the first daemon")
        events = [json.loads(line) for line in ctl(state, "--json", "events", job).stdout.splitlines()]
        first = min(event_time(e) for e in events if e["type"] == "TaskStarted")
        last = max(event_time(e) for e in events if e["type"] == "AgentSpawned")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()

        started = time.perf_counter()
        daemon = start_numerusd(state)
        ready = time.perf_counter() - started
        wait_for(lambda: all_running(state, job, tasks, after=len(events)), 120, "every agent again")
        running = time.perf_counter() - started
        ctl(state, "kill", job)
    finally:
        stop_numerusd(daemon)
    return {"ready_s": ready, "all_running_s": running, "agents_start_s": last - first}


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="numerus-bench-restart-") as tmp:
        for number in range(args.rounds):
            figures = one_round(Path(tmp) / f"round-{number}", args.tasks)
            figures["goes_on_s"] = figures["all_running_s"] - figures["agents_start_s"]
            rounds.append(figures)
            print(json.dumps({"round": number, **{k: round(v, 3) for k, v in figures.items()}}), file=sys.stderr)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    spread = {f"goes_on_s_{kind}": f(r["goes_on_s"] for r in rounds) for kind, f in (("min", min), ("max", max))}
    report("restart", tasks=args.tasks, rounds=args.rounds, cores=os.cpu_count(), **medians, **spread)


if __name__ == "__main__":
    main()
