"""The pure decisions of a planned job: plans, GO / NO GO and waking, retries, replans, the job's end."""

from __future__ import annotations

import msgspec
import pytest

from numerusd import domain
from numerusd.domain.observations import (
    AgentExited,
    AgentReported,
    AgentStarting,
    AttemptFailed,
    ClaimAnswered,
    GateDone,
    Interrupted,
    Kill,
    MergeBegun,
    Merged,
    PipelineFailed,
    PlanAnswered,
    Retry,
    Settled,
    Stalled,
    StoppedForKill,
    SubmitJob,
    WorkCommitted,
)
from numerusd.errors import InvalidTransition
from numerusd.locks import claim_locks
from numerusd.protocol.claims import Claim, ClaimedPath
from numerusd.protocol.events import (
    AgentThreadStarted,
    BudgetExceeded,
    ClaimDenied,
    ClaimGranted,
    ClaimProposed,
    JobCompleted,
    JobFailed,
    JobKilled,
    LocksReleased,
    ReplanRequested,
    TaskFailed,
    TaskKilled,
    TaskMerged,
    TaskRetryScheduled,
    TaskStarted,
    TokensUsed,
    Usage,
)
from numerusd.protocol.plan import Plan, PlannedTask
from tests.test_domain import apply, decide

ROLES = dict.fromkeys(("planner", "queen", "executor", "reviewer"), "scripted")


def submitted(max_replans: int = 0, max_attempts: int = 3) -> domain.JobState:
    submit = SubmitJob(
        goal="goal", repo="/repo", roles=ROLES, parallel=2, max_attempts=max_attempts, max_replans=max_replans
    )
    job = decide(None, submit)
    assert job.status == "planning"
    return job


def answer(job: domain.JobState, plan: Plan, role: str = "planner") -> domain.JobState:
    return decide(job, PlanAnswered(role=role, attempt=1, plan=plan, plan_hash="h" * 64, usage=Usage(input_tokens=5)))


def planned(*tasks: PlannedTask, max_replans: int = 0, max_attempts: int = 3) -> domain.JobState:
    return answer(submitted(max_replans, max_attempts), Plan(summary="s", tasks=tasks))


def task(task_id: str, *deps: str) -> PlannedTask:
    return PlannedTask(id=task_id, title=task_id, instructions=task_id, deps=deps)


def locks_for(path: str, mode: str = "modify") -> tuple:
    wanted = claim_locks(Claim(paths=(ClaimedPath(path, "file", mode),), commands=()))
    assert isinstance(wanted, tuple)
    return wanted


def claimed(task_id: str, path: str) -> ClaimAnswered:
    paths = (ClaimedPath(path, "file", "modify"),)
    return ClaimAnswered(task=task_id, attempt=1, paths=paths, locks=locks_for(path), max_attempts=2)


def start(job: domain.JobState, task_id: str) -> domain.JobState:
    return decide(job, AgentStarting(task=task_id, argv=("a",), workdir="w", log_path="l"))


def to_merge(job: domain.JobState, task_id: str) -> domain.JobState:
    """The task's agent ran and exited, its work was committed and passed the gate: it is merging."""
    if job.tasks[task_id].status == "pending":
        job = decide(job, claimed(task_id, f"{task_id}.txt"))
    job = start(job, task_id)
    exited = AgentExited(
        task=task_id, exit_code=0, signal=None, log_path="l", log_sha256="h", log_bytes=1, duration_s=1
    )
    job = decide(job, exited)
    job = decide(job, WorkCommitted(task=task_id, commit="c" * 40))
    job = decide(job, GateDone(task=task_id))
    assert job.tasks[task_id].status == "merging"
    return job


def test_a_valid_plan_creates_its_tasks_and_the_job_runs():
    job = planned(task("t1"), task("t2", "t1"))
    assert job.status == "running" and job.plan_version == 1 and job.input_tokens == 5
    assert [(t.id, t.deps, t.status) for t in job.tasks.values()] == [("t1", (), "pending"), ("t2", ("t1",), "pending")]


def test_the_last_rejected_plan_fails_the_job_with_its_reasons():
    job = submitted()
    rejected = PlanAnswered(role="planner", attempt=1, errors=("$.tasks: missing",), answer="{", max_attempts=2)
    job = decide(job, rejected)
    assert job.status == "planning" and job.plan_errors == ("$.tasks: missing",)
    job = decide(job, msgspec.structs.replace(rejected, attempt=2))
    assert job.status == "failed" and job.reason == "no valid plan after 2 attempts: $.tasks: missing"


def test_no_go_names_the_holder_and_the_release_wakes_the_waiter_in_the_same_breath():
    job = planned(task("a"), task("b"))
    job = decide(job, claimed("a", "F.md"))
    assert job.tasks["a"].status == "granted" and "a" in job.lock_holds
    assert job.tasks["a"].claimed_locks == locks_for("F.md")  # the fact the arbitration used, recorded
    decision = domain.decide(job, claimed("b", "F.md"))
    assert [type(event) for _, event in decision] == [ClaimProposed, ClaimDenied]
    job = apply(job, "J", decision)
    assert job.tasks["b"].status == "waiting" and job.tasks["b"].holders == ("a",)
    merged = domain.decide(to_merge(job, "a"), Merged(task="a", sha="c" * 40, created=True))
    # a's merge gives F.md back and grants it to b in the same decision.
    assert [(task, type(event)) for task, event in merged[:3]] == [
        ("a", TaskMerged), ("a", LocksReleased), ("b", ClaimGranted)
    ]  # fmt: skip
    assert merged[2][1] == ClaimGranted(locks=locks_for("F.md"))
    job = apply(to_merge(job, "a"), "J", merged)
    assert job.tasks["b"].status == "granted" and job.tasks["b"].holders == ()


def test_a_failed_attempt_is_retried_after_1_2_then_4_seconds_then_fails_and_skips_its_dependents():
    job = planned(task("t1"), task("t2", "t1"), max_attempts=3)
    job = decide(job, claimed("t1", "a.py"))
    delays = []
    for _ in range(2):
        job = start(job, "t1")
        decision = domain.decide(job, AttemptFailed(task="t1", reasons=("check failed",)))
        (retry,) = [event for _, event in decision]
        assert isinstance(retry, TaskRetryScheduled) and retry.reasons == ("check failed",)
        delays.append(retry.delay_s)
        job = apply(job, "J", decision)
        assert job.tasks["t1"].status == "retrying" and job.tasks["t1"].feedback == ("check failed",)
    assert delays == [1.0, 2.0]
    job = start(job, "t1")
    job = decide(job, AttemptFailed(task="t1", reasons=("check failed",)))
    assert job.tasks["t1"].status == "failed" and "after 3 attempts: check failed" in (job.tasks["t1"].reason or "")
    assert job.tasks["t2"].status == "skipped"
    assert job.lock_holds == {} and job.status == "failed"


def test_with_a_replan_left_a_task_failing_for_good_asks_the_queen_and_its_dependents_wait():
    job = planned(task("t1"), task("t2", "t1"), max_replans=1, max_attempts=1)
    job = start(decide(job, claimed("t1", "a.py")), "t1")
    decision = domain.decide(job, AttemptFailed(task="t1", reasons=("boom",)))
    assert [type(event) for _, event in decision] == [LocksReleased, TaskFailed, ReplanRequested]
    job = apply(job, "J", decision)
    assert job.status == "replanning" and job.tasks["t2"].status == "pending" and job.replan_for is not None

    # The queen may not bring t1 back under its id; a plan replacing it with t1b is accepted.
    reused = Plan(summary="s", tasks=(task("t1"), task("t2", "t1")))
    assert domain.replan_errors(job, reused) == [
        "task t1 already failed: give the task that replaces it a new id, e.g. t1b"
    ]
    refused = domain.decide(job, PlanAnswered(role="queen", attempt=1, plan=reused, plan_hash="g" * 64, max_attempts=2))
    assert refused[0][1].errors == ("task t1 already failed: give the task that replaces it a new id, e.g. t1b",)
    revised = Plan(summary="s", tasks=(task("t1b"), task("t2", "t1b")))
    assert domain.replan_errors(job, revised) == []
    job = answer(job, revised, role="queen")
    assert job.status == "running" and job.plan_version == 2
    assert job.tasks["t2"].deps == ("t1b",) and job.tasks["t1b"].status == "pending"

    # The failed t1 is not part of the current plan: once t1b and t2 complete, the job has completed.
    for task_id in ("t1b", "t2"):
        job = decide(to_merge(job, task_id), Merged(task=task_id, sha="c" * 40, created=True))
    assert job.status == "completed"


def test_a_revised_plan_drops_the_pending_tasks_it_leaves_out_and_keeps_those_under_way():
    job = planned(task("t1"), task("t2"), task("t3"), max_replans=1)
    job = start(decide(job, claimed("t1", "a.py")), "t1")
    job = decide(job, Stalled(idle_s=60))
    assert job.status == "replanning" and job.replan_for == ("", "no task completed for 60 s")
    revised = Plan(summary="s", tasks=(task("t1"), task("t4")))
    job = answer(job, revised, role="queen")
    statuses = {t.id: t.status for t in job.tasks.values()}
    assert statuses == {"t1": "running", "t2": "skipped", "t3": "skipped", "t4": "pending"}
    assert job.tasks["t2"].reason == "dropped by plan v2"
    assert domain.decide(job, Stalled(idle_s=60)) == []  # no replan left


def test_kill_ends_waiting_and_pending_tasks_at_once_and_the_job_when_nothing_runs():
    job = planned(task("a"), task("b"), task("c"))
    job = decide(job, claimed("a", "F.md"))
    job = decide(job, claimed("b", "F.md"))
    decision = domain.decide(job, Kill())
    events = [(task_id, type(event)) for task_id, event in decision]
    assert ("b", LocksReleased) in events and ("b", TaskKilled) in events and ("c", TaskKilled) in events
    assert (None, JobKilled) not in events  # a holds its GO: its flow ends it
    job = apply(job, "J", decision)
    job = decide(job, StoppedForKill(task="a"))
    assert job.status == "killed" and job.lock_holds == {} and job.lock_queue == {}


def test_the_job_ends_when_its_tasks_have_and_settled_adds_nothing_after():
    job = to_merge(planned(task("t1")), "t1")
    decision = domain.decide(job, Merged(task="t1", sha="c" * 40, created=False))
    assert isinstance(decision[-1][1], JobCompleted)
    job = apply(job, "J", decision)
    assert job.integration_tip == "c" * 40
    assert domain.decide(job, Settled()) == []


def test_an_internal_error_fails_every_unfinished_task_and_the_job():
    job = start(decide(planned(task("t1"), task("t2")), claimed("t1", "a.py")), "t1")
    decision = domain.decide(job, PipelineFailed(reason="internal error"))
    assert [(t, type(e)) for t, e in decision] == [("t1", TaskFailed), ("t2", TaskFailed), (None, JobFailed)]


def test_each_start_is_recorded_with_the_attempt_it_begins():
    job = start(decide(planned(task("t1")), claimed("t1", "a.py")), "t1")
    job = decide(job, AttemptFailed(task="t1", reasons=("boom",)))
    (started,) = domain.decide(job, AgentStarting(task="t1", argv=(), workdir="w", log_path="l"))
    assert isinstance(started[1], TaskStarted) and started[1].attempt == 2
    assert start(job, "t1").tasks["t1"].attempt == 2


def test_attempts_that_fail_before_their_agent_starts_count_too():
    """A worktree that cannot be made fails the attempt: after max_attempts the task fails, not retried for ever
    (it was a defect: 17 retries in 8 s, each `next_attempt: 1`)."""
    job = decide(planned(task("t1"), task("t2", "t1"), max_attempts=2), claimed("t1", "a.py"))
    failed = AttemptFailed(task="t1", reasons=("git failed: branch does not contain the base",), fresh_worktree=True)
    (retry,) = [event for _, event in domain.decide(job, failed)]
    assert isinstance(retry, TaskRetryScheduled) and retry.next_attempt == 2 and retry.fresh_worktree
    job = decide(job, failed)
    assert job.tasks["t1"].fresh_worktree and job.tasks["t1"].failed_attempts == 1
    job = decide(job, failed)
    assert job.tasks["t1"].status == "failed" and "after 2 attempts: git failed" in (job.tasks["t1"].reason or "")
    assert job.tasks["t2"].status == "skipped" and job.status == "failed"


def test_a_merge_is_refused_to_a_task_that_did_not_pass_its_gate():
    job = start(decide(planned(task("t1")), claimed("t1", "a.py")), "t1")
    with pytest.raises(InvalidTransition, match="which is running"):
        domain.decide(job, Merged(task="t1", sha="c" * 40, created=True))
    with pytest.raises(InvalidTransition, match="neither it nor job J is killed"):
        domain.decide(job, StoppedForKill(task="t1"))


def test_an_agent_stopped_after_its_job_failed_still_has_its_exit_recorded():
    job = start(decide(planned(task("t1")), claimed("t1", "a.py")), "t1")
    job = decide(job, PipelineFailed(reason="the integration branch moved"))
    assert job.tasks["t1"].status == "failed"
    exited = AgentExited(task="t1", exit_code=None, signal=15, log_path="l", log_sha256="h", log_bytes=1, duration_s=1)
    assert [type(event).__name__ for _, event in domain.decide(job, exited)] == ["TaskExited"]
    with pytest.raises(InvalidTransition, match="which is pending"):
        domain.decide(planned(task("t1")), exited)  # an agent that never started cannot exit


def test_a_task_killed_while_its_gate_runs_is_killed_when_the_gate_ends_and_nothing_of_it_merges():
    job = start(decide(planned(task("t1"), task("t2", "t1")), claimed("t1", "a.py")), "t1")
    exited = AgentExited(task="t1", exit_code=0, signal=None, log_path="l", log_sha256="h", log_bytes=1, duration_s=1)
    job = decide(decide(job, exited), WorkCommitted(task="t1", commit="c" * 40))
    assert job.tasks["t1"].status == "checking"
    job = decide(job, Kill(by="alice (operator)", task="t1"))
    assert job.tasks["t1"].status == "checking"  # the gate's check runs to its end
    job = decide(job, GateDone(task="t1"))  # it passed: still, the user killed the task
    assert job.tasks["t1"].status == "killed" and job.tasks["t1"].reason == "killed by alice (operator)"
    assert job.tasks["t2"].status == "skipped" and job.lock_holds == {}
    with pytest.raises(InvalidTransition):
        domain.decide(job, MergeBegun(task="t1", integration="numerus/J", parent="p" * 40, task_sha="c" * 40))


def test_killing_an_interrupted_job_gives_its_locks_back_so_a_retry_can_claim_again():
    job = start(decide(planned(task("t1")), claimed("t1", "a.py")), "t1")
    job = decide(job, Interrupted(reason="numerusd stopped", next="it waits for 'numerusctl resume'"))
    assert job.status == "interrupted" and job.lock_holds
    job = decide(job, Kill(by="alice (operator)"))
    assert job.status == "killed" and job.lock_holds == {} and job.lock_queue == {}
    job = decide(job, Retry(by="alice (operator)"))
    granted = domain.decide(job, claimed("t1", "a.py"))
    assert [type(event) for _, event in granted] == [ClaimProposed, ClaimGranted]


def test_a_token_cap_crossed_by_a_planners_tokens_is_caught_at_the_next_agent_report():
    submit = SubmitJob(goal="goal", repo="/repo", roles=ROLES, max_tokens=100, on_budget="stop")
    job = decide(None, submit)
    plan = Plan(summary="s", tasks=(task("t1"),))
    job = decide(
        job, PlanAnswered(role="planner", attempt=1, plan=plan, plan_hash="h" * 64, usage=Usage(input_tokens=500))
    )
    assert job.tokens() == 500 and job.status == "running"  # counted, not checked, as the plan was answered
    job = start(decide(job, claimed("t1", "a.py")), "t1")
    used = TokensUsed(input_tokens=5, cached_input_tokens=0, output_tokens=1)
    decision = domain.decide(job, AgentReported(task="t1", events=(used,)))
    (exceeded,) = [event for _, event in decision if isinstance(event, BudgetExceeded)]
    assert (exceeded.scope, exceeded.used, exceeded.cap) == ("job", 506, 100)


def test_the_thread_an_attempt_resumes_is_the_first_its_agent_announced():
    """A later `thread.started` (an agent naming another job's session in a shared CODEX_HOME) is not taken."""
    job = start(decide(planned(task("t1")), claimed("t1", "a.py")), "t1")
    first, other = "019a2b3c-0000-7000-8000-000000000001", "019a2b3c-0000-7000-8000-0000000000ff"
    reported = (AgentThreadStarted(thread_id=first), AgentThreadStarted(thread_id=other))
    job = decide(job, AgentReported(task="t1", events=reported))
    assert job.tasks["t1"].thread_id == first
