"""A planned job end to end: plan, claims, GO / NO GO, parallel worktrees, quality gate, retries, merge.

The real numerusd and numerusctl, a real nats-server, git and PTYs; every agent is the scripted fake `codex exec`
playing one scenario for all roles, so the daemon runs the same code path as with real Codex.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from numerusd.git import mirror_path
from tests.conftest import eventually
from tests.daemon_harness import Daemon, DaemonClient, claim, git, git_repo

pytestmark = pytest.mark.slow  # every test runs a planned job end to end: a real daemon, several agents, git merges

PLAN = {
    "summary": "Greet, take notes, check them",
    "tasks": [
        {
            "id": "t1",
            "title": "Greeting",
            "instructions": "Create HELLO.md with a greeting.",
            "intents": [{"path": "HELLO.md", "mode": "create"}],
        },
        {
            "id": "t2",
            "title": "Notes",
            "instructions": "Create NOTES.md.",
            "intents": [{"path": "NOTES.md", "mode": "create"}],
        },
        {
            "id": "t3",
            "title": "Sign the greeting",
            "instructions": "Append a signature to HELLO.md.",
            "intents": [{"path": "HELLO.md", "mode": "modify"}],
        },
        {
            "id": "t4",
            "title": "Index the notes",
            "instructions": "Create INDEX.md listing NOTES.md.",
            "deps": ["t2"],
            "intents": [{"path": "INDEX.md", "mode": "create"}],
        },
    ],
}


def task(id: str, *intents: tuple[str, str]) -> dict:
    """A plan's task whose title is its id in capitals and whose instructions are its id."""
    return {"id": id, "title": id.upper(), "instructions": id, "intents": [{"path": p, "mode": m} for p, m in intents]}


SCENARIO = {
    "cases": [
        # The planner's first answer is cut short: the daemon must reject it and ask again with the error.
        {"match": {"role": "planner", "attempt": 1}, "steps": [{"answer": '{"summary": "Greet", "tasks": [{"id"'}]},
        {
            "match": {"role": "planner"},
            "steps": [
                {"answer": PLAN},
                {"usage": {"input_tokens": 900, "cached_input_tokens": 0, "output_tokens": 99}},
            ],
        },
        {"match": {"role": "claimer", "task": "t1"}, "steps": [{"answer": claim(("HELLO.md", "create"))}]},
        {"match": {"role": "claimer", "task": "t2"}, "steps": [{"answer": claim(("NOTES.md", "create"))}]},
        # t3 claims the file t1 creates; it asks a little later, so t1 holds it and t3 gets NO GO.
        {
            "match": {"role": "claimer", "task": "t3"},
            "steps": [{"sleep": 0.8}, {"answer": claim(("HELLO.md", "modify"))}],
        },
        # t4's claimer first answers prose instead of JSON: refused with the reason, and asked again.
        {"match": {"role": "claimer", "task": "t4", "attempt": 1}, "steps": [{"answer": "INDEX.md, I think"}]},
        {"match": {"role": "claimer", "task": "t4"}, "steps": [{"answer": claim(("INDEX.md", "create"))}]},
        {
            "match": {"role": "executor", "task": "t1"},
            "steps": [{"sleep": 1.5}, {"write": "HELLO.md", "content": "# Hello\n"}, {"say": "greeted"}],
        },
        # t2 strays outside its claim on its first attempt (through a shell command), and behaves on its second.
        {
            "match": {"role": "executor", "task": "t2", "attempt": 1},
            "steps": [{"write": "NOTES.md", "content": "notes\n"}, {"run": "echo stray > STRAY.md"}],
        },
        {"match": {"role": "executor", "task": "t2"}, "steps": [{"run": "rm -f STRAY.md"}]},
        {"match": {"role": "executor", "task": "t3"}, "steps": [{"run": "echo '-- signed' >> HELLO.md"}]},
        # t4 leaves a TODO the configured check refuses on its first attempt.
        {
            "match": {"role": "executor", "task": "t4", "attempt": 1},
            "steps": [{"write": "INDEX.md", "content": "- NOTES.md TODO\n"}],
        },
        {"match": {"role": "executor", "task": "t4"}, "steps": [{"write": "INDEX.md", "content": "- NOTES.md\n"}]},
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["does what was asked"]}}]},
    ]
}

CONFIG = """
checks = ["! grep -rq TODO --include=*.md ."]
backoff_s = [0.2, 0.4]
parallel = 4
"""


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", agents={"team": SCENARIO}, config=CONFIG).start()
    yield d
    d.stop()


REVIEW_PASSES = {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": []}}]}


def run_job(daemon: Daemon, repo: Path, goal: str, *flags: str, timeout: float = 90) -> str:
    """`numerusctl run GOAL --repo REPO FLAGS --wait`, which must exit 0; the job's id."""
    result = daemon.ctl("run", goal, "--repo", str(repo), *flags, "--wait", timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()[-3000:]
    return result.stdout.splitlines()[0].strip()


def by_type(events: list[dict], type_name: str, task: str | None = None) -> list[dict]:
    return [e for e in events if e["type"] == type_name and (task is None or e["task"] == task)]


def when(event: dict) -> datetime:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00"))


def git_head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def worktrees(repo: Path) -> str:
    """`git worktree list --porcelain`: every worktree git knows in the repository."""
    return git(repo, "worktree", "list", "--porcelain")


def show(repo: Path, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout


async def test_a_planned_job_runs_in_parallel_waits_for_locks_catches_strays_retries_and_merges(
    daemon: Daemon, tmp_path: Path
):
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "Greet and take notes", "--repo", str(repo), "--agent", "team", "--wait", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()[-3000:]
    job = result.stdout.splitlines()[0].strip()

    view = daemon.status(job)
    assert view["status"] == "completed"
    assert {task["id"]: task["status"] for task in view["tasks"]} == dict.fromkeys(
        ("t1", "t2", "t3", "t4"), "completed"
    )
    events = daemon.events(job)

    # The plan: the first answer was rejected with the reason, the second accepted with a hash.
    (rejected,) = by_type(events, "PlanRejected")
    assert rejected["data"]["errors"]
    (validated,) = by_type(events, "PlanValidated")
    assert validated["data"]["attempt"] == 2 and len(validated["data"]["hash"]) == 64

    # t1 and t2 ran at the same time: their agents' lifetimes overlap.
    (t1_start,) = by_type(events, "TaskStarted", "t1")
    t1_exit = by_type(events, "TaskExited", "t1")[0]
    t2_start = by_type(events, "TaskStarted", "t2")[0]
    assert when(t2_start) < when(t1_exit) and when(t1_start) < when(by_type(events, "TaskExited", "t2")[0])

    # t3 claimed the file t1 held: NO GO naming t1, then GO once t1 merged, and it ran after.
    (denied,) = by_type(events, "ClaimDenied", "t3")
    assert denied["data"]["holders"] == ["t1"]
    t3_granted = by_type(events, "ClaimGranted", "t3")[0]
    t1_merged = by_type(events, "TaskMerged", "t1")[0]
    assert when(t1_merged) <= when(t3_granted) <= when(by_type(events, "TaskStarted", "t3")[0])

    # t2's edit outside its claim was caught and retried; the second attempt passed.
    (violated,) = by_type(events, "ClaimViolated", "t2")
    assert "STRAY.md" in " ".join(violated["data"]["violations"])
    assert [e["data"]["attempt"] for e in by_type(events, "TaskStarted", "t2")] == [1, 2]

    # t4's first claim was not JSON: rejected with the reason, and its second answer was taken.
    (bad_claim,) = by_type(events, "ClaimRejected", "t4")
    assert bad_claim["data"]["errors"][0].startswith("the claim is not valid")
    assert [e["data"]["attempt"] for e in by_type(events, "ClaimProposed", "t4")] == [2]

    # t4's failing check was retried with the output, then passed; it ran after t2, which it depends on.
    checks = by_type(events, "CheckCompleted", "t4")
    assert [c["data"]["exit_code"] for c in checks] == [1, 0]
    (retry,) = by_type(events, "TaskRetryScheduled", "t4")
    assert "failed" in retry["data"]["reasons"][0]
    assert when(by_type(events, "TaskMerged", "t2")[0]) < when(by_type(events, "TaskStarted", "t4")[0])

    # Everything is on the integration branch; the user's branch and working tree are untouched.
    branch = view["integration"]
    assert branch == f"numerus/{job}.integration"
    assert show(repo, branch, "HELLO.md") == "# Hello\n-- signed\n"
    assert show(repo, branch, "NOTES.md") == "notes\n"
    assert show(repo, branch, "INDEX.md") == "- NOTES.md\n"
    assert (
        "STRAY.md"
        not in subprocess.run(
            ["git", "-C", str(repo), "ls-tree", "--name-only", branch], capture_output=True, text=True, check=True
        ).stdout
    )
    assert sorted(p.name for p in repo.iterdir() if p.name != ".git") == ["README.md"]
    # Merged tasks leave no branch behind: each one's work is the second parent of its merge.
    assert git(repo, "branch", "--list", "--format=%(refname:short)", "numerus/*").split() == [branch]

    # plan and audit tell the same story.
    drawn = daemon.ctl("plan", job, "--format", "mermaid", check=True).stdout
    assert "flowchart" in drawn and "t4" in drawn
    assert daemon.ctl("audit", "verify", job).returncode == 0


async def test_a_planner_that_never_answers_a_valid_plan_fails_the_job_with_the_reasons(
    tmp_path: Path,
):
    scenario = {
        "steps": [
            {"answer": {"summary": "x", "tasks": [{"id": "t1", "title": "a", "instructions": "b", "deps": ["t9"]}]}}
        ]
    }
    with Daemon(tmp_path / "state", agents={"bad": scenario}, config="plan_attempts = 2\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "anything", "--repo", str(repo), "--agent", "bad", "--wait", timeout=60)
        assert result.returncode == 1
        job = result.stdout.splitlines()[0].strip()
        view = daemon.status(job)
        assert view["status"] == "failed"
        assert "no valid plan after 2 attempts" in view["reason"] and "t9" in view["reason"]
        assert len(by_type(daemon.events(job), "PlanRejected")) == 2


async def test_an_agent_that_cannot_start_trips_the_circuit_breaker_which_says_why(tmp_path: Path):
    # A program that cannot be found is refused when the job is submitted: this one is there then, and the planner
    # (whose sandbox may write where it lies) removes it before any executor starts.
    program = tmp_path / "state-scenarios" / "vanishing-codex"
    program.parent.mkdir(parents=True)
    one_task = {"summary": "x", "tasks": [{"id": "t1", "title": "a", "instructions": "b", "intents": []}]}
    planner = {"cases": [{"match": {"role": "planner"}, "steps": [{"run": f"rm -f {program}"}, {"answer": one_task}]}]}
    config = "max_attempts = 3\nbackoff_s = [0.1]\nmax_replans = 0\n"
    config += f'[agents.vanishing]\nkind = "codex"\nbinary = "{program}"\n'
    flags = ("--agent", "team", "--role", "executor=vanishing", "--claims", "plan", "--no-review", "--wait")
    with Daemon(tmp_path / "state", agents={"team": planner}, config=config).start() as daemon:
        assert daemon.scenarios_dir == program.parent
        repo = git_repo(tmp_path / "repo")
        for goal in ("anything", "again"):
            program.write_text("#!/bin/sh\nexit 0\n")
            program.chmod(0o755)
            result = daemon.ctl("run", goal, "--repo", str(repo), *flags, timeout=60)
            assert result.returncode == 1, result.stderr
            job = result.stdout.splitlines()[0].strip()
            assert not program.exists()
            errors = [e["data"]["reason"] for e in by_type(daemon.events(job), "AgentSpawnFailed")]
            if goal == "anything":
                assert len(errors) == 3 and all(str(program) in error for error in errors)
        # The breaker is open now: the second job's executor is not even spawned, and the reason says why.
        assert "failed to start 3 times in a row" in errors[0] and "next try in" in errors[0]
        assert daemon.alive


async def has(client: DaemonClient, job: str, type_name: str, count: int = 1) -> bool:
    """Whether the job has recorded `count` events of this type (or more)."""
    return len(by_type(await client.events(job), type_name)) >= count


def tasks_by_id(view: dict) -> dict[str, dict]:
    return {task["id"]: task for task in view["tasks"]}


def replanning_team(queen_steps: list[dict]) -> dict:
    first = {
        "summary": "build then document",
        "tasks": [
            {"id": "t1", "title": "Build", "instructions": "build", "intents": []},
            {"id": "t2", "title": "Document", "instructions": "document", "deps": ["t1"], "intents": []},
        ],
    }
    return {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": first}]},
            {"match": {"role": "queen"}, "steps": queen_steps},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim(("{task}.md", "create"))}]},
            {"match": {"role": "executor", "task": "t1"}, "steps": [{"say": "cannot"}, {"exit": 1}]},
            {"match": {"role": "executor"}, "steps": [{"write": "{task}.md", "content": "{task}\n"}]},
            REVIEW_PASSES,
        ]
    }


REVISED = {
    "summary": "build differently, then document",
    "tasks": [
        {"id": "t1b", "title": "Build another way", "instructions": "build again", "intents": []},
        {"id": "t2", "title": "Document", "instructions": "document", "deps": ["t1b"], "intents": []},
    ],
}

FAST_RETRIES = "max_attempts = 2\nbackoff_s = [0.1]\nmax_replans = 1\n"


async def test_a_task_that_fails_for_good_makes_the_queen_revise_the_plan_and_the_job_completes(tmp_path: Path):
    team = replanning_team([{"answer": REVISED}])
    with Daemon(tmp_path / "state", agents={"team": team}, config=FAST_RETRIES).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = run_job(daemon, repo, "build", "--agent", "team", timeout=90)
        view = daemon.status(job)
        assert view["status"] == "completed" and view["plan_version"] == 2
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"t1": "failed", "t2": "completed", "t1b": "completed"}
        events = daemon.events(job)
        (replan,) = by_type(events, "ReplanRequested")
        assert replan["data"]["task"] == "t1" and "exit code 1" in replan["data"]["reason"]
        assert [e["data"]["role"] for e in by_type(events, "PlanRequested")] == ["planner", "queen"]
        assert [e["data"]["version"] for e in by_type(events, "PlanValidated")] == [1, 2]
        assert show(repo, view["integration"], "t2.md") == "t2\n"


async def test_when_the_queen_gives_no_valid_plan_the_dependents_are_skipped_and_the_job_fails(tmp_path: Path):
    reused = {**REVISED, "tasks": [{**REVISED["tasks"][0], "id": "t1"}, {**REVISED["tasks"][1], "deps": ["t1"]}]}
    team = replanning_team([{"answer": reused}])
    config = FAST_RETRIES + "plan_attempts = 2\n"
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "build", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        assert result.returncode == 1
        job = result.stdout.splitlines()[0].strip()
        view = daemon.status(job)
        assert view["status"] == "failed"
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"t1": "failed", "t2": "skipped"}
        rejected = by_type(daemon.events(job), "PlanRejected")
        assert len(rejected) == 2 and "give the task that replaces it a new id" in rejected[0]["data"]["errors"][0]
        assert "queen gave no valid revised plan" in view["reason"]


async def test_the_demo_team_scenario_shipped_for_make_demo_completes_its_job(tmp_path: Path):
    with Daemon(tmp_path / "state", env={"NUMERUS_SCENARIO": "team"}).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "Welcome newcomers", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert result.returncode == 0, result.stdout + daemon.stderr()[-3000:]
        job = result.stdout.splitlines()[0].strip()
        view = daemon.status(job)
        hello = show(repo, view["integration"], "HELLO.md")
        assert hello.startswith("# Hello") and hello.endswith("-- the Numerus demo team\n")
        assert tasks_by_id(view).keys() == {"greet", "contrib", "sign"}


async def test_the_scripted_agent_without_a_scenario_plays_every_role_of_a_planned_job(tmp_path: Path):
    with Daemon(tmp_path / "state").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "say hello", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert result.returncode == 0, result.stdout + daemon.stderr()[-3000:]
        view = daemon.status(result.stdout.splitlines()[0].strip())
        assert "Write SCRIPTED.md holding this prompt." in show(repo, view["integration"], "SCRIPTED.md")


async def test_an_agent_silent_for_longer_than_the_idle_timeout_is_stopped_and_retried(tmp_path: Path):
    one_task = {"summary": "one", "tasks": [{"id": "t1", "title": "Write", "instructions": "write", "intents": []}]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": one_task}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim(("OUT.md", "create"))}]},
            {"match": {"role": "executor", "attempt": 1}, "steps": [{"say": "thinking"}, {"sleep": 30}]},
            {"match": {"role": "executor"}, "steps": [{"write": "OUT.md", "content": "done\n"}]},
            REVIEW_PASSES,
        ]
    }
    config = "idle_timeout_s = 1.5\nbackoff_s = [0.1]\nkill_grace_s = 1\n"
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "write", "--repo", str(repo), "--agent", "team", "--wait", timeout=60)
        assert result.returncode == 0, result.stdout + daemon.stderr()[-3000:]
        events = daemon.events(result.stdout.splitlines()[0].strip())
        (retry,) = by_type(events, "TaskRetryScheduled", "t1")
        assert retry["data"]["reasons"] == ["timed out: printed nothing for 1.5 s"]
        first_exit = by_type(events, "TaskExited", "t1")[0]
        assert first_exit["data"]["signal"] is not None and first_exit["data"]["duration_s"] < 10


async def test_with_a_git_too_old_for_merges_a_planned_job_is_refused_and_no_plan_still_runs(tmp_path: Path):
    import os

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    old_git = fake_bin / "git"
    old_git.write_text('#!/bin/sh\ncase "$*" in *--version*) echo "git version 2.30.1"; exit 0;; esac\nexit 1\n')
    old_git.chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    with Daemon(tmp_path / "state", env=env).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        refused = daemon.ctl("run", "plan it", "--repo", str(repo), "--agent", "scripted")
        assert refused.returncode == 1
        assert "needs git 2.38 or newer" in refused.stderr and "--no-plan" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        single = daemon.ctl("run", "--no-plan", "just do it", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert single.returncode == 0, single.stdout + single.stderr


async def test_with_claims_from_the_plan_no_executor_is_asked_and_overlapping_intents_still_wait(tmp_path: Path):
    plan = {"summary": "two tasks, one file", "tasks": [task("a", ("F.md", "create")), task("b", ("*.md", "modify"))]}
    team = {  # no claimer case: a claim question would fail the task
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "executor", "task": "a"},
                "steps": [{"sleep": 0.5}, {"write": "F.md", "content": "a\n"}],
            },
            {"match": {"role": "executor", "task": "b"}, "steps": [{"run": "echo b >> F.md"}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": team}, config="review = false\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        argv = ("run", "two", "--repo", str(repo), "--agent", "team", "--claims", "plan", "--wait")
        result = daemon.ctl(*argv, timeout=60)
        assert result.returncode == 0, result.stdout + daemon.stderr()[-3000:]
        job = result.stdout.splitlines()[0].strip()
        events = daemon.events(job)
        assert [e["data"]["attempt"] for e in by_type(events, "ClaimProposed")] == [0, 0]
        assert not list((daemon.state_dir / "runs" / job).glob("*/claim-*"))
        (denied,) = by_type(events, "ClaimDenied")
        assert denied["task"] == "b" and denied["data"]["holders"] == ["a"]
        assert not by_type(events, "ReviewCompleted")
        assert show(repo, f"numerus/{job}.integration", "F.md") == "a\nb\n"


async def test_a_crash_between_a_merge_and_its_record_is_repaired_on_restart_not_merged_again(tmp_path: Path):
    import subprocess as sp

    daemon = Daemon(tmp_path / "state", env={"NUMERUS_FAILPOINTS": "after-merge"}).start()
    repo = git_repo(tmp_path / "repo")
    job = daemon.ctl("run", "say hello", "--repo", str(repo), "--agent", "scripted", check=True).stdout.strip()
    process = daemon.process
    assert process is not None
    await eventually(lambda: process.poll() is not None, timeout=60, interval=0.05)
    assert process.returncode == 137  # died right after git merged, before TaskMerged was recorded
    daemon.stop()
    branch = f"numerus/{job}.integration"
    merges = sp.run(["git", "-C", str(repo), "rev-list", "--merges", branch], capture_output=True, text=True).stdout
    assert len(merges.split()) == 1

    daemon.env = {}
    daemon.start()
    try:
        view = daemon.status(job)
        assert view["status"] == "completed"
        (merged,) = by_type(daemon.events(job), "TaskMerged", "t1")
        assert merged["data"]["sha"] == merges.split()[0]
        again = sp.run(["git", "-C", str(repo), "rev-list", "--merges", branch], capture_output=True, text=True)
        assert again.stdout == merges  # recorded, never merged twice
        # And tidied as after any merge: the task's worktree and branch are gone.
        tasks = sp.run(["git", "-C", str(repo), "branch", "--list", f"numerus/{job}/*"], capture_output=True, text=True)
        assert tasks.stdout == ""
        assert not (daemon.state_dir / "worktrees" / job / "t1").exists()
        assert daemon.ctl("audit", "verify", job).returncode == 0
    finally:
        daemon.stop()


async def test_a_stalled_job_asks_the_queen_who_may_drop_and_add_tasks_while_others_run(tmp_path: Path):
    first = {
        "summary": "slow build, then docs",
        "tasks": [
            {"id": "t1", "title": "Build", "instructions": "build", "intents": []},
            {"id": "t2", "title": "Docs", "instructions": "docs", "deps": ["t1"], "intents": []},
        ],
    }
    revised = {
        "summary": "keep the build, write the docs now",
        "tasks": [
            {"id": "t1", "title": "Build", "instructions": "build", "intents": []},
            {"id": "t3", "title": "Docs now", "instructions": "docs", "intents": []},
        ],
    }
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": first}]},
            {"match": {"role": "queen"}, "steps": [{"answer": revised}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim(("{task}.md", "create"))}]},
            {
                "match": {"role": "executor", "task": "t1"},
                "steps": [{"say": "building"}, {"sleep": 4}, {"write": "t1.md", "content": "built\n"}],
            },
            {"match": {"role": "executor"}, "steps": [{"write": "{task}.md", "content": "{task}\n"}]},
            REVIEW_PASSES,
        ]
    }
    config = "stall_timeout_s = 1.5\nmax_replans = 1\n"
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = run_job(daemon, repo, "build", "--agent", "team", timeout=90)
        view = daemon.status(job)
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"t1": "completed", "t2": "skipped", "t3": "completed"}
        events = daemon.events(job)
        (stalled,) = by_type(events, "ReplanRequested")
        assert stalled["data"] == {"task": "", "reason": "no task completed for 1.5 s"}
        assert by_type(events, "TaskSkipped", "t2")[0]["data"]["reason"] == "dropped by plan v2"
        # t3 was added and done while t1 still ran.
        assert when(by_type(events, "TaskCompleted", "t3")[0]) < when(by_type(events, "TaskExited", "t1")[0])


async def test_an_integration_branch_moved_behind_numerus_fails_the_job_at_once_and_stops_its_agents(tmp_path: Path):
    plan = {"summary": "two tasks", "tasks": [task("a", ("A.md", "create")), task("b", ("B.md", "create"))]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "executor", "task": "a"},
                "steps": [{"sleep": 1.0}, {"write": "A.md", "content": "a\n"}],
            },
            {"match": {"role": "executor", "task": "b"}, "steps": [{"sleep": 60}]},
        ]
    }
    config = 'review = false\nclaims = "plan"\nbackoff_s = [0.1]\nkill_grace_s = 1\n'
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl("run", "two", "--repo", str(repo), "--agent", "team", check=True).stdout.strip()
        branch = f"numerus/{job}.integration"
        async with daemon.client() as client:
            await eventually(lambda: has(client, job, "TaskStarted", count=2), timeout=30, interval=0.1)
            # Somebody commits on the job's integration branch while its tasks run.
            git = ["git", "-C", str(repo)]
            tree = subprocess.run([*git, "rev-parse", f"{branch}^{{tree}}"], capture_output=True, text=True)
            stranger = subprocess.run(
                [*git, "commit-tree", tree.stdout.strip(), "-p", branch, "-m", "a stranger's commit"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            subprocess.run([*git, "update-ref", f"refs/heads/{branch}", stranger], check=True)
            view = await client.wait_for(job, lambda v: v["status"] != "running")
        assert view["status"] == "failed"
        assert f"Numerus alone moves {branch}" in view["reason"]
        events = daemon.events(job)
        assert not by_type(events, "TaskRetryScheduled")  # no agent run again for a merge that cannot happen
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"a": "failed", "b": "failed"}
        # b's agent, asleep for a minute, was stopped with the job rather than left running.
        (spawned,) = by_type(events, "AgentSpawned", "b")
        await eventually(lambda: not Path(f"/proc/{spawned['data']['pid']}").exists(), timeout=10, interval=0.1)
        # Its exit is recorded all the same, with its log's hash, though the job's end was recorded first.
        await eventually(lambda: by_type(daemon.events(job), "TaskExited", "b"), timeout=10, interval=0.1)
        assert subprocess.run([*git, "rev-parse", branch], capture_output=True, text=True).stdout.strip() == stranger
        assert daemon.ctl("audit", "verify", job).returncode == 0


STALL_S = 2.5


async def test_a_merge_waits_while_the_integration_branch_is_checked_out_and_lands_once_it_is_not(tmp_path: Path):
    plan = {"summary": "one", "tasks": [task("a")]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim(("A.md", "create"))}]},
            {"match": {"role": "executor"}, "steps": [{"sleep": 1.0}, {"write": "A.md", "content": "a\n"}]},
            REVIEW_PASSES,
        ]
    }
    # A stall (no task completed for STALL_S) would ask the queen for a revised plan: waiting on the user is none.
    config = f"backoff_s = [0.1]\nstall_timeout_s = {STALL_S}\nmax_replans = 1\n"
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl("run", "one", "--repo", str(repo), "--agent", "team", check=True).stdout.strip()
        branch = f"numerus/{job}.integration"
        async with daemon.client() as client:
            await eventually(lambda: has(client, job, "TaskStarted"), timeout=30, interval=0.1)
            # The user looks at the job's progress in a checkout of its integration branch while the task runs.
            look = tmp_path / "look"
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", str(look), branch], check=True)
            await eventually(lambda: has(client, job, "MergeBlocked"), timeout=30, interval=0.1)
            (blocked,) = by_type(await client.events(job), "MergeBlocked")
            assert f"is checked out in {look}" in blocked["data"]["reason"]
            # `status` says why the task is still merging.
            note = f"a: merge waits: {branch} is checked out in "
            await eventually(lambda: note in daemon.ctl("status", job, check=True).stdout, timeout=10, interval=0.1)
            # The stall timeout passes while the merge waits on the user: no replan is asked for meanwhile. (An
            # absence takes a wait to show: this one ends, failing, the moment the stall's event is recorded.)
            with pytest.raises(AssertionError, match="condition not met"):
                await eventually(lambda: has(client, job, "ReplanRequested"), timeout=STALL_S + 1, interval=0.1)
            assert (await client.status(job))["status"] == "running"
            subprocess.run(["git", "-C", str(look), "switch", "-q", "--detach"], check=True)
            assert (await client.wait_for(job, lambda v: v["status"] != "running"))["status"] == "completed"
        events = daemon.events(job)
        assert len(by_type(events, "TaskStarted", "a")) == 1  # the work was kept: no agent ran again
        assert not by_type(events, "TaskRetryScheduled")
        assert not by_type(events, "ReplanRequested")
        assert show(repo, branch, "A.md") == "a\n"
        assert "merge waits" not in daemon.ctl("status", job, check=True).stdout
        (line,) = [line for line in daemon.ctl("events", job, check=True).stdout.splitlines() if "MergeBlocked" in line]
        assert "merge waits (tried again every 2 s): numerus/" in line


async def test_parallel_bounds_the_executors_while_claims_are_asked_ahead_of_them(tmp_path: Path):
    plan = {"summary": "six", "tasks": [task(f"t{n}") for n in range(1, 7)]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            *(
                {"match": {"role": "claimer", "task": f"t{n}"}, "steps": [{"answer": claim((f"F{n}.md", "create"))}]}
                for n in range(1, 7)
            ),
            {"match": {"role": "executor"}, "steps": [{"sleep": 0.6}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": team}, config="review = false\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = run_job(daemon, repo, "six", "--agent", "team", "--parallel", "2")
        events = daemon.events(job)
    # Executors: never more than two at once, and two at once at some point.
    edges = sorted(
        [(when(e), 1) for e in by_type(events, "TaskStarted")] + [(when(e), -1) for e in by_type(events, "TaskExited")]
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2
    # Claims run ahead, not all first: the first executor started before the last claim was answered, and every
    # claim was answered before its task's executor started.
    claims = {e["task"]: when(e) for e in by_type(events, "ClaimProposed")}
    starts = {e["task"]: when(e) for e in by_type(events, "TaskStarted")}
    assert min(starts.values()) < max(claims.values())
    assert all(claims[task] < starts[task] for task in starts)


def commands_seen(log: Path) -> dict[str, str]:
    """What each command an agent ran printed, from its terminal log (the `codex exec --json` lines)."""
    seen = {}
    for line in log.read_text().splitlines():
        item = json.loads(line).get("item") or {} if line.startswith("{") else {}
        if item.get("type") == "command_execution" and item.get("status") == "completed":
            seen[item["command"]] = item["aggregated_output"]
    return seen


async def test_a_job_works_from_the_commit_it_was_submitted_at_and_its_readers_see_that_not_the_working_tree(
    tmp_path: Path,
):
    plan = {
        "summary": "two",
        "tasks": [task("a", ("A.md", "create")), {**task("b", ("A.md", "modify")), "deps": ["a"]}],
    }
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"run": "cat README.md; ls"}, {"sleep": 1.5}, {"answer": plan}]},
            {"match": {"role": "claimer", "task": "a"}, "steps": [{"answer": claim(("A.md", "create"))}]},
            {
                "match": {"role": "claimer", "task": "b"},
                "steps": [{"run": "cat A.md"}, {"answer": claim(("A.md", "modify"))}],
            },
            {"match": {"role": "executor", "task": "a"}, "steps": [{"write": "A.md", "content": "a\n"}]},
            {"match": {"role": "executor", "task": "b"}, "steps": [{"run": "echo b >> A.md"}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": team}, config="review = false\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        submitted_at = git_head(repo)
        # The user has work of their own in the working tree: an edit and a new file, neither committed.
        (repo / "README.md").write_text("# edited, not committed\n")
        (repo / "draft.txt").write_text("not committed either\n")
        result = daemon.ctl("run", "two", "--repo", str(repo), "--agent", "team", check=True)
        job = result.stdout.strip()
        (note,) = result.stderr.splitlines()
        assert note.startswith("numerusctl: note: 2 uncommitted changes in ")
        assert f"(README.md, draft.txt) left out: the job works from commit {submitted_at[:12]} (HEAD)" in note
        # While the planner works, the user commits their work: the job still works from where it was submitted.
        commit = ["-c", "user.name=u", "-c", "user.email=u@example.invalid", "commit", "-qam", "the user's edit"]
        subprocess.run(["git", "-C", str(repo), *commit], check=True)
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["status"] not in ("planning", "running"))
        assert view["status"] == "completed", daemon.stderr()[-3000:]
        (submitted,) = by_type(daemon.events(job), "JobSubmitted")
        assert submitted["data"]["base_sha"] == submitted_at
        assert submitted["data"]["uncommitted_count"] == 2
        assert view["base_sha"] == submitted_at
        branch = f"numerus/{job}.integration"
        assert show(repo, branch, "README.md") == "# test repo\n"  # not the user's later commit
        assert show(repo, branch, "A.md") == "a\nb\n"
        # The planner read the commit, not the working tree; b's claimer read a's merged work.
        runs = daemon.state_dir / "runs" / job
        assert commands_seen(runs / "plan" / "1" / "stdout.log")["cat README.md; ls"] == "# test repo\nREADME.md\n"
        assert commands_seen(runs / "b" / "claim-1" / "stdout.log")["cat A.md"] == "a\n"

    # Nothing of the job's reading is left in the user's repository once it has ended.
    await eventually(lambda: ".checkouts" not in worktrees(repo), timeout=10, interval=0.1)


async def test_a_repository_too_slow_to_tell_its_uncommitted_changes_does_not_hold_the_submission_up(
    tmp_path: Path,
):
    import os
    import shutil

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    released = tmp_path / "released"
    # `git status` of a huge working tree: it answers only once the test has its reply, so the bound always wins.
    slow_git = fake_bin / "git"
    slow_git.write_text(
        f'#!/bin/sh\ncase " $* " in *" status "*) while [ ! -e {released} ]; do sleep 0.05; done;; esac\n'
        f'exec {shutil.which("git")} "$@"\n'
    )
    slow_git.chmod(0o755)
    with Daemon(tmp_path / "state", env={"PATH": f"{fake_bin}:{os.environ['PATH']}"}).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        try:
            result = daemon.ctl("run", "say hello", "--repo", str(repo), "--agent", "scripted", check=True)
        finally:
            released.touch()  # the waiting `git status` ends, whatever the outcome
        job = result.stdout.strip()
        assert result.stderr.splitlines() == [
            f"numerusctl: note: could not tell within 2 s whether {repo} has uncommitted changes; the job works "
            f"from commit {git_head(repo)[:12]} (HEAD), without any"
        ]
        (submitted,) = by_type(daemon.events(job), "JobSubmitted")
        assert submitted["data"]["uncommitted_count"] is None and submitted["data"]["base_sha"] == git_head(repo)
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["status"] not in ("planning", "running"))
        assert view["status"] == "completed"


async def test_checkouts_an_ended_job_left_behind_a_stopped_daemon_are_removed_when_the_next_one_starts(
    tmp_path: Path,
):
    daemon = Daemon(tmp_path / "state").start()
    repo = git_repo(tmp_path / "repo")
    try:
        job = run_job(daemon, repo, "say hello", "--agent", "scripted")
    finally:
        daemon.stop()
    # As a daemon killed between the job's end and the removal of its checkouts would leave it, in the mirror of
    # the repository where the job's git work happens (the user's repository has no worktree of Numerus's).
    assert worktrees(repo).count("worktree ") == 1
    mirror = mirror_path(daemon.state_dir / "repos", repo)
    left = daemon.state_dir / "worktrees" / f"{job}.checkouts" / "1"
    subprocess.run(["git", "-C", str(mirror), "worktree", "add", "-q", "--detach", str(left), "HEAD"], check=True)
    assert str(left) in worktrees(mirror)
    with daemon.start():
        await eventually(lambda: str(left) not in worktrees(mirror) and not left.parent.exists(), timeout=20)
