"""What the pipeline of a planned job costs on top of running its agents: no-op tasks, and parallel speed-up.

    python bench/bench_pipeline.py [--tasks 200] [--sleep-tasks 64] [--quick] [--keep DIR] [--profile DIR]

Each measurement starts the real `numerusd` on a fresh state directory and a fresh git repository, with one
scripted agent profile (`numerus-scripted-agent`, the fake `codex exec`) playing every role through `cases`:
the planner answers a plan of independent tasks, each creating its own file `t<n>.txt`; each task's claimer
claims that file; the executor says one message and changes nothing; the reviewer (when review is on) passes.
`parallel` and `review` are set in `numerus.toml`. The wall time is that of `numerusctl run GOAL --wait`, from
its start until it exits with the job completed: plan, claims, GO, worktrees, executors, gate, merges.

Two targets (issue 3), each against a baseline measured in the same run:

- `noop200_ratio`: 200 no-op tasks at `parallel = 8`, review off, take at most 1.3 times the wall time of
  `xargs -0 -P8 -n1` running the same agent program with the executor's command line (`exec --json -C <repo>
  --sandbox workspace-write -- <prompt>`, the prompt the daemon builds) and scenario 200 times. The same job
  with review on is reported beside it (`noop200_pipeline_review_s`).
- `sleep64_speedup`: 64 tasks whose executor sleeps 1 s, review off: `parallel = 1` wall time over
  `parallel = 16` wall time, at least 10.

The xargs baseline runs once before and once after the review-off pipeline run and their mean is used, so a
change of load on the machine weighs on both sides. `--quick` runs 40 no-op and 16 sleeping tasks (the figures
keep their names).

Besides the targets, each run reports what it cost: the agent processes the job started (`agent_runs`), the
CPU seconds of the daemon itself, of its reaped children (agents, git, setsid) and of its nats-server, and the
CPU of one agent run under xargs. From these: `noop_cpu_ratio`, all the CPU the review-off job cost over that
of the xargs baseline (on a machine whose cores the agents keep busy, the floor of the wall-time ratio, and a
figure the machine's other load does not move), the daemon's CPU per task, and that of its other children
(git, setsid) per task once the agents' share (`agent_runs` times the xargs figure) is taken off. And where the
wall time went, read from the job's event timestamps: seconds from submission to the plan, the last GO, the
first executor and the last merge (`*_phase_s`), and the median time between the events that bound each step
of a task (`*_ms_p50`).

A job that fails (see `--serialize-worktrees`) is run again, up to `--tries` times; the failures are
reported (`<run>_failed_runs`, `<run>_failure`), and a run none of whose tries completed counts as infinitely
slow. `--keep DIR` keeps every state directory, repository and the job's `events.jsonl` there; `--profile DIR`
records the daemon of each pipeline run with py-spy into `DIR/<run>.txt`: collapsed stacks of the thread holding
the GIL (its CPU, not its waiting), one `frame;frame;... count` line each, for `flamegraph.pl` or a grep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BIN, git_repo, report, scripted_state, start_numerusd, stop_numerusd

from numerusd import prompts
from numerusd.agents.scripted import scripted_agent_launcher
from numerusd.protocol.claims import ClaimedPath

GOAL = "Create one file per task"
#: Every agent run of a job, by the event that records it: plan calls, claim calls, executor runs, reviews.
AGENT_EVENTS = ("PlanRequested", "ClaimProposed", "ClaimRejected", "TaskStarted", "ReviewCompleted")


def scenario(tasks: int, executor_steps: list[dict]) -> dict:
    """One scenario for every role: a plan of `tasks` independent tasks, each claiming and creating its own file."""
    plan = {
        "summary": f"{tasks} independent tasks",
        "tasks": [
            {
                "id": f"t{n}",
                "title": f"File {n}",
                "instructions": f"Create t{n}.txt.",
                "intents": [{"path": f"t{n}.txt", "mode": "create"}],
            }
            for n in range(1, tasks + 1)
        ],
    }
    claim = {"paths": [{"path": "{task}.txt", "kind": "file", "mode": "create"}], "commands": []}
    return {
        "description": "bench_pipeline: independent no-op tasks",
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim}]},
            {"match": {"role": "executor"}, "steps": executor_steps},
            {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": []}}]},
        ],
    }


NOOP = [{"say": "Nothing to change."}]
SLEEP = [{"sleep": 1}, {"say": "Slept."}]


@dataclass
class Outcome:
    """One pipeline run: its wall time, the job's events, and the CPU seconds the daemon's side spent."""

    wall_s: float
    events: list[dict]
    #: The daemon's own threads, its reaped children (agents, git, setsid), its live ones (nats-server).
    daemon_cpu_s: float
    children_cpu_s: float
    nats_cpu_s: float


class JobFailed(Exception):
    """The job did not complete; the message is numerusctl's last line (the job's failure)."""


def pipeline(
    where: Path,
    *,
    tasks: int,
    parallel: int,
    review: bool,
    steps: list[dict],
    profile: Path | None,
    path_env: str | None,
    claims: str = "agent",
) -> Outcome:
    """Start numerusd on a fresh state directory, time `numerusctl run --wait` of one job, stop the daemon."""
    repo = git_repo(where / "repo")
    # max_agents: room for every agent the job may run at once (executors and as many claims ahead), so the
    # daemon-wide limit (bench_queue.py measures it) does not enter these figures.
    settings = f"parallel = {parallel}\nmax_agents = {2 * parallel}\nreview = {str(review).lower()}\n"
    settings += f'claims = "{claims}"'
    state = scripted_state(where, scenario(tasks, steps), settings)
    daemon = start_numerusd(state, env={"PATH": path_env} if path_env else None)
    spy: subprocess.Popen[bytes] | None = None
    try:
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--pid", str(daemon.pid), "--rate", "200", "--gil",
                 "--format", "raw", "-o", str(profile / f"{where.name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)  # py-spy attaches
        ctl = [str(BIN / "numerusctl"), "--state-dir", str(state)]
        started = time.perf_counter()
        done = subprocess.run(
            [*ctl, "run", GOAL, "--repo", str(repo), "--agent", "bench", "--wait"],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(f"{where.name}: the job did not complete (exit {done.returncode}):", file=sys.stderr)
            print(done.stdout[-1500:], done.stderr[-1500:], _tail(state / "numerusd.stderr"), file=sys.stderr)
            last = (done.stdout.strip().splitlines() or [done.stderr.strip()])[-1]
            raise JobFailed(last)
        job = done.stdout.splitlines()[0].strip()
        lines = subprocess.run(
            [*ctl, "--json", "events", job], capture_output=True, text=True, timeout=300, check=True
        ).stdout.splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        (where / "events.jsonl").write_text("\n".join(lines) + "\n")  # kept with --keep, for a closer look
        own, reaped = cpu_seconds(daemon.pid)
        nats = sum(cpu_seconds(child)[0] for child in children(daemon.pid, "nats-server"))
    finally:
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its stacks and exits
            spy.wait(60)
        stop_numerusd(daemon)
    return Outcome(wall, events, own, reaped, nats)


def xargs(where: Path, *, runs: int, parallel: int, steps: list[dict]) -> tuple[float, float]:
    """`xargs -P` running the executor's command line `runs` times, as the daemon builds it: wall and CPU seconds."""
    repo = git_repo(where / "repo")
    scenario_file = where / "scenario.json"
    scenario_file.write_text(json.dumps(scenario(runs, steps)))
    job = "01BENCHXARGS0000000000000"
    prompt_list = [
        prompts.executor(
            job, f"t{n}", f"File {n}", f"Create t{n}.txt.", 1, (ClaimedPath(f"t{n}.txt", "file", "create"),)
        )
        for n in range(1, runs + 1)
    ]
    (where / "prompts").write_bytes(b"".join(p.encode() + b"\0" for p in prompt_list))
    agent = [*scripted_agent_launcher(), "exec", "--json", "-C", str(repo), "--sandbox", "workspace-write", "--"]
    env = {**os.environ, "NUMERUS_SCENARIO": str(scenario_file)}
    with open(where / "prompts", "rb") as stdin:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(
            ["xargs", "-0", f"-P{parallel}", "-n1", *agent], stdin=stdin, stdout=subprocess.DEVNULL, env=env, check=True
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a live process itself, and of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in range(11, 15))  # fields 14-17 of proc(5)
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + stime) / tick, (cutime + cstime) / tick


def children(pid: int, command: str) -> list[int]:
    """The live children of a process running `command` (the daemon's git and agents come and go meanwhile)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread, or a child, that ended meanwhile
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == command:
                    found.append(int(child))
    return found


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


# --- where the time went, from the events' timestamps --------------------------------------------------------


def _when(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def agent_runs(events: list[dict]) -> int:
    """How many agent processes the job started (plan, claim, executor and review calls)."""
    counts = Counter(event["type"] for event in events)
    return sum(counts[name] for name in AGENT_EVENTS)


def phases(events: list[dict]) -> dict[str, float]:
    """Seconds from the job's submission to its plan, to the last claim answered, to the last merge and the end."""
    start = _when(events[0])
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    for event in events:
        first.setdefault(event["type"], _when(event))
        last[event["type"]] = _when(event)
    out = {
        "plan_phase_s": first.get("PlanValidated", start) - start,
        "last_claim_phase_s": last.get("ClaimGranted", start) - start,
        "first_task_started_s": first.get("TaskStarted", start) - start,
        "last_merge_phase_s": last.get("TaskMerged", start) - start,
        "events": len(events),
    }
    return {key: round(value, 3) for key, value in out.items()}


def per_task(events: list[dict]) -> dict[str, float]:
    """Median seconds of each step of a task, between the events that bound it."""
    by_task: dict[str, dict[str, float]] = {}
    for event in events:
        if event["task"] is not None:
            by_task.setdefault(event["task"], {}).setdefault(event["type"], _when(event))
    steps = {
        "claim_to_granted": ("ClaimProposed", "ClaimGranted"),
        "granted_to_worktree": ("ClaimGranted", "WorktreeCreated"),
        "worktree_to_started": ("WorktreeCreated", "TaskStarted"),
        "started_to_exited": ("TaskStarted", "TaskExited"),
        "exited_to_committed": ("TaskExited", "TaskWorkCommitted"),
        "committed_to_merge_started": ("TaskWorkCommitted", "MergeStarted"),
        "merge_started_to_merged": ("MergeStarted", "TaskMerged"),
    }
    out = {}
    for name, (a, b) in steps.items():
        spans = [t[b] - t[a] for t in by_task.values() if a in t and b in t]
        if spans:
            out[f"{name}_ms_p50"] = round(statistics.median(spans) * 1000, 1)
    return out


def serialized_git(bin_dir: Path) -> str:
    """A PATH whose `git` takes one lock around every `git worktree` command (`--serialize-worktrees`).

    Concurrent `git worktree add` / `list` / `remove` in one repository race: one reads another's half-written
    `.git/worktrees/<name>/commondir` and dies (`fatal: failed to read …/commondir: Success`). This shim shows
    what the pipeline costs once numerusd serializes them itself; it is not how numerusd runs by default.
    """
    real = shutil.which("git")
    assert real is not None, "git is not on PATH"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "git"
    shim.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" worktree "*) exec flock {bin_dir / "worktree.lock"} {real} "$@" ;; esac\n'
        f'exec {real} "$@"\n'
    )
    shim.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"


class Runner:
    """Runs pipeline measurements, each tried up to `tries` times; counts and keeps the failures."""

    def __init__(self, root: Path, tries: int, profile: Path | None, path_env: str | None) -> None:
        self.root, self.tries, self.profile, self.path_env = root, tries, profile, path_env
        self.failures: dict[str, list[str]] = {}

    def __call__(self, name: str, **options: object) -> Outcome | None:
        """The first run of `name` whose job completed, or None when none of `tries` did."""
        for attempt in range(1, self.tries + 1):
            try:
                return pipeline(
                    self.root / f"{name}-{attempt}", profile=self.profile, path_env=self.path_env, **options
                )  # type: ignore[arg-type]
            except JobFailed as e:
                self.failures.setdefault(name, []).append(str(e))
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="no-op tasks")
    parser.add_argument("--sleep-tasks", type=int, default=64, help="tasks whose executor sleeps 1 s")
    parser.add_argument("--quick", action="store_true", help="40 no-op and 16 sleeping tasks")
    parser.add_argument("--tries", type=int, default=3, help="runs of a measurement whose job fails, at most")
    parser.add_argument("--serialize-worktrees", action="store_true", help="a git shim serializing `git worktree`")
    parser.add_argument("--keep", type=Path, help="keep the state directories and repositories here")
    parser.add_argument("--profile", type=Path, help="record each daemon with py-spy into this directory")
    parser.add_argument("--only", choices=["noop", "sleep"], help="run one target's measurements only")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.sleep_tasks = 40, 16
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="numerus-bench-pipeline-", dir=args.keep)
    figures: dict[str, float | int | str] = {"tasks": args.tasks, "sleep_tasks": args.sleep_tasks}
    if args.serialize_worktrees:
        figures["git"] = "worktree commands serialized by a shim"
    try:
        root = Path(tmp)
        path_env = serialized_git(root / "bin") if args.serialize_worktrees else None
        measure = Runner(root, args.tries, args.profile, path_env)
        if args.only in (None, "noop"):
            n = args.tasks
            # The baseline runs before and after the pipeline, so a change of load on the machine hits both.
            first_s, xargs_cpu_s = xargs(root / "xargs-1", runs=n, parallel=8, steps=NOOP)
            plain = measure("noop", tasks=n, parallel=8, review=False, steps=NOOP)
            second_s, _ = xargs(root / "xargs-2", runs=n, parallel=8, steps=NOOP)
            reviewed = measure("noop-review", tasks=n, parallel=8, review=True, steps=NOOP)
            # Claims taken from the plan's intents (`claims = "plan"`): one agent run per task, as xargs has.
            from_plan = measure("noop-plan-claims", tasks=n, parallel=8, review=False, steps=NOOP, claims="plan")
            xargs_s = (first_s + second_s) / 2
            figures["noop200_xargs_s"] = round(xargs_s, 2)
            figures["noop200_xargs_runs_s"] = f"{first_s:.2f} / {second_s:.2f}"
            figures["xargs_cpu_ms_per_run"] = round(xargs_cpu_s / n * 1000, 1)
            figures["noop200_pipeline_s"] = _wall(plain)
            figures["noop200_pipeline_review_s"] = _wall(reviewed)
            figures["noop200_ratio"] = round(_wall(plain) / xargs_s, 2)
            figures["noop200_plan_claims_s"] = _wall(from_plan)
            figures["noop200_plan_claims_ratio"] = round(_wall(from_plan) / xargs_s, 2)
            if plain is not None:
                figures["agent_runs"] = agent_runs(plain.events)
                figures["noop_daemon_cpu_s"] = round(plain.daemon_cpu_s, 2)
                figures["noop_children_cpu_s"] = round(plain.children_cpu_s, 2)
                figures["noop_nats_cpu_s"] = round(plain.nats_cpu_s, 2)
                spent = plain.daemon_cpu_s + plain.children_cpu_s + plain.nats_cpu_s
                # On a machine whose cores the agents keep busy, wall time follows CPU time: this ratio is the
                # floor of the wall-time ratio there, and it does not move with the machine's other load.
                figures["noop_cpu_ratio"] = round(spent / xargs_cpu_s, 2)
                figures["noop_daemon_cpu_ms_per_task"] = round(plain.daemon_cpu_s / n * 1000, 1)
                agents_s = agent_runs(plain.events) * xargs_cpu_s / n
                figures["noop_other_children_cpu_ms_per_task"] = round((plain.children_cpu_s - agents_s) / n * 1000, 1)
                figures.update({f"noop_{k}": v for k, v in phases(plain.events).items()})
                figures.update({f"noop_{k}": v for k, v in per_task(plain.events).items()})
            if reviewed is not None:
                figures["agent_runs_review"] = agent_runs(reviewed.events)
        if args.only in (None, "sleep"):
            n = args.sleep_tasks
            p1 = measure("sleep-p1", tasks=n, parallel=1, review=False, steps=SLEEP)
            p16 = measure("sleep-p16", tasks=n, parallel=16, review=False, steps=SLEEP)
            figures["sleep64_p1_s"] = _wall(p1)
            figures["sleep64_p16_s"] = _wall(p16)
            figures["sleep64_speedup"] = round(_wall(p1) / _wall(p16), 2) if p1 is not None else 0.0
            # The same with claims from the plan's intents: one agent run per task instead of two.
            p1_plan = measure("sleep-p1-plan-claims", tasks=n, parallel=1, review=False, steps=SLEEP, claims="plan")
            p16_plan = measure("sleep-p16-plan-claims", tasks=n, parallel=16, review=False, steps=SLEEP, claims="plan")
            figures["sleep64_plan_claims_p1_s"] = _wall(p1_plan)
            figures["sleep64_plan_claims_p16_s"] = _wall(p16_plan)
            figures["sleep64_plan_claims_speedup"] = (
                round(_wall(p1_plan) / _wall(p16_plan), 2) if p1_plan is not None else 0.0
            )
            if p16 is not None:
                figures.update({f"sleep_p16_{k}": v for k, v in phases(p16.events).items()})
                figures["sleep_p16_cpu_s"] = round(p16.daemon_cpu_s + p16.children_cpu_s + p16.nats_cpu_s, 2)
        for name, reasons in measure.failures.items():
            figures[f"{name}_failed_runs"] = len(reasons)
            figures[f"{name}_failure"] = reasons[0][:300]
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    report("pipeline", **figures)


def _wall(outcome: Outcome | None) -> float:
    """The run's wall time; infinite when its job never completed, so that its target is missed, not hidden."""
    return round(outcome.wall_s, 2) if outcome is not None else math.inf


if __name__ == "__main__":
    main()
