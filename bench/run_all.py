"""Runs every benchmark, checks each against its target, and writes docs/benchmarks.md.

    python bench/run_all.py [--write docs/benchmarks.md] [--quick]

Each benchmark measures its own baseline in the same run (raw nats-py publishing, a raw read-and-verify loop,
a raw request-reply), so the ratios hold whatever the machine's load; absolute figures are recorded beside them.
Exit status 1 when a target is missed. Timings are never asserted in the test suite: this is where they live.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Target:
    """One promise: `figure` of benchmark `bench` compared with `limit`."""

    bench: str
    figure: str
    op: str  # ">=" or "<="
    limit: float
    what: str

    def holds(self, value: float) -> bool:
        return value >= self.limit if self.op == ">=" else value <= self.limit


TARGETS = [
    Target("append", "ratio", ">=", 0.8, "durable append (WAL'd, signed, chained, acked) vs raw publish_async"),
    Target("rebuild", "ratio", ">=", 0.6, "rebuild of 100k events (read, verify, project) vs raw read-and-verify"),
    Target("status", "status_p99_ms", "<=", 5.0, "status of one job, p99, 100k events in the stream"),
    Target("status", "idle_rss_mb", "<=", 100.0, "daemon resident memory, idle, after replaying 100k events"),
    Target("plan", "validate_ms_p99", "<=", 100.0, "validation of a 200-task plan (issue 3), p99"),
    Target("locks", "go_us_p99", "<=", 1000.0, "arbitration of a 20-path claim, 1,000 locks held (issue 3), p99"),
    Target("spawn", "growth_ratio", "<=", 1.5, "spawn latency at ~1 GiB resident vs small (issue 3)"),
    Target("spawn", "spawn_big_ms_p99", "<=", 10.0, "spawn of an agent at ~1 GiB resident (issue 3), p99"),
    Target(
        "pipeline",
        "noop200_ratio",
        "<=",
        1.3,
        "200 no-op tasks through the whole pipeline, parallel 8, review off, vs `xargs -P8` of the agent (issue 3)",
    ),
    Target("pipeline", "sleep64_speedup", ">=", 10.0, "64 tasks of 1 s, review off: parallel 16 vs 1 (issue 3)"),
    Target(
        "pipeline",
        "noop200_plan_claims_ratio",
        "<=",
        1.3,
        'the same 200 no-op tasks with claims from the plan (`claims = "plan"`: one agent run per task)',
    ),
    Target(
        "pipeline",
        "sleep64_plan_claims_speedup",
        ">=",
        10.0,
        "the same 64 tasks of 1 s with claims from the plan",
    ),
    Target("sandbox", "overhead_ms_p50", "<=", 10.0, "what the agents' bwrap sandbox adds to a spawn (issue 14), p50"),
    Target(
        "cli", "ratio", "<=", 1.0, "a cold `numerusctl status` process vs a cold bare nats-py request, median of pairs"
    ),
    Target("redaction", "redacted_mb_s", ">=", 50.0, "agent output through redaction and logging (issue 14), MB/s"),
    Target("redaction", "status_p99_ms", "<=", 10.0, "status p99 while an agent prints at full speed (issue 14)"),
    Target("line", "pump_line_s", "<=", 2.0, "64 MB printed without a newline, through the real output path"),
    Target(
        "queue",
        "utilisation_queued",
        ">=",
        0.9,
        "50 queued jobs of 1 s under max_agents = 8: agent-seconds busy over 8 x the time jobs waited queued "
        "(issue 15)",
    ),
    Target(
        "restart",
        "goes_on_s",
        "<=",
        2.0,
        "a daemon killed with a 20-task job in flight: until every agent runs again, less the agents' own start "
        "(issue 15), median of rounds",
    ),
    Target("top", "ratio", "<=", 1.1, "daemon CPU, a 200-task job with `numerusctl top` following it vs without"),
    Target("snapshot", "status_s", "<=", 2.0, "restart to status answering, 1M events of history (issue 16), median"),
    Target("snapshot", "views_s", "<=", 5.0, "restart to views caught up, 1M events of history (issue 16), median"),
    Target(
        "snapshot",
        "ratio",
        "<=",
        1.5,
        "that restart vs the same daemon with only its 10 live jobs (issue 16), median of pairs",
    ),
    Target("snapshot", "rss_mb", "<=", 150.0, "daemon resident memory then, 1M events of history (issue 16)"),
    Target(
        "control",
        "busy_p99_ms",
        "<=",
        50.0,
        "`status` p99 while 20 clients submit planned jobs and the 20 jobs run (issue 16)",
    ),
    Target(
        "bundle",
        "ratio",
        "<=",
        2.0,
        "a 50 MB repository to a worker and a task's commit back as bundles on the bus vs `git clone --local` plus "
        "`git bundle create` (issue 17), median of pairs",
    ),
]

#: Command line of each benchmark: full size, and a quick size for a smoke run.
BENCHES = {
    "append": (["bench_append.py"], ["bench_append.py", "--n", "5000"]),
    "rebuild": (["bench_rebuild.py", "--n", "100000"], ["bench_rebuild.py", "--n", "10000"]),
    "status": (["bench_status.py", "--events", "100000"], ["bench_status.py", "--events", "10000"]),
    "plan": (["bench_plan.py"], ["bench_plan.py"]),
    "locks": (["bench_locks.py"], ["bench_locks.py"]),
    "spawn": (["bench_spawn.py"], ["bench_spawn.py", "--quick"]),
    "pipeline": (["bench_pipeline.py"], ["bench_pipeline.py", "--quick"]),
    "cli": (["bench_cli.py"], ["bench_cli.py", "--pairs", "6"]),
    "redaction": (["bench_redaction.py"], ["bench_redaction.py", "--mb", "20", "--rounds", "2"]),
    "line": (["bench_line.py"], ["bench_line.py", "--mib", "16", "--rounds", "1"]),
    "sandbox": (["bench_sandbox.py"], ["bench_sandbox.py", "--spawns", "40", "--block", "10"]),
    "queue": (["bench_queue.py"], ["bench_queue.py", "--jobs", "20"]),
    "restart": (["bench_restart.py"], ["bench_restart.py", "--rounds", "1"]),
    "top": (["bench_top.py"], ["bench_top.py", "--tasks", "40", "--pairs", "1"]),
    "snapshot": (["bench_snapshot.py"], ["bench_snapshot.py", "--ended", "50", "--per-job", "200", "--rounds", "1"]),
    "control": (["bench_control.py"], ["bench_control.py", "--rounds", "1"]),
    "bundle": (["bench_bundle.py"], ["bench_bundle.py", "--mb", "10", "--pairs", "2"]),
}


def run(name: str, quick: bool) -> dict:
    argv = BENCHES[name][1 if quick else 0]
    done = subprocess.run(
        [sys.executable, str(HERE / argv[0]), *argv[1:]], capture_output=True, text=True, check=False, timeout=1800
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{name} benchmark printed no result (exit {done.returncode}):\n{done.stderr[-3000:]}")


def markdown(results: dict[str, dict], quick: bool) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python bench/run_all.py --write docs/benchmarks.md`). Every ratio compares",
        "Numerus with a baseline measured in the same run on the same machine, so load affects both alike.",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, Python {platform.python_version()},"
        f" {_cores()} cores{' (quick sizes)' if quick else ''}.",
        "",
        "| target | figure | measured | limit | holds |",
        "|---|---|---|---|---|",
    ]
    for target in TARGETS:
        value = results[target.bench][target.figure]
        mark = "yes" if target.holds(value) else "**no**"
        lines.append(
            f"| {target.what} | `{target.bench}.{target.figure}` | {value} | {target.op} {target.limit} | {mark} |"
        )
    lines += ["", "## Raw figures", ""]
    for name, figures in results.items():
        shown = {k: v for k, v in figures.items() if k not in ("bench", "python", "machine", "platform")}
        lines.append(f"- **{name}**: " + ", ".join(f"{k} = {v}" for k, v in shown.items()))
    lines += [
        "",
        "## What each measures",
        "",
        "- `bench/bench_append.py`: raw `js.publish_async` with `Nats-Msg-Id` of the same bytes, all acks awaited,",
        "  against `EventStore.append` (sealed, chained, written to the WAL with group-committed `fdatasync`,",
        "  published, acknowledged), in alternating rounds, medians compared.",
        "- `bench/bench_rebuild.py`: the lean stream reader plus an HMAC check per event (the cheapest honest",
        "  read-and-verify loop) against a full rebuild: read, verify, decode, fold with `evolve`, project to SQLite;",
        "  nine pairs, one after the other, and the median of their ratios.",
        "- `bench/bench_status.py`: the real `numerusd` after replaying 100k events; `status JOB` requests one at a",
        "  time against a trivial nats-py responder on the same server; then VmRSS once idle.",
        "- `bench/bench_plan.py`: decode, check and hash a 200-task plan with deps and intents, against `json.loads`",
        "  of the same bytes.",
        "- `bench/bench_locks.py`: GO / NO GO for a 20-path claim against 1,000 held locks of 200 tasks, 50 waiting.",
        "- `bench/bench_sandbox.py`: `numerusd.terminal.spawn` of `printf x`, bare and in an executor's bwrap sandbox",
        "  (hidden state directory and repository, worktree and git metadata bound back), in turns; until exit.",
        "- `bench/bench_spawn.py`: `numerusd.terminal.spawn` of `printf x` under uvloop, until its pid is known and",
        "  until its byte is read, at small resident memory and with 1 GiB more mapped and written (512 MiB quick),",
        "  against `ptyprocess.PtyProcess.spawn` and `asyncio.create_subprocess_exec` under asyncio and uvloop, the",
        "  same spawns in turns at both sizes. `growth_ratio` is big p50 / small p50.",
        "- `bench/bench_pipeline.py`: the real `numerusd` and `numerusctl run --wait` of a planned job whose every",
        "  role is the scripted agent: a plan of independent tasks, one claim call and one no-op executor run per",
        "  task (plus a review when on), worktrees, gate and merges; wall time from `run` to its exit. 200 tasks at",
        "  `parallel = 8` against `xargs -0 -P8 -n1` running the executor's exact command line 200 times (mean of a",
        "  run before and one after); `noop200_ratio` is the review-off run, the review-on run is reported beside",
        "  it. 64 tasks of 1 s each at `parallel = 1` and `16`, review off; `sleep64_speedup` is p1 / p16.",
        "- `bench/bench_cli.py`: the real `numerusd`; a fresh `numerusctl status` process against a fresh bare",
        "  nats-py client process (read `connection.json`, connect, request `numerus.cmd.status`, print, close), both",
        "  from bytecode, 20 pairs in alternating order; the median of the pairs' wall-time ratios, their spread, and",
        "  the same for the CPU time each process used (far steadier on a busy machine).",
        "- `bench/bench_redaction.py`: 100 MB of agent output in a PTY's 4 KiB chunks through `AgentProcess.pump`",
        "  (redaction, line buffer, parser, `LogSink` to the run log and `NUMERUS_LOGS`) against the same path",
        "  without redaction, alternating rounds; meanwhile another process asks `status` of a responder on the",
        "  pump's event loop in a loop. Also: the same through a real PTY (`cat`), and dense lookalikes.",
        "- `bench/bench_line.py`: 64 MB of output without a newline, against the same bytes in 100-byte lines:",
        "  through `LineBuffer` and the codex parser alone, and through the real output path (a child in its own",
        "  PTY, `AgentProcess.pump`: run log, `numerus.log` chunks, `LineBuffer`, parser); medians of 3 rounds.",
        "- `bench/bench_queue.py`: the real `numerusd` at `max_agents = 8`, 50 `--no-plan` jobs whose agent sleeps",
        "  1 s, submitted at once; from their events, agent-seconds busy (`TaskStarted` to `TaskExited`) over 8 x the",
        "  wall time from the first start to the last end (`utilisation`, at most `ideal` = 50 / (8 x 7) for jobs of",
        "  equal length) and over the time jobs waited queued (`utilisation_queued`); the most agents at once.",
        "- `bench/bench_top.py`: the daemon's own CPU seconds from submission to end of a planned job of 200 no-op",
        "  tasks (claims from the plan, review off, parallel 8), with a headless `numerusctl top` following it and",
        "  without, alternating pairs, medians compared.",
        "- `bench/bench_snapshot.py`: 1,000 ended jobs of ~1,000 events and 10 under way against the 10 alone; each",
        "  daemon restarted from its snapshots on a nats-server that outlives it (and with its embedded one), timed",
        "  to `status` answered and to the views caught up; VmRSS then.",
        "- `bench/bench_control.py`: the real `numerusd`; a prober process asks `status` (the list, then the newest",
        "  job) through numerusctl's connection module in a loop, beside a trivial nats-py responder in a process of",
        "  its own (the baseline); 20 clients send `run` at once (planned jobs of one task whose executor works 4 s,",
        "  then `--no-plan` jobs); latencies from the first submission to the last job's end, and idle afterwards.",
        "- `bench/bench_bundle.py`: a generated 50 MB repository (random files, loose objects) mirrored as the daemon",
        "  does; `offer_base` of its history, `fetch_base` into an empty cache, a small commit `send_result` and",
        "  `receive_result` through an embedded nats-server, against `git clone --local --bare` plus `git bundle",
        "  create` of it, five alternating pairs, the median of their ratios (`--packed`: the mirror gc'ed first).",
        "",
    ]
    return "\n".join(lines)


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    results = {}
    for name in BENCHES:
        print(f"running {name} ...", flush=True)
        results[name] = run(name, args.quick)
        print(json.dumps(results[name]), flush=True)
    report = markdown(results, args.quick)
    if args.write:
        args.write.write_text(report)
        print(f"wrote {args.write}")
    else:
        print(report)
    missed = [t for t in TARGETS if not t.holds(results[t.bench][t.figure])]
    for target in missed:
        print(f"MISSED: {target.what}: {results[target.bench][target.figure]} (limit {target.op} {target.limit})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
