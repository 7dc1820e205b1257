"""The pure domain: state is a fold of events, commands are decided against it."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from numerusd import domain
from numerusd.domain.observations import (
    AgentExited,
    AgentReported,
    AgentStarting,
    AttemptFailed,
    FinishedInPlace,
    Interrupted,
    Kill,
    Resume,
    SubmitJob,
    WorkCommitted,
)
from numerusd.errors import BadRequest, CommandRefused, InvalidTransition
from numerusd.protocol.envelope import Envelope, InvalidEvent, decode_wire
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    EventData,
    JobKilled,
    JobSubmitted,
    KillRequested,
    TaskKilled,
    TaskStarted,
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


def decide(job: domain.JobState | None, message: object) -> domain.JobState:
    """The job after `message` is decided and its events folded."""
    return apply(job, "J", domain.decide(job, message))  # type: ignore[arg-type]


IN_PLACE = SubmitJob(goal="fix the tests\nand more", repo="/repo", roles={"executor": "scripted"}, plan=False)


def started_job() -> domain.JobState:
    job = decide(None, IN_PLACE)
    return decide(job, AgentStarting(task="t1", argv=("codex", "exec"), workdir="/runs/J/t1", log_path="l"))


def exit_with(job: domain.JobState, code: int | None, signal: int | None = None) -> domain.JobState:
    """The agent ends; the pipeline observes the end of the attempt as it would."""
    exited = AgentExited(
        task="t1", exit_code=code, signal=signal, log_path="l", log_sha256="h", log_bytes=1, duration_s=0.5
    )
    job = decide(job, exited)
    if code == 0:
        return decide(job, FinishedInPlace(task="t1"))
    how = f"exit code {code}" if signal is None else f"signal {signal}"
    return decide(job, AttemptFailed(task="t1", reasons=(f"the agent ended with {how}",)))


def test_no_plan_is_a_plan_of_one_task_worked_on_in_place_with_one_attempt():
    job = decide(None, IN_PLACE)
    assert job.status == "running" and job.in_place
    assert [(t.id, t.title, t.status) for t in job.tasks.values()] == [("t1", "fix the tests", "pending")]
    assert (job.claims, job.review, job.checks, job.max_attempts) == ("none", False, (), 1)


def test_empty_goal_is_refused():
    with pytest.raises(BadRequest, match="goal is empty"):
        domain.decide(None, msgspec.structs.replace(IN_PLACE, goal="  "))


def test_exit_zero_completes_task_and_job():
    job = exit_with(started_job(), 0)
    assert job.tasks["t1"].status == "completed"
    assert job.status == "completed"


def test_nonzero_exit_fails_with_reason():
    job = exit_with(started_job(), 3)
    assert job.tasks["t1"].status == "failed"
    assert job.status == "failed"
    assert job.tasks["t1"].reason == "the agent ended with exit code 3"


def test_kill_of_running_job_waits_for_the_agent_then_records_killed():
    job = started_job()
    decision = domain.decide(job, Kill())
    assert [type(d) for _, d in decision] == [KillRequested]
    job = apply(job, "J", decision)
    assert job.status == "running" and job.kill_requested
    job = exit_with(job, None, signal=15)
    assert job.tasks["t1"].status == "killed"
    assert job.status == "killed"
    with pytest.raises(CommandRefused, match="already killed"):
        domain.decide(job, Kill())


def test_kill_of_job_not_yet_started_is_immediate():
    job = decide(None, IN_PLACE)
    decision = domain.decide(job, Kill())
    assert [type(d) for _, d in decision] == [KillRequested, TaskKilled, JobKilled]
    assert apply(job, "J", decision).status == "killed"


def test_restart_marks_running_task_interrupted_never_completed():
    job = decide(started_job(), Interrupted(reason="daemon restarted"))
    assert job.tasks["t1"].status == "interrupted"
    assert job.status == "interrupted"
    assert domain.decide(job, Interrupted(reason="again")) == []


def test_an_interrupted_job_keeps_a_task_that_never_started_pending_and_resumes_where_it_was():
    """Only the attempts a stop cut are interrupted: a task that never started goes on from pending."""
    job = decide(None, IN_PLACE)
    job = decide(job, Interrupted(reason="numerusd stopped", next="it goes on when numerusd starts"))
    assert (job.status, job.tasks["t1"].status) == ("interrupted", "pending")
    assert (job.reason, job.next) == ("numerusd stopped", "it goes on when numerusd starts")
    job = decide(job, Resume(by="numerusd"))
    assert (job.status, job.next) == ("running", None)


def test_restart_leaves_finished_jobs_alone():
    job = exit_with(started_job(), 0)
    assert domain.decide(job, Interrupted(reason="daemon restarted")) == []


def test_an_observation_the_state_does_not_allow_is_refused_and_records_nothing():
    job = decide(None, IN_PLACE)
    exited = AgentExited(task="t1", exit_code=0, signal=None, log_path="l", log_sha256="h", log_bytes=1, duration_s=1)
    with pytest.raises(InvalidTransition, match="which is pending"):
        domain.decide(job, exited)  # its agent never started
    with pytest.raises(InvalidTransition, match="does not have"):
        domain.decide(job, AgentExited(**{**msgspec.structs.asdict(exited), "task": "t9"}))
    with pytest.raises(InvalidTransition, match="works in place"):
        domain.decide(started_job(), WorkCommitted(task="t1", commit="c" * 40))
    with pytest.raises(InvalidTransition, match="cannot report JobSubmitted"):
        domain.decide(started_job(), AgentReported(task="t1", events=(JobSubmitted(goal="g", repo="/", agent="a"),)))
    with pytest.raises(InvalidTransition, match="submitted already"):
        domain.decide(job, IN_PLACE)


def test_the_start_is_recorded_with_the_attempt_it_begins():
    job = decide(None, IN_PLACE)
    (start,) = domain.decide(job, AgentStarting(task="t1", argv=("a",), workdir="w", log_path="l"))
    assert isinstance(start[1], TaskStarted) and start[1].attempt == 1
    assert started_job().tasks["t1"].attempt == 1


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
