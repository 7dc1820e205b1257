"""How busy the daemon-wide queue keeps its agent slots: 50 queued jobs under `max_agents = 8`.

    python bench/bench_queue.py [--jobs 50] [--max-agents 8] [--sleep 1.0] [--keep DIR]

The real `numerusd` on a fresh state directory, with `max_agents` set and one scripted agent profile whose
agent sleeps `--sleep` seconds and ends. `--jobs` `--no-plan` jobs are submitted at once over one operator
connection (the same `numerus.cmd.run` request numerusctl sends, so the submissions take no process each and
the queue is full before the first agents end); all but `max_agents` of them wait `queued`. When every job has
completed, their events say when each agent held its slot: from its `TaskStarted` (recorded just before the
spawn) to its `TaskExited` (after its exit), the spawn of the sandbox and the agent program included.

- `utilisation`: agent-seconds busy / (`max_agents` x the wall time from the first start to the last end), the
  issue's figure. Jobs of equal length end in rounds: 50 jobs on 8 slots make 7 rounds, the last one 2/8 full,
  which no scheduler can fill, so it is at most `ideal` = jobs / (max_agents x rounds) = 0.893 here.
- `utilisation_queued`: the same over the window in which jobs waited queued (from the first start to the
  last job's `JobStarted`): what the queue alone decides, handing each freed slot to the next job, target
  >= 0.9.
- `max_running`: the most agents running at once, read from the same intervals (never above `max_agents`);
  `queued_jobs`: the jobs that recorded `JobQueued`; `handoff_ms_p50/p99`: from one agent's exit to the next
  agent's start on a freed slot, while jobs were queued.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BIN, git_repo, percentile, report, scripted_state, start_numerusd, stop_numerusd


async def submit_all(connection: dict, repo: Path, jobs: int) -> list[str]:
    """Submit `jobs` --no-plan jobs at once as the operator; their ids."""
    nc = await nats.connect(
        connection["url"], user=connection["user"], password=connection["password"], inbox_prefix="_INBOX_operator"
    )
    try:

        async def one(number: int) -> str:
            body = {"goal": f"job {number}", "repo": str(repo), "plan": False, "agent": "bench"}
            reply = await nc.request("numerus.cmd.run", json.dumps(body).encode(), timeout=60)
            if reply.headers and "Nats-Service-Error-Code" in reply.headers:
                raise SystemExit(f"run refused: {reply.data.decode()}")
            return json.loads(reply.data)["job"]

        return list(await asyncio.gather(*(one(n) for n in range(jobs))))
    finally:
        await nc.close()


def status(ctl: list[str]) -> dict:
    return json.loads(subprocess.run([*ctl, "--json", "status", "--all"], capture_output=True, text=True).stdout)


def when(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def measure(where: Path, jobs: int, max_agents: int, sleep_s: float) -> dict[str, float | int | str]:
    repo = git_repo(where / "repo")
    sleeping = {"steps": [{"sleep": sleep_s}, {"say": "done"}]}
    state = scripted_state(where, sleeping, f"max_agents = {max_agents}")
    daemon = start_numerusd(state)
    ctl = [str(BIN / "numerusctl"), "--state-dir", str(state)]
    try:
        connection = json.loads((state / "connection.json").read_text())
        ids = asyncio.run(submit_all(connection, repo, jobs))
        deadline = time.monotonic() + 60 + 4 * jobs * sleep_s
        while True:
            listed = status(ctl)["jobs"]
            if all(job["status"] in ("completed", "failed", "killed", "interrupted") for job in listed):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the jobs did not end in time")
            time.sleep(0.5)
        failed = [job["id"] for job in listed if job["status"] != "completed"]
        if failed:
            raise SystemExit(f"{len(failed)} jobs did not complete, e.g. {failed[0]}")
        lines = subprocess.run([*ctl, "--json", "events"], capture_output=True, text=True, check=True).stdout
        events = [json.loads(line) for line in lines.splitlines() if line.strip()]
        (where / "events.jsonl").write_text(lines)
    finally:
        stop_numerusd(daemon)
    started = {e["job"]: when(e) for e in events if e["type"] == "TaskStarted"}
    exited = {e["job"]: when(e) for e in events if e["type"] == "TaskExited"}
    left_queue = [when(e) for e in events if e["type"] == "JobStarted"]
    queued = {e["job"] for e in events if e["type"] == "JobQueued"}
    assert set(started) == set(exited) == set(ids), "every job ran one agent"
    intervals = sorted((started[job], exited[job]) for job in ids)
    first, last = intervals[0][0], max(end for _, end in intervals)
    busy = sum(end - start for start, end in intervals)
    queue_end = max(left_queue) if left_queue else first
    busy_queued = sum(max(0.0, min(end, queue_end) - start) for start, end in intervals if start < queue_end)
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = max_running = 0
    for _, step in points:
        running += step
        max_running = max(max_running, running)
    # Each queued job's start against the latest exit before it: the time a freed slot stayed free.
    ends = sorted(end for _, end in intervals)
    handoffs = []
    for job in queued:
        before = [end for end in ends if end <= started[job]]
        if before:
            handoffs.append((started[job] - before[-1]) * 1000)
    rounds = math.ceil(jobs / max_agents)
    utilisation = busy / (max_agents * (last - first))
    ideal = jobs / (max_agents * rounds)
    return {
        "jobs": jobs,
        "max_agents": max_agents,
        "sleep_s": sleep_s,
        "queued_jobs": len(queued),
        "max_running": max_running,
        "wall_s": round(last - first, 2),
        "agent_s_busy": round(busy, 1),
        "mean_agent_s": round(busy / jobs, 3),
        "utilisation": round(utilisation, 3),
        "ideal": round(ideal, 3),
        "of_ideal": round(utilisation / ideal, 3),
        "utilisation_queued": round(busy_queued / (max_agents * (queue_end - first)), 3) if queue_end > first else 1.0,
        "handoff_ms_p50": round(percentile(handoffs, 50), 1) if handoffs else 0.0,
        "handoff_ms_p99": round(percentile(handoffs, 99), 1) if handoffs else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--max-agents", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each job's agent sleeps")
    parser.add_argument("--keep", type=Path, help="keep the state directory and events.jsonl here")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        where = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="numerus-bench-")))
        where.mkdir(parents=True, exist_ok=True)
        figures = measure(where / "queue", args.jobs, args.max_agents, args.sleep)
    report("queue", **figures)


if __name__ == "__main__":
    main()
