"""The operator's hands on a job: `retry`, `skip`, `kill JOB TASK` and `resume`, as state-machine tests of the
domain and end to end through numerusctl. Each is an event with who asked; a refusal is one line, nothing recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from numerusd import domain
from numerusd.domain.observations import AttemptFailed, Interrupted, Kill, Resume, Retry, Skip
from numerusd.errors import CommandRefused, NotFound
from tests.conftest import eventually
from tests.daemon_harness import Daemon, claim, git_repo, session_members
from tests.test_domain import decide
from tests.test_domain_pipeline import claimed, planned, start, task, to_merge

ALICE = "alice (operator)"


def failed_for_good(job: domain.JobState, task_id: str) -> domain.JobState:
    """The task's attempts all fail (max_attempts 1 in these jobs)."""
    if job.tasks[task_id].status == "pending":
        job = decide(job, claimed(task_id, f"{task_id}.txt"))
    job = start(job, task_id)
    return decide(job, AttemptFailed(task=task_id, reasons=("the check failed",)))


def statuses(job: domain.JobState) -> dict[str, str]:
    return {task_id: t.status for task_id, t in job.tasks.items()}


def test_retry_reopens_a_failed_job_with_the_task_and_the_dependents_its_failure_skipped():
    job = failed_for_good(planned(task("t1"), task("t2", "t1"), task("t3"), max_attempts=1), "t1")
    job = decide(to_merge(job, "t3"), domain.observations.Merged(task="t3", sha="d" * 40, created=True))
    assert (job.status, statuses(job)) == ("failed", {"t1": "failed", "t2": "skipped", "t3": "completed"})

    decision = domain.decide(job, Retry(by=ALICE))
    assert [(task_id, type(event).__name__) for task_id, event in decision] == [
        (None, "JobReopened"),
        ("t1", "TaskRetryRequested"),
        ("t2", "TaskRetryRequested"),
    ]
    assert all(event.by == ALICE for _, event in decision)
    job = decide(job, Retry(by=ALICE))
    assert (job.status, statuses(job)) == ("running", {"t1": "pending", "t2": "pending", "t3": "completed"})
    retried = job.tasks["t1"]
    assert retried.failed_attempts == 0 and retried.next_attempt == 2  # new attempts, numbered on
    assert retried.fresh_worktree is False  # it never had one here; a task that had one starts from the tip


def test_retry_refuses_a_task_that_completed_or_runs_and_one_that_does_not_exist():
    job = start(decide(planned(task("t1"), task("t2")), claimed("t1", "a.txt")), "t1")
    with pytest.raises(CommandRefused, match="t1 of job J is running: only a failed, killed, skipped or interrupted"):
        domain.decide(job, Retry(tasks=("t1",)))
    with pytest.raises(NotFound, match="has no task 'zz' \\(its tasks: t1, t2\\)"):
        domain.decide(job, Retry(tasks=("zz",)))
    with pytest.raises(CommandRefused, match="no failed, killed or interrupted task to retry"):
        domain.decide(job, Retry())


def test_a_task_skipped_by_a_user_lets_its_dependents_run_and_the_job_complete():
    job = failed_for_good(planned(task("t1"), task("t2", "t1"), max_attempts=1), "t1")
    assert (job.status, statuses(job)) == ("failed", {"t1": "failed", "t2": "skipped"})
    job = decide(job, Skip(by=ALICE, task="t1"))
    assert (job.status, statuses(job)) == ("running", {"t1": "skipped", "t2": "pending"})
    assert job.tasks["t1"].skipped_by == ALICE
    job = decide(job, domain.observations.TaskReady(task="t2"))
    assert job.tasks["t2"].status == "pending", "a dependency a user skipped counts as done"
    job = decide(to_merge(job, "t2"), domain.observations.Merged(task="t2", sha="e" * 40, created=True))
    assert job.status == "completed"


def test_skipping_the_last_open_task_of_a_running_job_ends_it_completed():
    job = decide(
        to_merge(planned(task("t1"), task("t2")), "t1"),
        domain.observations.Merged(task="t1", sha="f" * 40, created=True),
    )
    job = decide(job, Skip(by=ALICE, task="t2"))
    assert (job.status, statuses(job)) == ("completed", {"t1": "completed", "t2": "skipped"})
    with pytest.raises(CommandRefused, match="t1 of job J is completed: it cannot be skipped"):
        domain.decide(job, Skip(task="t1"))


def test_killing_one_task_stops_it_and_skips_its_dependents_while_the_others_go_on():
    job = start(decide(planned(task("t1"), task("t2", "t1"), task("t3")), claimed("t1", "a.txt")), "t1")
    job = decide(job, Kill(by=ALICE, task="t1"))
    assert job.tasks["t1"].kill_requested and job.tasks["t1"].status == "running"  # until its agent ends
    job = decide(job, domain.observations.StoppedForKill(task="t1"))
    assert (job.status, statuses(job)) == ("running", {"t1": "killed", "t2": "skipped", "t3": "pending"})
    assert "t1" not in job.lock_holds
    # A task not running is killed at once; with nothing left open, the job ends (failed: not all completed).
    job = decide(job, Kill(by=ALICE, task="t3"))
    assert (job.status, job.tasks["t3"].status) == ("failed", "killed")
    assert job.tasks["t3"].reason == f"killed by {ALICE}"
    with pytest.raises(CommandRefused, match="t3 of job J is already killed; nothing to kill"):
        domain.decide(job, Kill(task="t3"))


def test_an_interrupted_job_resumes_once_and_an_interrupted_task_keeps_its_thread():
    job = start(decide(planned(task("t1")), claimed("t1", "a.txt")), "t1")
    job = decide(job, domain.observations.AgentReported(task="t1", events=(_thread("th-1"),)))
    job = decide(job, Interrupted(reason="numerusd stopped", next="it waits for 'numerusctl resume'"))
    assert (job.status, job.tasks["t1"].status, job.tasks["t1"].resumable_thread) == (
        "interrupted",
        "interrupted",
        "th-1",
    )
    assert job.tasks["t1"].failed_attempts == 0
    job = decide(job, Resume(by=ALICE))
    assert job.status == "running" and job.tasks["t1"].status == "interrupted"  # until its attempt goes on
    with pytest.raises(CommandRefused, match="is running, not interrupted: nothing to resume"):
        domain.decide(job, Resume())
    job = decide(
        job, domain.observations.AgentStarting(task="t1", argv=("a",), workdir="w", log_path="l", resumes="th-1")
    )
    assert (job.tasks["t1"].status, job.tasks["t1"].attempt, job.tasks["t1"].thread_id) == ("running", 1, "th-1")


def _thread(thread_id: str):
    from numerusd.protocol.events import AgentThreadStarted

    return AgentThreadStarted(thread_id=thread_id)


# --- end to end ---------------------------------------------------------------------------------------------

#: Two tasks: `a` fails its check until a marker file exists beside the scenarios, `b` depends on it.
FLAKY = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {
                    "answer": {
                        "summary": "a then b",
                        "tasks": [
                            {"id": "a", "title": "A", "instructions": "write A.md", "intents": []},
                            {"id": "b", "title": "B", "instructions": "write B.md", "deps": ["a"], "intents": []},
                        ],
                    }
                }
            ],
        },
        {"match": {"role": "claimer", "task": "a"}, "steps": [{"answer": claim(("A.md", "create"))}]},
        {"match": {"role": "claimer", "task": "b"}, "steps": [{"answer": claim(("B.md", "create"))}]},
        {"match": {"role": "executor", "task": "a"}, "steps": [{"write": "A.md", "content": "a\n"}]},
        {"match": {"role": "executor", "task": "b"}, "steps": [{"write": "B.md", "content": "b\n"}]},
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["ok"]}}]},
    ]
}


@pytest.fixture
def flaky(tmp_path: Path):
    daemon = Daemon(tmp_path / "state", agents={"team": FLAKY})
    # The check passes for `b` always, for `a` only once the marker exists (it stands for a fix the user made); it
    # lies beside the scenarios, which the checks' sandbox sees (its /tmp is its own).
    marker = daemon.scenarios_dir / "fixed"
    check = f"test -e B.md || test -e {marker}"
    daemon.config = f"checks = [{check!r}]\nmax_attempts = 1\nmax_replans = 0\n".replace("'", '"')
    daemon.start()
    yield daemon, git_repo(tmp_path / "repo"), marker
    daemon.stop()


async def test_retry_through_numerusctl_reruns_the_failed_task_and_its_skipped_dependent(flaky):
    daemon, repo, marker = flaky
    run = daemon.ctl("run", "a then b", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
    assert run.returncode == 1, run.stdout + run.stderr
    job = run.stdout.splitlines()[0].strip()
    view = daemon.status(job)
    assert {t["id"]: t["status"] for t in view["tasks"]} == {"a": "failed", "b": "skipped"}

    marker.touch()
    retried = daemon.ctl("retry", "last")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"job {job}: retrying a, b; running"
    async with daemon.client() as client:
        view = await client.wait_for(job, lambda v: v["status"] in ("completed", "failed"), timeout=60)
    assert view["status"] == "completed"
    events = daemon.events(job)
    asked = [e for e in events if e["type"] in ("JobReopened", "TaskRetryRequested")]
    assert [(e["type"], e["task"]) for e in asked] == [
        ("JobReopened", None),
        ("TaskRetryRequested", "a"),
        ("TaskRetryRequested", "b"),
    ]
    assert all(e["data"]["by"].endswith("(operator)") for e in asked)
    assert daemon.ctl("audit", "verify", job, "--finished").returncode == 0


async def test_skip_through_numerusctl_lets_the_dependent_run_and_a_viewer_may_not(flaky):
    daemon, repo, _marker = flaky
    run = daemon.ctl("run", "a then b", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
    job = run.stdout.splitlines()[0].strip()
    refused = daemon.ctl("--role", "viewer", "skip", job, "a")
    assert refused.returncode == 1 and "not allowed" in refused.stderr
    assert daemon.ctl("skip", job, "zz").stderr.strip().endswith("has no task 'zz' (its tasks: a, b)")
    skipped = daemon.ctl("skip", job, "a")
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip() == f"job {job}: a skipped; b run again; running"
    async with daemon.client() as client:
        view = await client.wait_for(job, lambda v: v["status"] in ("completed", "failed"), timeout=60)
    assert view["status"] == "completed"
    assert {t["id"]: t["status"] for t in view["tasks"]} == {"a": "skipped", "b": "completed"}


SLOW_ONE = [{"say": "working"}, {"run": "sleep 300"}]


async def test_kill_of_one_task_stops_its_agent_and_leaves_the_job_to_end(tmp_path: Path):
    team = {
        "cases": [
            {
                "match": {"role": "planner"},
                "steps": [
                    {
                        "answer": {
                            "summary": "slow and quick",
                            "tasks": [
                                {"id": "slow", "title": "S", "instructions": "s", "intents": []},
                                {"id": "quick", "title": "Q", "instructions": "q", "intents": []},
                            ],
                        }
                    }
                ],
            },
            {"match": {"role": "claimer", "task": "slow"}, "steps": [{"answer": claim(("S.md", "create"))}]},
            {"match": {"role": "claimer", "task": "quick"}, "steps": [{"answer": claim(("Q.md", "create"))}]},
            {"match": {"role": "executor", "task": "slow"}, "steps": SLOW_ONE},
            {"match": {"role": "executor", "task": "quick"}, "steps": [{"write": "Q.md", "content": "q\n"}]},
            {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["ok"]}}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": team}, env={"NUMERUS_KILL_GRACE_S": "1"}).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl_json("run", "slow and quick", "--repo", str(repo), "--agent", "team")["job"]
        async with daemon.client() as client:
            view = await client.wait_for(
                job, lambda v: any(t["id"] == "slow" and t["pid"] for t in v["tasks"]), timeout=30
            )
        (slow_pid,) = [t["pid"] for t in view["tasks"] if t["id"] == "slow"]
        killed = daemon.ctl("kill", job, "slow")
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.strip() == f"task slow of job {job}: stopping slow"
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["status"] in ("completed", "failed", "killed"), timeout=30)
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"slow": "killed", "quick": "completed"}
        assert view["status"] == "failed"  # a task did not complete; `retry` would run it again
        events = daemon.events(job)
        (asked,) = [e for e in events if e["type"] == "TaskKillRequested"]
        assert asked["task"] == "slow" and asked["data"]["by"].endswith("(operator)")
        await eventually(lambda: not session_members(slow_pid))  # the slow agent and all it started are gone


async def test_a_task_skipped_or_killed_while_its_claim_is_asked_ends_there_and_the_job_goes_on(tmp_path: Path):
    """A user's command can end a task between two steps of its flow (here while its claimer answers): the flow
    stops there, the claimer's late answer is not recorded, and the rest of the job goes on."""
    team = {
        "cases": [
            {
                "match": {"role": "planner"},
                "steps": [
                    {
                        "answer": {
                            "summary": "three",
                            "tasks": [
                                {"id": "slow", "title": "S", "instructions": "s", "intents": []},
                                {"id": "gone", "title": "G", "instructions": "g", "intents": []},
                                {"id": "quick", "title": "Q", "instructions": "q", "intents": []},
                            ],
                        }
                    }
                ],
            },
            {
                "match": {"role": "claimer", "task": "slow"},
                "steps": [{"sleep": 3}, {"answer": claim(("S.md", "create"))}],
            },
            {
                "match": {"role": "claimer", "task": "gone"},
                "steps": [{"sleep": 3}, {"answer": claim(("G.md", "create"))}],
            },
            {"match": {"role": "claimer", "task": "quick"}, "steps": [{"answer": claim(("Q.md", "create"))}]},
            {"match": {"role": "executor"}, "steps": [{"write": "Q.md", "content": "q\n"}]},
            {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["ok"]}}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": team}, config="review = false\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl_json("run", "three", "--repo", str(repo), "--agent", "team")["job"]
        async with daemon.client() as client:
            await client.wait_for(job, lambda v: len(v["tasks"]) == 3)
            await eventually(lambda: (daemon.state_dir / "runs" / job / "gone" / "claim-1").exists(), timeout=20)
            assert daemon.ctl("skip", job, "gone").returncode == 0
            assert daemon.ctl("kill", job, "slow").returncode == 0
            view = await client.wait_for(job, lambda v: v["status"] in ("completed", "failed"), timeout=60)
        assert {t["id"]: t["status"] for t in view["tasks"]} == {
            "slow": "killed",
            "gone": "skipped",
            "quick": "completed",
        }
        assert view["reason"] == "task slow killed"  # skipped by a user, `gone` does not fail the job
        assert "pipeline of job" not in daemon.stderr()
        assert "ClaimProposed" not in {e["type"] for e in daemon.events(job) if e["task"] in ("slow", "gone")}
