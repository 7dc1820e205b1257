"""The pure domain: job and task state as a fold of events, and commands decided against that state.

`evolve(state, event) -> state` is the only way state changes; the daemon, the projector, a restart and an
auditor's replay all use it, so none of them can drift from the others. The `decide_*` functions take state and
a command or an observed outcome and return the events to append; they never perform I/O, read a clock or
touch NATS. Events are returned as `(task id or None, payload)` pairs; the event store adds the envelope.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from numerusd.errors import BadRequest, CommandRefused
from numerusd.protocol.commands import JOB_DONE, JobView, TaskView
from numerusd.protocol.envelope import Envelope
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    AgentSpawned,
    AgentSpawnFailed,
    AgentThreadStarted,
    EventData,
    JobCompleted,
    JobFailed,
    JobInterrupted,
    JobKilled,
    JobSubmitted,
    KillRequested,
    TaskCompleted,
    TaskCreated,
    TaskExited,
    TaskFailed,
    TaskInterrupted,
    TaskKilled,
    TaskStarted,
    TokensUsed,
)

#: What `decide_*` returns: payloads with the task they belong to (None for job events).
Decision = list[tuple[str | None, EventData]]

TASK_DONE = frozenset({"completed", "failed", "killed", "interrupted"})


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One task as its events made it."""

    id: str
    title: str
    instructions: str
    agent: str
    role: str
    deps: tuple[str, ...]
    status: str = "pending"
    attempt: int = 0
    pid: int | None = None
    start_ticks: int = 0
    exit_code: int | None = None
    reason: str | None = None
    thread_id: str | None = None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    log_path: str | None = None
    workdir: str | None = None
    started: datetime | None = None
    ended: datetime | None = None


class JobState(msgspec.Struct, frozen=True, kw_only=True):
    """One job as its events made it; `tasks` keeps creation order."""

    id: str
    goal: str
    repo: str
    agent: str
    status: str = "running"
    reason: str | None = None
    kill_requested: bool = False
    created: datetime
    updated: datetime
    events: int = 1
    last_event_id: str = ""
    tasks: dict[str, TaskState] = {}


# --- evolve -------------------------------------------------------------------------------------------------


def evolve(state: JobState | None, event: Envelope) -> JobState:
    """The job after `event`. Events that do not apply (a forged order, a duplicate) leave it unchanged."""
    data = event.data
    if state is None:
        if not isinstance(data, JobSubmitted):
            raise ValueError(f"job {event.job} starts with {event.type}, not JobSubmitted")
        return JobState(
            id=event.job,
            goal=data.goal,
            repo=data.repo,
            agent=data.agent,
            created=event.time,
            updated=event.time,
            last_event_id=event.id,
        )
    job = msgspec.structs.replace(state, updated=event.time, events=state.events + 1, last_event_id=event.id)
    if event.task is not None:
        return _evolve_task(job, event.task, event.time, data)
    match data:
        case KillRequested():
            return msgspec.structs.replace(job, kill_requested=True)
        case JobCompleted():
            return msgspec.structs.replace(job, status="completed")
        case JobFailed(reason=reason):
            return msgspec.structs.replace(job, status="failed", reason=reason)
        case JobKilled(reason=reason):
            return msgspec.structs.replace(job, status="killed", reason=reason)
        case JobInterrupted(reason=reason):
            return msgspec.structs.replace(job, status="interrupted", reason=reason)
    return job


def _evolve_task(job: JobState, task_id: str, time: datetime, data: EventData) -> JobState:
    if isinstance(data, TaskCreated):
        task = TaskState(
            id=task_id,
            title=data.title,
            instructions=data.instructions,
            agent=data.agent,
            role=data.role,
            deps=data.deps,
        )
        return msgspec.structs.replace(job, tasks={**job.tasks, task_id: task})
    task = job.tasks.get(task_id)
    if task is None:
        return job
    replace = msgspec.structs.replace
    match data:
        case TaskStarted(attempt=attempt, log_path=log_path, workdir=workdir):
            task = replace(
                task,
                status="running",
                attempt=attempt,
                log_path=log_path,
                workdir=workdir,
                started=time,
                ended=None,
                pid=None,
                exit_code=None,
                reason=None,
            )
        case AgentSpawned(pid=pid, start_ticks=start_ticks):
            task = replace(task, pid=pid, start_ticks=start_ticks)
        case AgentSpawnFailed(reason=reason):
            task = replace(task, reason=reason)
        case AgentThreadStarted(thread_id=thread_id):
            task = replace(task, thread_id=thread_id)
        case TokensUsed():
            task = replace(
                task,
                input_tokens=task.input_tokens + data.input_tokens,
                cached_input_tokens=task.cached_input_tokens + data.cached_input_tokens,
                output_tokens=task.output_tokens + data.output_tokens,
            )
        case TaskExited(exit_code=exit_code):
            task = replace(task, exit_code=exit_code, ended=time)
        case TaskCompleted():
            task = replace(task, status="completed", ended=task.ended or time)
        case TaskFailed(reason=reason):
            task = replace(task, status="failed", reason=reason, ended=task.ended or time)
        case TaskKilled(reason=reason):
            task = replace(task, status="killed", reason=reason, ended=task.ended or time)
        case TaskInterrupted(reason=reason):
            task = replace(task, status="interrupted", reason=reason, ended=task.ended or time)
        case AgentMessageReceived() | AgentCommandExecuted() | AgentFileChanged() | AgentErrorReported():
            return job  # recorded in the stream and the event index; no state of their own
    return msgspec.structs.replace(job, tasks={**job.tasks, task_id: task})


def fold(events: Iterable[Envelope]) -> dict[str, JobState]:
    """Every job's state from a sequence of events in stream order."""
    jobs: dict[str, JobState] = {}
    for event in events:
        jobs[event.job] = evolve(jobs.get(event.job), event)
    return jobs


# --- decide -------------------------------------------------------------------------------------------------


def decide_run(goal: str, repo: str, agent: str) -> Decision:
    """A new job with one executor task for the whole goal (the single-task path)."""
    if not goal.strip():
        raise BadRequest(
            "the goal is empty: say what the agent should do, e.g. numerusctl run 'fix the tests'"
        )
    title = goal.strip().splitlines()[0][:80]
    return [
        (None, JobSubmitted(goal=goal, repo=repo, agent=agent)),
        ("t1", TaskCreated(title=title, instructions=goal, agent=agent)),
    ]


def decide_kill(job: JobState) -> Decision:
    """Record a kill; tasks not yet running are killed at once, running ones when their agent has ended."""
    if job.status in JOB_DONE:
        raise CommandRefused(f"job {job.id} is already {job.status}; nothing to kill", job=job.id)
    if job.kill_requested:
        return []
    events: Decision = [(None, KillRequested())]
    for task in job.tasks.values():
        if task.status == "pending":
            events.append((task.id, TaskKilled()))
    if not running_tasks(job):
        events.append((None, JobKilled()))
    return events


def decide_start(job: JobState, task: TaskState, argv: list[str], workdir: str, log_path: str) -> Decision:
    """The record made before an agent is spawned, so a crash after it is known to have been started."""
    return [
        (
            task.id,
            TaskStarted(
                attempt=task.attempt + 1,
                agent=task.agent,
                argv=tuple(argv),
                workdir=workdir,
                log_path=log_path,
            ),
        )
    ]


def decide_spawn_failed(job: JobState, task_id: str, reason: str) -> Decision:
    """The agent never started: the task fails with the reason, and the job with it."""
    events: Decision = [(task_id, AgentSpawnFailed(reason=reason)), (task_id, TaskFailed(reason=reason))]
    return events + _job_outcome(job, {task_id: "failed"})


def decide_exit(
    job: JobState,
    task_id: str,
    *,
    exit_code: int | None,
    signal: int | None,
    log_path: str,
    log_sha256: str,
    log_bytes: int,
    duration_s: float,
) -> Decision:
    """The agent ended: record how, then what it means for the task and the job."""
    events: Decision = [
        (
            task_id,
            TaskExited(
                exit_code=exit_code,
                signal=signal,
                log_path=log_path,
                log_sha256=log_sha256,
                log_bytes=log_bytes,
                duration_s=round(duration_s, 3),
            ),
        )
    ]
    if job.kill_requested:
        outcome: EventData = TaskKilled()
        status = "killed"
    elif exit_code == 0:
        outcome, status = TaskCompleted(), "completed"
    else:
        how = f"exit code {exit_code}" if signal is None else f"signal {signal}"
        outcome, status = TaskFailed(reason=f"agent ended with {how}"), "failed"
    events.append((task_id, outcome))
    return events + _job_outcome(job, {task_id: status})


def decide_interrupt(job: JobState, reason: str) -> Decision:
    """After a restart: tasks whose agent was running are `interrupted`, never completed, and so is the job."""
    if job.status in JOB_DONE:
        return []
    events: Decision = [
        (task.id, TaskInterrupted(reason=reason)) for task in job.tasks.values() if task.status == "running"
    ]
    if not events:
        return []
    if job.kill_requested:
        return [(task_id, TaskKilled()) for task_id, _ in events] + [(None, JobKilled())]
    return [*events, (None, JobInterrupted(reason=reason))]


def _job_outcome(job: JobState, changed: dict[str, str]) -> Decision:
    """The job event that follows when `changed` task statuses leave no task pending or running."""
    statuses = {task.id: changed.get(task.id, task.status) for task in job.tasks.values()}
    if any(status not in TASK_DONE for status in statuses.values()):
        return []
    if job.kill_requested:
        return [(None, JobKilled())]
    failed = sorted(task for task, status in statuses.items() if status != "completed")
    if not failed:
        return [(None, JobCompleted())]
    return [(None, JobFailed(reason=f"task {', '.join(failed)} {statuses[failed[0]]}"))]


# --- queries ------------------------------------------------------------------------------------------------


def running_tasks(job: JobState) -> list[TaskState]:
    """Tasks whose agent has been started and has not ended."""
    return [task for task in job.tasks.values() if task.status == "running"]


def ready_tasks(job: JobState) -> list[TaskState]:
    """Pending tasks whose dependencies have all completed, in creation order."""
    if job.status in JOB_DONE or job.kill_requested:
        return []
    done = {task.id for task in job.tasks.values() if task.status == "completed"}
    return [task for task in job.tasks.values() if task.status == "pending" and set(task.deps) <= done]


def job_view(job: JobState) -> JobView:
    """What `status` shows of a job."""
    return JobView(
        id=job.id,
        goal=job.goal,
        repo=job.repo,
        agent=job.agent,
        status=job.status,
        reason=job.reason,
        created=job.created,
        updated=job.updated,
        events=job.events,
        tasks=[
            TaskView(
                id=task.id,
                title=task.title,
                agent=task.agent,
                status=task.status,
                attempt=task.attempt,
                pid=task.pid,
                exit_code=task.exit_code,
                reason=task.reason,
                thread_id=task.thread_id,
                input_tokens=task.input_tokens,
                cached_input_tokens=task.cached_input_tokens,
                output_tokens=task.output_tokens,
                log_path=task.log_path,
                started=task.started,
                ended=task.ended,
            )
            for task in job.tasks.values()
        ],
    )
