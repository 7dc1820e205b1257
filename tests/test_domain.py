"""The pure domain: state is a fold of events, commands are decided against it."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from numerusd import domain
from numerusd.errors import BadRequest, CommandRefused
from numerusd.protocol.envelope import Envelope, InvalidEvent, decode_wire
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    EventData,
    JobKilled,
    KillRequested,
    TaskKilled,
    TokensUsed,
)

T0 = datetime(2026, 11, 22, tzinfo=UTC)


def envelopes(job: str, decision: domain.Decision) -> list[Envelope]:
    return [
        Envelope(
            id=f"e{i}",
            type=type(data).__name__,
            job=job,
            task=task,
            time=T0,
            actor="test",
            correlation_id="c",
            causation_id=None,
            data=data,
            prev="",
            kid="k",
        )
        for i, (task, data) in enumerate(decision)
    ]


def apply(state: domain.JobState | None, job: str, decision: domain.Decision) -> domain.JobState:
    for event in envelopes(job, decision):
        state = domain.evolve(state, event)
    assert state is not None
    return state


def started_job() -> domain.JobState:
    job = apply(None, "J", domain.decide_run("fix the tests", "/repo", "scripted"))
    task = job.tasks["t1"]
    return apply(job, "J", domain.decide_start(job, task, ["codex", "exec"], "/runs/J/t1", "/runs/J/t1/stdout.log"))


def exit_with(job: domain.JobState, code: int | None, signal: int | None = None) -> domain.JobState:
    decision = domain.decide_exit(
        job, "t1", exit_code=code, signal=signal, log_path="l", log_sha256="h", log_bytes=1, duration_s=0.5
    )
    return apply(job, "J", decision)


def test_run_creates_one_pending_task_for_the_goal():
    job = apply(None, "J", domain.decide_run("fix the tests\nand more", "/repo", "scripted"))
    assert job.status == "running"
    assert [(t.id, t.title, t.status) for t in job.tasks.values()] == [("t1", "fix the tests", "pending")]
    assert domain.ready_tasks(job) == [job.tasks["t1"]]


def test_empty_goal_is_refused():
    with pytest.raises(BadRequest, match="goal is empty"):
        domain.decide_run("  ", "/repo", "scripted")


def test_exit_zero_completes_task_and_job():
    job = exit_with(started_job(), 0)
    assert job.tasks["t1"].status == "completed"
    assert job.status == "completed"


def test_nonzero_exit_fails_with_reason():
    job = exit_with(started_job(), 3)
    assert job.tasks["t1"].status == "failed"
    assert job.status == "failed"
    assert job.tasks["t1"].reason == "agent ended with exit code 3"


def test_kill_of_running_job_waits_for_the_agent_then_records_killed():
    job = started_job()
    decision = domain.decide_kill(job)
    assert [type(d) for _, d in decision] == [KillRequested]
    job = apply(job, "J", decision)
    assert job.status == "running" and job.kill_requested
    job = exit_with(job, None, signal=15)
    assert job.tasks["t1"].status == "killed"
    assert job.status == "killed"
    with pytest.raises(CommandRefused, match="already killed"):
        domain.decide_kill(job)


def test_kill_of_job_not_yet_started_is_immediate():
    job = apply(None, "J", domain.decide_run("goal", "/repo", "scripted"))
    decision = domain.decide_kill(job)
    assert [type(d) for _, d in decision] == [KillRequested, TaskKilled, JobKilled]
    assert apply(job, "J", decision).status == "killed"


def test_restart_marks_running_task_interrupted_never_completed():
    job = apply(started_job(), "J", domain.decide_interrupt(started_job(), "daemon restarted"))
    assert job.tasks["t1"].status == "interrupted"
    assert job.status == "interrupted"
    assert domain.decide_interrupt(job, "again") == []


def test_restart_leaves_finished_jobs_alone():
    job = exit_with(started_job(), 0)
    assert domain.decide_interrupt(job, "daemon restarted") == []


def test_tokens_add_up_per_task():
    from numerusd.protocol.events import TokensUsed

    job = started_job()
    usage = [
        ("t1", TokensUsed(input_tokens=10, cached_input_tokens=2, output_tokens=5)),
        ("t1", TokensUsed(input_tokens=7, cached_input_tokens=0, output_tokens=1)),
    ]
    task = apply(job, "J", usage).tasks["t1"]
    assert (task.input_tokens, task.cached_input_tokens, task.output_tokens) == (17, 2, 6)


def test_job_view_shows_tasks():
    view = domain.job_view(exit_with(started_job(), 0))
    assert view.status == "completed"
    assert view.tasks[0].status == "completed"
    assert view.tasks[0].attempt == 1


@pytest.mark.parametrize(
    "data",
    [
        AgentMessageReceived(text="looking at the tests"),
        AgentCommandExecuted(command="pytest -q", exit_code=1),
        AgentFileChanged(path="src/app.py", kind="update"),
        AgentErrorReported(message="stream error, retrying"),
        TokensUsed(input_tokens=100, cached_input_tokens=50, output_tokens=10),
        TaskKilled(reason="killed by user"),
    ],
    ids=lambda data: type(data).__name__,
)
@pytest.mark.parametrize("task", ["t1", "t9", None])
def test_an_event_folded_before_its_payload_is_decoded_leaves_the_job_as_evolve_does(data: EventData, task: str | None):
    """Replays fold most events without decoding their payloads: the job must come out the same."""
    job = started_job()
    (event,) = envelopes("J", [(task, data)])
    untyped = decode_wire(msgspec.json.encode(event))
    assert domain.evolve_untyped(job, untyped) == domain.evolve(job, event)
    with pytest.raises(ValueError, match="not JobSubmitted"):
        domain.evolve_untyped(None, untyped)


def test_a_payload_that_does_not_fit_its_type_is_refused_when_it_is_needed():
    job = started_job()
    (event,) = envelopes("J", [("t1", TokensUsed(input_tokens=1, cached_input_tokens=0, output_tokens=1))])
    untyped = msgspec.structs.replace(
        decode_wire(msgspec.json.encode(event)), data=msgspec.Raw(b'{"input_tokens": "x"}')
    )
    with pytest.raises(InvalidEvent, match="TokensUsed"):
        domain.evolve_untyped(job, untyped)
