"""Budgets: token caps per job and per task, counted from what agents report (TokensUsed), a cost from a price
table, and what crossing a cap does (BudgetExceeded, then a pause for `approve --add-tokens N`, or a stop). The
domain's decisions first, then end to end through numerusctl with the scripted agent reporting usage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import nats
import pytest

from numerusd import domain
from numerusd.agents.base import AgentProfile
from numerusd.config import Price, Settings
from numerusd.domain.observations import AgentReported, Approve, AttemptFailed, Reject, SubmitJob
from numerusd.errors import BadRequest
from numerusd.handlers.status import priced
from numerusd.protocol.events import ApprovalRequested, BudgetExceeded, JobApproved, TokensUsed
from numerusd.protocol.plan import Plan
from tests.daemon_harness import Daemon, git, git_repo
from tests.test_domain import decide
from tests.test_domain_pipeline import ROLES, answer, claimed, start, task

ALICE = "alice (operator)"


def planned(*, max_tokens: int | None = None, task_max_tokens: int | None = None, on_budget: str = "pause"):
    submit = SubmitJob(
        goal="g",
        repo="/r",
        roles=ROLES,
        max_tokens=max_tokens,
        task_max_tokens=task_max_tokens,
        on_budget=on_budget,
    )
    job = answer(decide(None, submit), Plan(summary="s", tasks=(task("t1"), task("t2", "t1"))))
    return start(decide(job, claimed("t1", "F.md")), "t1")


def used(input_tokens: int, output_tokens: int = 0, cached: int = 0) -> AgentReported:
    tokens = TokensUsed(input_tokens=input_tokens, cached_input_tokens=cached, output_tokens=output_tokens)
    return AgentReported(task="t1", events=(tokens,))


def test_a_task_crossing_its_cap_records_it_once_and_pauses_the_job_for_approval():
    job = decide(planned(task_max_tokens=100), used(60, 10))
    assert job.status == "running" and job.tokens_of("task:t1") == 70
    decision = domain.decide(job, used(40))
    assert [data for _, data in decision[1:]] == [
        BudgetExceeded(scope="task", task="t1", used=110, cap=100, action="pause"),
        ApprovalRequested(gate="budget", reason="task t1 used 110 tokens of its 100"),
    ]
    job = decide(job, used(40))
    assert job.status == "awaiting_approval" and job.approval == "budget" and job.over_budget == ("task:t1",)
    assert not any(isinstance(data, BudgetExceeded) for _, data in domain.decide(job, used(500)))  # once
    job = decide(job, used(500))
    assert job.tokens_of("task:t1") == 610


def test_approving_a_budget_needs_enough_added_tokens_and_raises_the_cap():
    job = decide(decide(planned(task_max_tokens=100), used(150)), used(0, 0))
    with pytest.raises(BadRequest, match="approve with --add-tokens N"):
        domain.decide(job, Approve(by=ALICE))
    with pytest.raises(BadRequest, match=r"task t1 has used 150 tokens: --add-tokens 50 leaves its cap \(150\)"):
        domain.decide(job, Approve(by=ALICE, add_tokens=50))
    decision = domain.decide(job, Approve(by=ALICE, add_tokens=1000))
    assert decision == [(None, JobApproved(gate="budget", by=ALICE, added_tokens=1000, scopes=("task:t1",)))]
    job = decide(job, Approve(by=ALICE, add_tokens=1000))
    assert job.status == "running" and job.token_cap("task:t1") == 1100 and job.over_budget == ()
    # The new cap is crossed again: recorded again.
    assert any(isinstance(data, BudgetExceeded) for _, data in domain.decide(job, used(1000)))


def test_with_stop_the_job_is_stopped_as_a_kill_and_fails_with_the_reason():
    job = planned(max_tokens=50, on_budget="stop")
    job = decide(job, used(55, 5))
    assert job.kill_requested and job.status == "running"  # its running agent is stopped first
    assert job.tasks["t2"].status == "killed"
    job = decide(job, AttemptFailed(task="t1", reasons=("the agent ended with signal 15",)))
    assert (
        job.status == "failed" and job.reason == "token budget exceeded: the job used 65 tokens of its 50"
    )  # the planner's 5 too
    assert job.tasks["t1"].status == "killed"


def test_rejecting_a_budget_stops_the_job_and_it_fails():
    job = decide(planned(max_tokens=10), used(20))
    assert job.status == "awaiting_approval"
    job = decide(job, Reject(by=ALICE, reason="too dear"))
    assert job.kill_requested and job.status == "running"
    job = decide(job, AttemptFailed(task="t1", reasons=("killed",)))
    assert job.status == "failed" and job.reason == "the token budget was rejected by alice (operator): too dear"


def test_a_cap_crossed_while_the_queen_revises_the_plan_pauses_the_job_once_she_has_answered():
    job = msgspec.structs.replace(planned(task_max_tokens=100), status="replanning")
    decision = domain.decide(job, used(200))
    assert [type(data).__name__ for _, data in decision] == ["TokensUsed", "BudgetExceeded"]
    job = decide(job, used(200))
    assert job.status == "replanning"  # her answer must still find the job replanning
    job = answer(job, Plan(summary="s2", tasks=(task("t1"), task("t3"))), role="queen")
    assert job.status == "awaiting_approval" and job.approval == "budget"
    assert job.approval_reason == "task t1 went over budget while the plan was revised"


def test_without_caps_tokens_only_count():
    job = decide(planned(), used(10**9))
    assert job.status == "running" and job.tokens() == 10**9 + 5  # the planner's 5 too


def test_the_cost_is_the_tokens_at_each_models_price():
    job = decide(planned(), used(3_000_000, 500_000, cached=1_000_000))
    settings = Settings(
        agents={"scripted": AgentProfile(kind="scripted", model="m1")},
        prices={"m1": Price(input=2.0, cached_input=0.5, output=10.0)},
    )
    view = priced(domain.job_view(job), job, settings)
    # t1: 2M uncached at 2 + 1M cached at 0.5 + 0.5M output at 10; the planner's 5 input tokens at 2.
    assert view.tasks[0].cost == pytest.approx(4 + 0.5 + 5)
    assert view.cost == pytest.approx(9.5 + 5 * 2 / 1e6)
    unpriced = Settings(prices={"other": Price(input=1, output=1)})
    assert priced(domain.job_view(job), job, unpriced).cost is None


# --- end to end --------------------------------------------------------------------------------------------------

PLAN = {
    "summary": "two notes",
    "tasks": [
        {"id": "a", "title": "A", "instructions": "a", "intents": [{"path": "A.md", "mode": "create"}]},
        {"id": "b", "title": "B", "instructions": "b", "deps": ["a"], "intents": [{"path": "B.md", "mode": "create"}]},
    ],
}


def spender(then: list[dict]) -> dict:
    """Task a reports 5,100 tokens (5,000 in, 100 out), then does `then`; task b writes its note."""
    usage = {"usage": {"input_tokens": 5000, "cached_input_tokens": 0, "output_tokens": 100}}
    return {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": PLAN}]},
            {"match": {"role": "executor", "task": "a"}, "steps": [usage, *then]},
            {"match": {"role": "executor", "task": "b"}, "steps": [{"write": "B.md", "content": "b\n"}]},
        ]
    }


CONFIG = """
claims = "plan"
review = false
max_attempts = 1
max_replans = 0
"""


def budget_daemon(tmp_path: Path, on_budget: str, then: list[dict]) -> Daemon:
    config = CONFIG + f'on_budget = "{on_budget}"\n[prices.m1]\ninput = 2.0\noutput = 10.0\n'
    agents = {"spender": spender(then)}
    return Daemon(tmp_path / "state", agents=agents, profiles={"spender": 'model = "m1"'}, config=config).start()


def of_type(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event["type"] == name]


@pytest.mark.slow
async def test_a_job_over_its_cap_pauses_and_approve_add_tokens_lets_it_finish(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    with budget_daemon(tmp_path, "pause", [{"write": "A.md", "content": "a\n"}]) as daemon:
        run = daemon.ctl("run", "notes", "--repo", str(repo), "--agent", "spender", "--max-tokens", "1000", check=True)
        job = run.stdout.strip()
        async with daemon.client() as client:
            view = await client.wait_for(
                job, lambda v: v["status"] == "awaiting_approval" and v["tasks"][0]["status"] == "completed"
            )
            assert view["approval"] == "budget" and view["tokens"] == 5100 and view["max_tokens"] == 1000
            assert view["cost"] == pytest.approx((5000 * 2 + 100 * 10) / 1e6)
            shown = daemon.ctl("status", job, check=True).stdout
            assert "approval of more tokens" in shown and "5.1k of 1.0k tokens; cost $0.0110" in shown
            assert view["tasks"][1]["status"] != "running"  # no new agent while the job waits
            assert not of_type(await client.events(job), "TaskStarted")[1:]

            bare = daemon.ctl("approve", job)
            assert bare.returncode == 1 and "approve with --add-tokens N" in bare.stderr
            few = daemon.ctl("approve", job, "--add-tokens", "100")
            assert few.returncode == 1 and "add more than 4100" in few.stderr
            approved = daemon.ctl("approve", job, "--add-tokens", "10000", check=True).stdout
            assert approved.strip() == f"job {job}: budget approved, its cap raised by 10.0k tokens; the job goes on"
            await client.wait_for(job, lambda v: v["status"] == "completed", timeout=60)
            events = await client.events(job)
        # From the hostile side: a cap beyond what 64-bit readers of the events take is refused at the edge.
        huge = daemon.ctl("approve", job, "--add-tokens", str(10**13))
        assert huge.returncode == 2 and "--add-tokens" in huge.stderr
        connection = daemon.connection()
        nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
        try:
            body = json.dumps({"job": job, "add_tokens": 10**19}).encode()
            reply = await nc.request("numerus.cmd.approve", body, timeout=10)
        finally:
            await nc.close()
        assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "400"
        assert b"add_tokens" in reply.data and daemon.alive
    (exceeded,) = of_type(events, "BudgetExceeded")
    assert exceeded["data"] == {"scope": "job", "task": "", "used": 5100, "cap": 1000, "action": "pause"}
    (approval,) = of_type(events, "JobApproved")
    assert approval["data"]["added_tokens"] == 10000 and approval["data"]["by"].endswith("(operator)")
    order = [(event["type"], event["task"]) for event in events]
    assert order.index(("JobApproved", None)) < order.index(("TaskStarted", "b"))
    assert git(repo, "show", f"numerus/{job}.integration:B.md") == "b\n"


@pytest.mark.slow
async def test_with_on_budget_stop_the_agent_is_killed_and_the_job_fails(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    with budget_daemon(tmp_path, "stop", [{"run": "sleep 300"}]) as daemon:
        began = time.monotonic()
        run = daemon.ctl(
            "run", "notes", "--repo", str(repo), "--agent", "spender", "--task-max-tokens", "2000", "--wait"
        )
        assert run.returncode == 1, run.stdout + run.stderr
        assert time.monotonic() - began < 60  # the 300 s build was stopped
        view = daemon.status(run.stdout.splitlines()[0].strip())
        events = daemon.events(view["id"])
    assert view["status"] == "failed"
    assert view["reason"] == "token budget exceeded: task a used 5100 tokens of its 2000"
    assert [t["status"] for t in view["tasks"]] == ["killed", "killed"]
    (exceeded,) = of_type(events, "BudgetExceeded")
    assert exceeded["data"] == {"scope": "task", "task": "a", "used": 5100, "cap": 2000, "action": "stop"}
    (exited,) = of_type(events, "TaskExited")
    assert exited["data"]["signal"] is not None or exited["data"]["exit_code"] != 0


@pytest.mark.slow
async def test_rejecting_a_paused_budget_stops_the_job_before_its_next_agent(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    with budget_daemon(tmp_path, "pause", [{"write": "A.md", "content": "a\n"}]) as daemon:
        run = daemon.ctl("run", "notes", "--repo", str(repo), "--agent", "spender", "--max-tokens", "1000", check=True)
        job = run.stdout.strip()
        async with daemon.client() as client:
            await client.wait_for(
                job, lambda v: v["status"] == "awaiting_approval" and v["tasks"][1]["status"] == "granted"
            )
            rejected = daemon.ctl("reject", job, "--reason", "too dear", check=True).stdout
            assert rejected.strip() == f"job {job}: budget rejected; the job fails"
            view = await client.wait_for(job, lambda v: v["status"] == "failed")
            events = await client.events(job)
    assert view["reason"].startswith("the token budget was rejected by ") and view["reason"].endswith(": too dear")
    assert [t["status"] for t in view["tasks"]] == ["completed", "killed"]
    assert [e["task"] for e in of_type(events, "TaskStarted")] == ["a"]  # b's agent never started
