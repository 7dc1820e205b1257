"""The pure decisions of a planned job: plans, GO / NO GO and waking, retries, replans, the job's end."""

from __future__ import annotations

from numerusd import domain
from numerusd.locks import claim_locks
from numerusd.protocol.claims import Claim, ClaimedPath
from numerusd.protocol.events import (
    ClaimDenied,
    ClaimGranted,
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
    Usage,
)
from numerusd.protocol.plan import Plan, PlannedTask
from tests.test_domain import apply

ROLES = dict.fromkeys(("planner", "queen", "executor", "reviewer"), "scripted")


def planned(*tasks: PlannedTask, max_replans: int = 0, max_attempts: int = 3) -> domain.JobState:
    job = apply(
        None,
        "J",
        domain.decide_submit(
            "goal", "/repo", ROLES, parallel=2, checks=(), review=True, max_attempts=max_attempts,
            backoff_s=(1.0, 2.0, 4.0), max_replans=max_replans,
        ),
    )  # fmt: skip
    assert job.status == "planning"
    plan = Plan(summary="s", tasks=tasks)
    return apply(job, "J", domain.decide_plan_validated(job, 1, plan, "h" * 64, Usage(input_tokens=5)))


def task(task_id: str, *deps: str) -> PlannedTask:
    return PlannedTask(id=task_id, title=task_id, instructions=task_id, deps=deps)


def locks_for(path: str, mode: str = "modify") -> tuple:
    wanted = claim_locks(Claim(paths=(ClaimedPath(path, "file", mode),), commands=()))
    assert isinstance(wanted, tuple)
    return wanted


def start(job: domain.JobState, task_id: str) -> domain.JobState:
    return apply(job, "J", domain.decide_start(job, job.tasks[task_id], ["a"], "w", "l"))


def test_a_valid_plan_creates_its_tasks_and_the_job_runs():
    job = planned(task("t1"), task("t2", "t1"))
    assert job.status == "running" and job.plan_version == 1 and job.input_tokens == 5
    assert [(t.id, t.deps, t.status) for t in job.tasks.values()] == [("t1", (), "pending"), ("t2", ("t1",), "pending")]


def test_the_last_rejected_plan_fails_the_job_with_its_reasons():
    job = apply(None, "J", domain.decide_submit("g", "/r", ROLES, parallel=1, checks=(), review=True,
                                                max_attempts=3, backoff_s=(1.0,)))  # fmt: skip
    job = apply(job, "J", domain.decide_plan_rejected(job, 1, ["$.tasks: missing"], "{", Usage(), 2))
    assert job.status == "planning" and job.plan_errors == ("$.tasks: missing",)
    job = apply(job, "J", domain.decide_plan_rejected(job, 2, ["$.tasks: missing"], "{", Usage(), 2))
    assert job.status == "failed" and job.reason == "no valid plan after 2 attempts: $.tasks: missing"


def test_no_go_names_the_holder_and_the_release_wakes_the_waiter_in_the_same_breath():
    job = planned(task("a"), task("b"))
    job = apply(job, "J", domain.decide_claim(job, "a", locks_for("F.md")))
    assert job.tasks["a"].status == "granted" and "a" in job.lock_holds
    decision = domain.decide_claim(job, "b", locks_for("F.md"))
    assert [type(event) for _, event in decision] == [ClaimDenied]
    job = apply(job, "J", decision)
    assert job.tasks["b"].status == "waiting" and job.tasks["b"].holders == ("a",)
    merged = domain.decide_merged(job, "a", "c" * 40, created=True)
    # a's merge gives F.md back and grants it to b in the same decision.
    assert [(task, type(event)) for task, event in merged[:3]] == [
        ("a", TaskMerged), ("a", LocksReleased), ("b", ClaimGranted)
    ]  # fmt: skip
    assert merged[2][1] == ClaimGranted(locks=locks_for("F.md"))
    job = apply(job, "J", merged)
    assert job.tasks["b"].status == "granted" and job.tasks["b"].holders == ()


def test_a_failed_attempt_is_retried_after_1_2_then_4_seconds_then_fails_and_skips_its_dependents():
    job = planned(task("t1"), task("t2", "t1"), max_attempts=3)
    job = apply(job, "J", domain.decide_claim(job, "t1", locks_for("a.py")))
    delays = []
    for _ in range(2):
        job = start(job, "t1")
        decision = domain.decide_attempt_failed(job, "t1", ("check failed",))
        (retry,) = [event for _, event in decision]
        assert isinstance(retry, TaskRetryScheduled) and retry.reasons == ("check failed",)
        delays.append(retry.delay_s)
        job = apply(job, "J", decision)
        assert job.tasks["t1"].status == "retrying" and job.tasks["t1"].feedback == ("check failed",)
    assert delays == [1.0, 2.0]
    job = start(job, "t1")
    job = apply(job, "J", domain.decide_attempt_failed(job, "t1", ("check failed",)))
    assert job.tasks["t1"].status == "failed" and "after 3 attempts: check failed" in (job.tasks["t1"].reason or "")
    assert job.tasks["t2"].status == "skipped"
    assert job.lock_holds == {} and job.status == "failed"


def test_with_a_replan_left_a_task_failing_for_good_asks_the_queen_and_its_dependents_wait():
    job = planned(task("t1"), task("t2", "t1"), max_replans=1, max_attempts=1)
    job = start(job, "t1")
    decision = domain.decide_attempt_failed(job, "t1", ("boom",))
    assert [type(event) for _, event in decision] == [TaskFailed, ReplanRequested]
    job = apply(job, "J", decision)
    assert job.status == "replanning" and job.tasks["t2"].status == "pending" and job.replan_for is not None

    # The queen may not bring t1 back under its id; a plan replacing it with t1b is accepted.
    reused = Plan(summary="s", tasks=(task("t1"), task("t2", "t1")))
    assert domain.replan_errors(job, reused) == [
        "task t1 already failed: give the task that replaces it a new id, e.g. t1b"
    ]
    revised = Plan(summary="s", tasks=(task("t1b"), task("t2", "t1b")))
    assert domain.replan_errors(job, revised) == []
    job = apply(job, "J", domain.decide_plan_validated(job, 1, revised, "g" * 64, Usage()))
    assert job.status == "running" and job.plan_version == 2
    assert job.tasks["t2"].deps == ("t1b",) and job.tasks["t1b"].status == "pending"

    # The failed t1 is not part of the current plan: once t1b and t2 complete, the job has completed.
    for task_id in ("t1b", "t2"):
        job = apply(job, "J", domain.decide_merged(job, task_id, "c" * 40, created=True))
    assert job.status == "completed"


def test_a_revised_plan_drops_the_pending_tasks_it_leaves_out_and_keeps_those_under_way():
    job = planned(task("t1"), task("t2"), task("t3"), max_replans=1)
    job = start(job, "t1")
    job = apply(job, "J", domain.decide_stalled(job, 60))
    assert job.status == "replanning" and job.replan_for == ("", "no task completed for 60 s")
    revised = Plan(summary="s", tasks=(task("t1"), task("t4")))
    job = apply(job, "J", domain.decide_plan_validated(job, 1, revised, "g" * 64, Usage()))
    statuses = {t.id: t.status for t in job.tasks.values()}
    assert statuses == {"t1": "running", "t2": "skipped", "t3": "skipped", "t4": "pending"}
    assert job.tasks["t2"].reason == "dropped by plan v2"
    assert domain.decide_stalled(job, 60) == []  # no replan left


def test_kill_ends_waiting_and_pending_tasks_at_once_and_the_job_when_nothing_runs():
    job = planned(task("a"), task("b"), task("c"))
    job = apply(job, "J", domain.decide_claim(job, "a", locks_for("F.md")))
    job = apply(job, "J", domain.decide_claim(job, "b", locks_for("F.md")))
    decision = domain.decide_kill(job)
    events = [(task_id, type(event)) for task_id, event in decision]
    assert ("b", LocksReleased) in events and ("b", TaskKilled) in events and ("c", TaskKilled) in events
    assert (None, JobKilled) not in events  # a holds its GO: its flow ends it
    job = apply(job, "J", decision)
    job = apply(job, "J", domain.decide_task_killed(job, "a"))
    assert job.status == "killed" and job.lock_holds == {} and job.lock_queue == {}


def test_the_job_ends_when_its_tasks_have_and_settled_adds_nothing_after():
    job = planned(task("t1"))
    decision = domain.decide_merged(job, "t1", "c" * 40, created=False)
    assert isinstance(decision[-1][1], JobCompleted)
    job = apply(job, "J", decision)
    assert job.integration_tip == "c" * 40
    assert domain.decide_settled(job) == []


def test_an_internal_error_fails_every_unfinished_task_and_the_job():
    job = start(planned(task("t1"), task("t2")), "t1")
    decision = domain.decide_job_failed(job, "internal error")
    assert [(t, type(e)) for t, e in decision] == [("t1", TaskFailed), ("t2", TaskFailed), (None, JobFailed)]


def test_decide_start_counts_attempts():
    job = start(start(planned(task("t1")), "t1"), "t1")
    assert job.tasks["t1"].attempt == 2
    assert isinstance(domain.decide_start(job, job.tasks["t1"], [], "w", "l")[0][1], TaskStarted)
