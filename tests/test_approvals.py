"""Approvals as events: a job that waits at its plan or its merge, a user's own plan, and the escalation chain
that ends with a task awaiting approval. The domain's decisions first, then end to end through numerusctl."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from numerusctl.render_events import progress_line
from numerusd import domain
from numerusd.config import load_settings
from numerusd.domain.observations import Approve, AttemptFailed, Kill, Merged, Reject, Settled, SubmitJob
from numerusd.errors import BadRequest, CommandRefused, ConfigError
from numerusd.plans import validate_plan
from numerusd.protocol.events import (
    JobApproved,
    JobFailed,
    JobRejected,
    JobSubmitted,
    PlanValidated,
    TaskApprovalRequested,
    TaskEscalated,
    TaskRetryScheduled,
)
from numerusd.protocol.plan import Plan
from tests.daemon_harness import Daemon, git, git_repo
from tests.test_domain import decide
from tests.test_domain_pipeline import ROLES, answer, claimed, start, task, to_merge

ALICE = "alice (operator)"


def submitted(*gates: str, max_attempts: int = 3, escalate: dict[str, str] | None = None) -> domain.JobState:
    submit = SubmitJob(
        goal="goal",
        repo="/repo",
        roles=ROLES,
        max_attempts=max_attempts,
        approve=gates,
        escalate=escalate or {},
        by=ALICE,
    )
    return decide(None, submit)


def planned(*gates: str, max_attempts: int = 3, escalate: dict[str, str] | None = None) -> domain.JobState:
    job = submitted(*gates, max_attempts=max_attempts, escalate=escalate)
    return answer(job, Plan(summary="s", tasks=(task("t1"), task("t2", "t1"))))


def types(decision: domain.Decision) -> list[str]:
    return [type(data).__name__ for _, data in decision]


# --- the plan ----------------------------------------------------------------------------------------------------


def test_a_job_asked_to_wait_at_its_plan_waits_with_its_tasks_pending_until_approved():
    job = planned("plan")
    assert job.status == "awaiting_approval" and job.approval == "plan"
    assert {t.status for t in job.tasks.values()} == {"pending"}
    view = domain.job_view(job)
    assert view.status == "awaiting_approval" and view.approval == "plan"

    decision = domain.decide(job, Approve(by=ALICE))
    assert decision == [(None, JobApproved(gate="plan", by=ALICE))]
    job = decide(job, Approve(by=ALICE))
    assert job.status == "running" and job.approval is None


def test_a_rejected_plan_fails_the_job_with_who_rejected_it_and_why():
    job = decide(planned("plan"), Reject(by=ALICE, reason="too broad"))
    assert job.status == "failed"
    assert job.reason == "the plan was rejected by alice (operator): too broad"
    assert {t.status for t in job.tasks.values()} == {"skipped"}


def test_approve_or_reject_of_a_job_that_waits_for_nothing_is_refused_in_one_line():
    job = planned()
    assert job.status == "running"
    for command in (Approve(by=ALICE), Reject(by=ALICE)):
        with pytest.raises(CommandRefused) as refused:
            domain.decide(job, command)
        assert "is running, not awaiting approval" in refused.value.message
        assert "\n" not in refused.value.message
    with pytest.raises(CommandRefused, match="task t1 of job J is pending, not awaiting approval"):
        domain.decide(job, Approve(by=ALICE, task="t1"))
    with pytest.raises(BadRequest, match="--add-tokens"):
        domain.decide(planned("plan"), Approve(by=ALICE, add_tokens=10))


def test_a_revised_plan_does_not_wait_again():
    job = decide(planned("plan"), Approve(by=ALICE))
    job = msgspec.structs.replace(job, status="replanning")
    job = answer(job, Plan(summary="s2", tasks=(task("t1"), task("t3"))), role="queen")
    assert job.status == "running" and job.plan_version == 2


def test_a_users_plan_is_recorded_at_submission_as_attempt_0_and_still_waits_for_approval():
    checked = validate_plan(json.dumps({"summary": "mine", "tasks": [{"id": "a", "title": "A", "instructions": "x"}]}))
    assert not isinstance(checked, list)
    submit = SubmitJob(
        goal="g", repo="/r", roles=ROLES, approve=("plan",), by=ALICE, given_plan=checked.plan, given_plan_hash="h1"
    )
    decision = domain.decide(None, submit)
    assert types(decision) == ["JobSubmitted", "PlanValidated", "TaskCreated", "ApprovalRequested"]
    validated = decision[1][1]
    assert isinstance(validated, PlanValidated) and validated.attempt == 0 and validated.hash == "h1"
    job = decide(None, submit)
    assert job.status == "awaiting_approval" and list(job.tasks) == ["a"]


# --- the merge ---------------------------------------------------------------------------------------------------


def merged_all(*gates: str) -> domain.JobState:
    job = decide(planned(*gates), Approve(by=ALICE)) if "plan" in gates else planned(*gates)
    for task_id in ("t1", "t2"):
        job = to_merge(job, task_id)
        job = decide(job, Merged(task=task_id, sha=f"{task_id}" * 20, created=True))
    return job


def test_a_merge_approval_holds_the_job_before_it_is_final_and_approving_completes_it():
    job = merged_all("merge")
    assert job.status == "awaiting_approval" and job.approval == "merge"
    assert {t.status for t in job.tasks.values()} == {"completed"}
    assert domain.decide(job, Settled()) == []  # the pipeline's end does not complete it behind the user's back
    decision = domain.decide(job, Approve(by=ALICE))
    assert types(decision) == ["JobApproved", "JobCompleted"]
    assert decide(job, Approve(by=ALICE)).status == "completed"


def test_a_rejected_merge_fails_the_job_and_says_where_the_work_stays():
    job = msgspec.structs.replace(merged_all("plan", "merge"), integration="numerus/J.integration")
    decision = domain.decide(job, Reject(by=ALICE, reason="not now"))
    assert decision[0] == (None, JobRejected(gate="merge", by=ALICE, reason="not now"))
    failed = decision[1][1]
    assert isinstance(failed, JobFailed)
    assert (
        failed.reason == "the merge was rejected by alice (operator): not now; its work stays on numerus/J.integration"
    )


def test_without_a_merge_approval_the_job_completes_as_before():
    job = merged_all()
    assert job.status == "completed" and job.approval is None


# --- escalation --------------------------------------------------------------------------------------------------


def failing(job: domain.JobState, task_id: str = "t1") -> tuple[domain.JobState, domain.Decision]:
    """The task's attempt runs and fails; the job after it, and what was decided."""
    job = start(job, task_id)
    failed = AttemptFailed(task=task_id, reasons=("the agent ended with exit code 1",))
    return decide(job, failed), domain.decide(job, failed)


def test_after_its_attempts_a_task_gets_one_on_the_escalate_profile_then_waits_for_approval():
    job = planned(max_attempts=2, escalate={"scripted": "strong"})
    job = decide(job, claimed("t1", "F.md"))
    job, decision = failing(job)
    assert types(decision) == ["TaskRetryScheduled"]
    job, decision = failing(job)
    assert decision[0] == ("t1", TaskEscalated(agent="strong", previous="scripted"))
    assert isinstance(decision[1][1], TaskRetryScheduled) and decision[1][1].next_attempt == 3
    assert job.tasks["t1"].agent == "strong" and job.tasks["t1"].status == "retrying"

    job, decision = failing(job)  # the escalated attempt fails too: the task waits, holding its locks
    assert types(decision) == ["TaskApprovalRequested"]
    held = decision[0][1]
    assert isinstance(held, TaskApprovalRequested) and held.reason.startswith("awaiting approval: failed after 3")
    t1 = job.tasks["t1"]
    assert t1.status == "awaiting_approval" and "t1" in job.lock_holds and job.status == "running"
    assert domain.job_view(job).awaiting_tasks == ["t1"]

    with pytest.raises(CommandRefused, match="task t1 awaits it: numerusctl approve J t1"):
        domain.decide(job, Approve(by=ALICE))
    job = decide(job, Approve(by=ALICE, task="t1"))
    assert job.tasks["t1"].status == "retrying" and job.tasks["t1"].next_attempt == 4

    job, _ = failing(job)
    assert job.tasks["t1"].status == "awaiting_approval"
    job = decide(job, Reject(by=ALICE, task="t1", reason="hopeless"))
    assert job.tasks["t1"].status == "failed" and job.tasks["t1"].reason == (
        "task t1 was rejected by alice (operator): hopeless"
    )
    assert job.tasks["t2"].status == "skipped" and job.status == "failed" and "t1" not in job.lock_holds


def test_without_an_escalate_profile_the_task_fails_as_before():
    job = planned(max_attempts=1)
    job = decide(job, claimed("t1", "F.md"))
    job, decision = failing(job)
    assert "TaskFailed" in types(decision) and job.tasks["t1"].status == "failed"


def test_a_kill_ends_a_task_awaiting_approval_and_gives_its_locks_back():
    job = planned(max_attempts=1, escalate={"scripted": "strong"})
    job = decide(job, claimed("t1", "F.md"))
    job, _ = failing(job)
    job, _ = failing(job)
    assert job.tasks["t1"].status == "awaiting_approval"
    job = decide(job, Kill())
    assert job.tasks["t1"].status == "killed" and job.status == "killed" and not job.lock_holds


def test_the_approvals_asked_and_who_asked_are_recorded_in_job_submitted():
    assert submitted("plan", "merge").approve == ("plan", "merge")
    decision = domain.decide(None, SubmitJob(goal="g", repo="/r", roles=ROLES, approve=("merge",), by=ALICE))
    recorded = decision[0][1]
    assert isinstance(recorded, JobSubmitted) and recorded.approve == ("merge",) and recorded.by == ALICE


def test_the_approve_setting_and_escalate_profiles_are_read_from_the_config(tmp_path: Path):
    (tmp_path / "numerus.toml").write_text(
        'approve = ["all"]\n[agents.weak]\nkind = "scripted"\nescalate = "strong"\n[agents.strong]\nkind = "scripted"\n'
    )
    settings = load_settings(state_dir=tmp_path, env={})
    assert settings.approvals() == ("plan", "merge") and settings.approvals(("merge",)) == ("merge",)
    assert settings.escalations() == {"weak": "strong"}
    (tmp_path / "numerus.toml").write_text('[agents.weak]\nkind = "scripted"\nescalate = "nobody"\n')
    with pytest.raises(ConfigError, match=r"agents\.weak\.escalate: 'nobody' is not a configured agent profile"):
        load_settings(state_dir=tmp_path, env={})
    (tmp_path / "numerus.toml").write_text('approve = ["later"]\n')
    with pytest.raises(ConfigError, match=r"at `\$.approve\[0\]`"):
        load_settings(state_dir=tmp_path, env={})


def test_run_wait_tells_how_to_answer_a_job_that_waits():
    line = progress_line("J", "ApprovalRequested", None, {"gate": "budget", "reason": "the job used 9 tokens of its 5"})
    assert line == (
        "job J waits for approval of its budget: the job used 9 tokens of its 5 "
        "(numerusctl approve J --add-tokens N, or numerusctl reject J)"
    )


# --- end to end --------------------------------------------------------------------------------------------------

PLAN = {
    "summary": "two notes",
    "tasks": [
        {"id": "a", "title": "A", "instructions": "write A.md", "intents": [{"path": "A.md", "mode": "create"}]},
        {
            "id": "b",
            "title": "B",
            "instructions": "write B.md",
            "deps": ["a"],
            "intents": [{"path": "B.md", "mode": "create"}],
        },
    ],
}

TEAM = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": PLAN}]},
        {"match": {"role": "executor", "task": "a"}, "steps": [{"write": "A.md", "content": "a\n"}]},
        {"match": {"role": "executor", "task": "b"}, "steps": [{"write": "B.md", "content": "b\n"}]},
    ]
}
#: A planner that must not be asked (a user gave the plan): its answer is no plan at all.
NO_PLANNER = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": "no plan from me"}]},
        *TEAM["cases"][1:],
    ]
}
#: The weak profile's executor always fails; the strong one fails its first attempt (the escalated one) and
#: succeeds after a user approved one more.
WEAK = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": {"summary": "s", "tasks": [PLAN["tasks"][0]]}}]},
        {"match": {"role": "executor"}, "steps": [{"fail": "too weak"}]},
    ]
}
STRONG = {
    "cases": [
        {"match": {"role": "executor", "attempt": 2}, "steps": [{"fail": "not yet"}]},
        {"match": {"role": "executor"}, "steps": [{"write": "A.md", "content": "strong\n"}]},
    ]
}

CONFIG = """
claims = "plan"
review = false
backoff_s = [0.1]
max_attempts = 1
max_replans = 0
"""


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(
        tmp_path / "state",
        agents={"team": TEAM, "noplanner": NO_PLANNER, "weak": WEAK, "strong": STRONG},
        profiles={"weak": 'escalate = "strong"'},
        config=CONFIG,
    ).start()
    yield d
    d.stop()


def submit(daemon: Daemon, repo: Path, *args: str) -> str:
    result = daemon.ctl("run", "two notes", "--repo", str(repo), *args)
    assert result.returncode == 0, result.stderr + daemon.stderr()[-3000:]
    return result.stdout.strip()


def of_type(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event["type"] == name]


@pytest.mark.slow
async def test_a_job_waits_at_its_plan_until_approved_then_completes(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "--agent", "team", "--approve", "plan")
    async with daemon.client() as client:
        view = await client.wait_for(job, lambda v: v["status"] == "awaiting_approval")
        assert view["approval"] == "plan" and {t["status"] for t in view["tasks"]} == {"pending"}
        shown = daemon.ctl("status", job, check=True).stdout
        assert "approval of its plan" in shown and f"numerusctl approve {job}" in shown
        assert "awaiting_approval" in daemon.ctl("plan", job, check=True).stdout
        assert not of_type(await client.events(job), "TaskStarted")

        approved = daemon.ctl("approve", job[-6:], check=True).stdout
        assert approved.strip() == f"job {job}: plan approved; the job goes on"
        await client.wait_for(job, lambda v: v["status"] == "completed", timeout=60)
        events = await client.events(job)
    (submitted,) = of_type(events, "JobSubmitted")
    assert submitted["data"]["approve"] == ["plan"] and submitted["data"]["by"].endswith("(operator)")
    (approval,) = of_type(events, "JobApproved")
    assert approval["data"]["by"].endswith("(operator)") and approval["data"]["gate"] == "plan"
    order = [event["type"] for event in events]
    assert order.index("JobApproved") < order.index("TaskStarted")
    assert git(repo, "show", f"numerus/{job}.integration:B.md") == "b\n"


@pytest.mark.slow
async def test_a_rejected_plan_ends_the_job_failed_with_the_reason(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "--agent", "team", "--approve", "plan,merge")
    async with daemon.client() as client:
        await client.wait_for(job, lambda v: v["status"] == "awaiting_approval")
        rejected = daemon.ctl("reject", job, "--reason", "too broad", check=True).stdout
        assert rejected.strip() == f"job {job}: plan rejected; the job fails"
        view = await client.wait_for(job, lambda v: v["status"] == "failed")
        assert view["reason"].startswith("the plan was rejected by ") and view["reason"].endswith(": too broad")
        assert not of_type(await client.events(job), "TaskStarted")
    again = daemon.ctl("approve", job)
    assert again.returncode == 1 and f"job {job} is failed, not awaiting approval" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
async def test_a_merge_approval_holds_the_finished_job_until_approved(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "--agent", "team", "--approve", "merge")
    rejected_job = submit(daemon, repo, "--agent", "team", "--approve", "merge")
    async with daemon.client() as client:
        for waiting in (job, rejected_job):
            view = await client.wait_for(waiting, lambda v: v["status"] == "awaiting_approval", timeout=60)
            assert view["approval"] == "merge" and {t["status"] for t in view["tasks"]} == {"completed"}
            assert not of_type(await client.events(waiting), "JobCompleted")
        daemon.ctl("approve", job, check=True)
        await client.wait_for(job, lambda v: v["status"] == "completed")
        daemon.ctl("reject", rejected_job, "--reason", "later", check=True)
        view = await client.wait_for(rejected_job, lambda v: v["status"] == "failed")
    integration = f"numerus/{rejected_job}.integration"
    assert view["reason"].endswith(f": later; its work stays on {integration}")
    assert git(repo, "show", f"{integration}:A.md") == "a\n"  # kept for a look


@pytest.mark.slow
async def test_a_users_plan_runs_without_asking_the_planner(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))
    job = submit(daemon, repo, "--agent", "noplanner", "--plan", str(plan_file), "--approve", "plan")
    async with daemon.client() as client:
        await client.wait_for(job, lambda v: v["status"] == "awaiting_approval")
        daemon.ctl("approve", job, check=True)
        await client.wait_for(job, lambda v: v["status"] == "completed", timeout=60)
        events = await client.events(job)
    assert not of_type(events, "PlanRequested")
    (validated,) = of_type(events, "PlanValidated")
    assert validated["data"]["attempt"] == 0 and validated["data"]["plan"]["summary"] == "two notes"


@pytest.mark.slow
async def test_a_failing_task_escalates_then_waits_and_approving_it_gives_one_more_attempt(
    daemon: Daemon, tmp_path: Path
):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "--agent", "weak")
    async with daemon.client() as client:
        view = await client.wait_for(job, lambda v: v["awaiting_tasks"] == ["a"], timeout=60)
        assert view["status"] == "running" and view["tasks"][0]["agent"] == "strong"
        assert "task a: 'numerusctl approve" in daemon.ctl("status", job, check=True).stdout
        approved = daemon.ctl("approve", job, "a", check=True).stdout
        assert approved.strip() == f"job {job}: task a approved for one more attempt"
        await client.wait_for(job, lambda v: v["status"] == "completed", timeout=60)
        events = await client.events(job)
    (escalated,) = of_type(events, "TaskEscalated")
    assert escalated["data"] == {"agent": "strong", "previous": "weak"}
    assert [e["data"]["agent"] for e in of_type(events, "TaskStarted")] == ["weak", "strong", "strong"]
    (approval,) = of_type(events, "TaskApproved")
    assert approval["task"] == "a" and approval["data"]["by"].endswith("(operator)")


# --- the hostile side --------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_viewer_cannot_approve_or_reject(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "--agent", "team", "--approve", "plan")
    async with daemon.client() as client:
        await client.wait_for(job, lambda v: v["status"] == "awaiting_approval")
        for verb in ("approve", "reject"):
            refused = daemon.ctl("--role", "viewer", verb, job)
            assert refused.returncode != 0, refused.stdout
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        view = await client.status(job)
        assert view["status"] == "awaiting_approval"
        assert not of_type(await client.events(job), "JobApproved") + of_type(await client.events(job), "JobRejected")
        daemon.ctl("kill", job, check=True)
        await client.wait_for(job, lambda v: v["status"] == "killed")


HOSTILE_PATHS = ("../outside.md", "/etc/passwd", ".git/hooks/pre-commit")


@pytest.mark.slow
@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_a_users_plan_with_a_hostile_path_is_refused_and_nothing_is_recorded(daemon: Daemon, tmp_path: Path, path: str):
    repo = git_repo(tmp_path / "repo")
    plan_file = tmp_path / "plan.json"
    task_ = {"id": "x", "title": "X", "instructions": "x", "intents": [{"path": path, "mode": "create"}]}
    plan_file.write_text(json.dumps({"summary": "s", "tasks": [task_, {"id": "x", "title": "", "instructions": "y"}]}))
    result = daemon.ctl("run", "g", "--repo", str(repo), "--agent", "team", "--plan", str(plan_file))
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("numerusctl: the plan is not valid (3 errors), nothing was recorded: $.tasks[0]")
    assert "$.tasks[1].id" in line and "$.tasks[1].title" in line
    assert daemon.ctl_json("status")["jobs"] == []
    assert daemon.alive


@pytest.mark.slow
def test_a_huge_plan_file_is_refused_by_the_request_cap(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    plan_file = tmp_path / "plan.json"
    tasks = [{"id": f"t{i}", "title": "T" * 100, "instructions": "x" * 3000} for i in range(500)]
    plan_file.write_text(json.dumps({"summary": "huge", "tasks": tasks}))
    assert plan_file.stat().st_size > 1024 * 1024
    result = daemon.ctl("run", "g", "--repo", str(repo), "--agent", "team", "--plan", str(plan_file))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "max_request_bytes" in line
    assert daemon.ctl_json("status")["jobs"] == [] and daemon.alive
