"""Whether the control plane stays responsive under load: `status` while 20 clients submit jobs and 20 jobs run.

    python bench/bench_control.py [--clients 20] [--rounds 3] [--task-s 4] [--mode plan|no-plan|both]

Each round starts the real `numerusd` on a fresh state directory (`max_agents` above the clients, so every job
runs at once) with one scripted agent profile whose executor talks, writes its file and sleeps `--task-s` seconds
in all. A prober, a process of its own, asks `status` (the job list) and then `status JOB` (the newest listed) in a
loop, through numerusctl's own connection module (`numerusctl.connection.connect` / `request` / `decode_reply`,
what `numerusctl status` runs), each request timed. Then `--clients` connections, each a client with its own
repository, send their `run` at the same moment, as `numerusctl run` does (a planned job of one task, claims from
the plan, no review; or `--no-plan`), and the round waits until every job has ended.

Reported per mode, over all rounds:

- `busy_p50_ms`, `busy_p99_ms`, `busy_max_ms`: the prober's request latencies from the first submission to the
  last job's end (the job list and `status JOB` alike);
- `idle_p50_ms`, `idle_p99_ms`: the same prober on the same daemon once every job has ended and it is idle (a
  book of as many jobs): the in-run baseline; `p99_ratio` = busy p99 / idle p99;
- `submit_all_s`: median over rounds of the time from the submissions' start until the last was accepted (its
  reply received); `submit_max_s`: the slowest round's.

Target (issue 16): `busy_p99_ms` at most 50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats
from _common import BIN, git_repo, percentile, report, scripted_state, start_numerusd, stop_numerusd
from bench_pipeline import scenario

from numerusctl.connection import connect, decode_reply, read_connection_file, request
from numerusd.embedded_nats import daemon_login
from numerusd.protocol.commands import JOB_DONE, GetStatus, RunJob, StatusReply

#: Seconds the idle baseline is measured for, once every job has ended.
IDLE_S = 4.0
#: The subject of the baseline responder.
ECHO = "bench.echo"
#: Pause of the prober between two requests: a client asking about ten times a second per round trip.
PROBE_PAUSE_S = 0.01


def executor_steps(task_s: float) -> list[dict]:
    """An agent that works `task_s` seconds: says something, writes its file, sleeps, reports tokens."""
    return [
        {"say": "Looking at {task}."},
        {"sleep": task_s / 2},
        {"write": "{task}.txt", "content": "done\n"},
        {"say": "Wrote {task}.txt."},
        {"sleep": task_s / 2},
        {"usage": {"input_tokens": 1000, "cached_input_tokens": 0, "output_tokens": 50}},
    ]


# --- the prober (a process of its own) -------------------------------------------------------------------------


async def echo(state: Path) -> None:
    """The baseline: a trivial responder on the daemon's server, a process of its own, until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    user, password = daemon_login(state / "nats")  # the bench subject is in no client role's allow list
    nc = await nats.connect(read_connection_file(state / "connection.json").url, user=user, password=password)

    async def respond(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"{}")

    await nc.subscribe(ECHO, cb=respond)
    await nc.flush()
    (state / "echo.ready").write_text("")
    await stop.wait()
    await nc.close()


async def probe(state: Path, out: Path) -> None:
    """Ask `status`, `status JOB` and the echo in a loop until SIGTERM; write `[wall time, kind, ms]` rows to
    `out`."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nc = await connect(read_connection_file(state / "connection.json"), 5)
    user, password = daemon_login(state / "nats")
    baseline = await nats.connect(nc.connected_url.geturl(), user=user, password=password)
    rows: list[tuple[float, str, float]] = []
    (out.with_suffix(".ready")).write_text("")
    while not stop.is_set():
        started = time.perf_counter()
        await baseline.request(ECHO, b"{}", timeout=10)
        rows.append((time.time(), "echo", (time.perf_counter() - started) * 1000))
        started = time.perf_counter()
        listed: StatusReply = decode_reply("status", await request(nc, "status", GetStatus(), 10))
        rows.append((time.time(), "list", (time.perf_counter() - started) * 1000))
        if listed.jobs:
            started = time.perf_counter()
            decode_reply("status", await request(nc, "status", GetStatus(job=listed.jobs[0].id), 10))
            rows.append((time.time(), "job", (time.perf_counter() - started) * 1000))
        await asyncio.sleep(PROBE_PAUSE_S)
    await nc.close()
    await baseline.close()
    out.write_text(json.dumps(rows))


# --- one round ---------------------------------------------------------------------------------------------------


async def submit_all(state: Path, repos: list[Path], plan: bool) -> tuple[float, float, list[str]]:
    """Connect one client per repository, then send every `run` at once; (start, end of the last reply, job ids)."""
    target = read_connection_file(state / "connection.json")
    clients = [await connect(target, 5) for _ in repos]

    async def submit(nc, repo: Path) -> str:
        job = RunJob(goal=f"work in {repo.name}", repo=str(repo), agent="bench", plan=plan)
        return decode_reply("run", await request(nc, "run", job, 120)).job

    try:
        started = time.time()
        ids = await asyncio.gather(*(submit(nc, repo) for nc, repo in zip(clients, repos, strict=True)))
        return started, time.time(), list(ids)
    finally:
        for nc in clients:
            await nc.close()


def submit_processes(state: Path, repos: list[Path], plan: bool) -> tuple[float, float, list[str]]:
    """One `numerusctl run` process per repository, all started at once; (start, end of the last, job ids)."""
    started = time.time()
    runs = [
        subprocess.Popen(
            [str(BIN / "numerusctl"), "--state-dir", str(state), "--timeout", "120", "run", f"work in {repo.name}",
             "--repo", str(repo), "--agent", "bench", *(() if plan else ("--no-plan",))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for repo in repos
    ]  # fmt: skip
    ids = [run.communicate()[0].strip() for run in runs]
    if any(run.returncode for run in runs):
        raise SystemExit(f"a numerusctl run failed: {[run.returncode for run in runs]}")
    return started, time.time(), ids


async def wait_ended(state: Path, ids: list[str], timeout: float) -> float:
    """Poll (slowly: the prober is the one measuring) until every job has ended; the wall time then."""
    nc = await connect(read_connection_file(state / "connection.json"), 5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            listed: StatusReply = decode_reply("status", await request(nc, "status", GetStatus(), 30))
            status = {job.id: job.status for job in listed.jobs}
            if all(status.get(job) in JOB_DONE for job in ids):
                failed = [job for job in ids if status[job] != "completed"]
                if failed:
                    raise SystemExit(f"{len(failed)} jobs did not complete, e.g. {failed[0]}: see {state}")
                return time.time()
            if time.monotonic() > deadline:
                raise SystemExit(f"the jobs did not end within {timeout:g} s: {status}")
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


def one_round(where: Path, clients: int, task_s: float, plan: bool, processes: bool) -> dict:
    repos = [git_repo(where / f"repo{n}") for n in range(clients)]
    settings = f'max_agents = {clients * 2}\nreview = false\nclaims = "plan"'
    steps = executor_steps(task_s)
    # A planned job's executor plays its case; a --no-plan job's prompt has no role line and plays the `steps`.
    state = scripted_state(where, {**scenario(1, steps), "steps": steps}, settings)
    daemon = start_numerusd(state)
    out = where / "probe.json"
    echoer = subprocess.Popen([sys.executable, __file__, "--echo", str(state)])
    while not (state / "echo.ready").exists():
        if echoer.poll() is not None:
            raise SystemExit(f"the echo responder exited with {echoer.returncode}")
        time.sleep(0.02)
    prober = subprocess.Popen([sys.executable, __file__, "--probe", str(state), "--out", str(out)])
    try:
        while not out.with_suffix(".ready").exists():
            if prober.poll() is not None:
                raise SystemExit(f"the prober exited with {prober.returncode}")
            time.sleep(0.02)
        time.sleep(0.5)  # a few requests before the load
        if processes:
            started, accepted, ids = submit_processes(state, repos, plan)
        else:
            started, accepted, ids = asyncio.run(submit_all(state, repos, plan))
        ended = asyncio.run(wait_ended(state, ids, 300))
        time.sleep(1.0)  # the views and the last pipelines settle
        idle_from = time.time()
        time.sleep(IDLE_S)
        prober.send_signal(signal.SIGTERM)
        if prober.wait(30) != 0:
            raise SystemExit(f"the prober exited with {prober.returncode}")
    finally:
        for helper in (prober, echoer):
            if helper.poll() is None:
                helper.terminate()
                helper.wait()
        stop_numerusd(daemon)
    rows = json.loads(out.read_text())
    return {
        "busy": [ms for when, kind, ms in rows if started <= when <= ended and kind != "echo"],
        "idle": [ms for when, kind, ms in rows if when >= idle_from and kind != "echo"],
        "echo_busy": [ms for when, kind, ms in rows if started <= when <= ended and kind == "echo"],
        "echo_idle": [ms for when, kind, ms in rows if when >= idle_from and kind == "echo"],
        "submit_s": accepted - started,
        "jobs_s": ended - started,
    }


def measure(clients: int, rounds: int, task_s: float, plan: bool, processes: bool, keep: Path | None) -> dict:
    busy: list[float] = []
    idle: list[float] = []
    echo_busy: list[float] = []
    submits: list[float] = []
    jobs: list[float] = []
    for n in range(rounds):
        with tempfile.TemporaryDirectory(prefix="numerus-bench-control-") as tmp:
            where = keep / f"{'plan' if plan else 'noplan'}{n}" if keep else Path(tmp)
            got = one_round(where, clients, task_s, plan, processes)
        print(
            f"round {n + 1} ({'plan' if plan else 'no-plan'}): submit {got['submit_s']:.2f} s, jobs {got['jobs_s']:.1f}"
            f" s, busy p99 {percentile(got['busy'], 99):.1f} ms max {max(got['busy']):.1f} ms"
            f" ({len(got['busy'])} requests), idle p99 {percentile(got['idle'], 99):.1f} ms; echo busy p99"
            f" {percentile(got['echo_busy'], 99):.1f} ms idle p99 {percentile(got['echo_idle'], 99):.1f} ms",
            file=sys.stderr,
        )
        busy += got["busy"]
        idle += got["idle"]
        echo_busy += got["echo_busy"]
        submits.append(got["submit_s"])
        jobs.append(got["jobs_s"])
    return {
        "busy_requests": len(busy),
        "busy_p50_ms": round(statistics.median(busy), 2),
        "busy_p99_ms": round(percentile(busy, 99), 2),
        "busy_max_ms": round(max(busy), 1),
        "idle_p50_ms": round(statistics.median(idle), 2),
        "idle_p99_ms": round(percentile(idle, 99), 2),
        "p99_ratio": round(percentile(busy, 99) / percentile(idle, 99), 2),
        "echo_busy_p50_ms": round(statistics.median(echo_busy), 2),
        "echo_busy_p99_ms": round(percentile(echo_busy, 99), 2),
        "busy_vs_echo_p99": round(percentile(busy, 99) / percentile(echo_busy, 99), 2),
        "submit_all_s": round(statistics.median(submits), 2),
        "submit_max_s": round(max(submits), 2),
        "jobs_s": round(statistics.median(jobs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task-s", type=float, default=4.0, help="seconds each executor works")
    parser.add_argument("--mode", choices=["plan", "no-plan", "both"], default="both")
    parser.add_argument(
        "--processes", action="store_true", help="each client a `numerusctl run` process (else a connection each)"
    )
    parser.add_argument("--keep", type=Path, help="keep each round's state directory and repositories here")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the prober process: a state directory
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--echo", type=Path, help=argparse.SUPPRESS)  # the baseline responder: a state directory
    args = parser.parse_args()
    if args.echo:
        asyncio.run(echo(args.echo))
        return
    if args.probe:
        asyncio.run(probe(args.probe, args.out))
        return
    figures: dict[str, float | int | str] = {"clients": args.clients, "task_s": args.task_s}
    load = os.getloadavg()[0]
    for plan in {"plan": [True], "no-plan": [False], "both": [True, False]}[args.mode]:
        prefix = "" if plan else "noplan_"
        got = measure(args.clients, args.rounds, args.task_s, plan, args.processes, args.keep)
        figures.update({f"{prefix}{key}": value for key, value in got.items()})
    figures["load_before"] = round(load, 2)
    report("control", **figures)


if __name__ == "__main__":
    main()
