"""Every event type: frozen msgspec Structs with past-tense names, grouped by aggregate.

An event is an `Envelope` (see `envelope.py`) whose `type` names one of the payload classes below and whose
`data` is that payload. Payloads evolve by msgspec's rules: a new field gets a default, a type never changes,
and a renamed event is a new event. `tests/data/events_v1.jsonl` holds events written by earlier versions.

Subjects: job events go to `numerus.job.<job>.<snake_name>`, task events (those with `TASK_EVENT = True`) to
`numerus.job.<job>.task.<task>.<snake_name>`.
"""

from __future__ import annotations

import re
from typing import ClassVar

import msgspec


class EventData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of every event payload. `TASK_EVENT` says whether the event belongs to one task of the job."""

    TASK_EVENT: ClassVar[bool] = False


# --- the job aggregate -------------------------------------------------------------------------------------


class JobSubmitted(EventData, frozen=True, kw_only=True):
    """A user asked for a goal to be worked on in a repository."""

    goal: str
    repo: str
    agent: str
    plan: bool = False


class KillRequested(EventData, frozen=True, kw_only=True):
    """A user asked to stop the job; its running agents are being stopped."""

    reason: str = "killed by user"


class JobCompleted(EventData, frozen=True, kw_only=True):
    """Every task of the job completed."""


class JobFailed(EventData, frozen=True, kw_only=True):
    """The job cannot complete; `reason` says why."""

    reason: str


class JobKilled(EventData, frozen=True, kw_only=True):
    """The job was stopped at a user's request and all its agents have ended."""

    reason: str = "killed by user"


class JobInterrupted(EventData, frozen=True, kw_only=True):
    """The daemon stopped while the job was running; its running tasks are marked interrupted."""

    reason: str


# --- the task aggregate (inside a job) ---------------------------------------------------------------------


class TaskEvent(EventData, frozen=True, kw_only=True):
    """Base of the events that belong to one task; the envelope's `task` names it."""

    TASK_EVENT: ClassVar[bool] = True


class TaskCreated(TaskEvent, frozen=True, kw_only=True):
    """A task was added to the job: what to do, with which agent, after which tasks."""

    title: str
    instructions: str
    agent: str
    role: str = "executor"
    deps: tuple[str, ...] = ()


class TaskStarted(TaskEvent, frozen=True, kw_only=True):
    """The daemon is about to spawn the task's agent (recorded before the side effect)."""

    attempt: int
    agent: str
    argv: tuple[str, ...]
    workdir: str
    log_path: str


class AgentSpawned(TaskEvent, frozen=True, kw_only=True):
    """The agent process runs in its own PTY and session; `start_ticks` tells a reused pid apart."""

    pid: int
    start_ticks: int = 0


class AgentSpawnFailed(TaskEvent, frozen=True, kw_only=True):
    """The agent could not be started at all (missing binary, bad working directory)."""

    reason: str


class AgentThreadStarted(TaskEvent, frozen=True, kw_only=True):
    """The agent opened a conversation thread that a later attempt may resume."""

    thread_id: str


class AgentMessageReceived(TaskEvent, frozen=True, kw_only=True):
    """The agent said something to the user."""

    text: str


class AgentCommandExecuted(TaskEvent, frozen=True, kw_only=True):
    """The agent ran a shell command."""

    command: str
    exit_code: int | None = None
    status: str = "completed"


class AgentFileChanged(TaskEvent, frozen=True, kw_only=True):
    """The agent reported a change to a file: `kind` is add, update or delete."""

    path: str
    kind: str


class AgentErrorReported(TaskEvent, frozen=True, kw_only=True):
    """The agent reported an error (a failed turn, a stream error)."""

    message: str


class TokensUsed(TaskEvent, frozen=True, kw_only=True):
    """Tokens one turn of the agent used; the `thread_*` totals are the agent's cumulative counters."""

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    thread_input_tokens: int = 0
    thread_cached_input_tokens: int = 0
    thread_output_tokens: int = 0


class TaskExited(TaskEvent, frozen=True, kw_only=True):
    """The agent process ended; its whole terminal output is the file at `log_path` with that hash."""

    exit_code: int | None
    signal: int | None = None
    log_path: str
    log_sha256: str
    log_bytes: int
    duration_s: float


class TaskCompleted(TaskEvent, frozen=True, kw_only=True):
    """The task's work is done."""


class TaskFailed(TaskEvent, frozen=True, kw_only=True):
    """The task's attempt failed; `reason` says why."""

    reason: str


class TaskKilled(TaskEvent, frozen=True, kw_only=True):
    """The task's agent was stopped at a user's request."""

    reason: str = "killed by user"


class TaskInterrupted(TaskEvent, frozen=True, kw_only=True):
    """The daemon stopped while the task's agent ran, so its outcome is unknown; never read as completed."""

    reason: str


#: Every payload class, by the name that stands in an envelope's `type`.
EVENT_TYPES: dict[str, type[EventData]] = {
    cls.__name__: cls
    for cls in (
        JobSubmitted,
        KillRequested,
        JobCompleted,
        JobFailed,
        JobKilled,
        JobInterrupted,
        TaskCreated,
        TaskStarted,
        AgentSpawned,
        AgentSpawnFailed,
        AgentThreadStarted,
        AgentMessageReceived,
        AgentCommandExecuted,
        AgentFileChanged,
        AgentErrorReported,
        TokensUsed,
        TaskExited,
        TaskCompleted,
        TaskFailed,
        TaskKilled,
        TaskInterrupted,
    )
}


def snake_name(type_name: str) -> str:
    """`ClaimGranted` -> `claim_granted`: the last token of an event's subject."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type_name).lower()


#: Type name by subject suffix, and subject suffix by type name.
SUBJECT_SUFFIX: dict[str, str] = {name: snake_name(name) for name in EVENT_TYPES}
