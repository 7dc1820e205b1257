"""What `numerusctl top` shows, without any terminal UI: the jobs and tasks as their events leave them, as rows.

`Board` starts from the `status` replies (the starting picture) and folds each event read from `numerus.job.>`
into it (`apply`): the state, attempt, start and end of each task, its tokens (and cost, when the events carry
one), the locks it holds and, while it waits, the tasks holding what it claimed. It reads events as plain JSON,
so an event type it does not know changes nothing. A `status` reply shows a job as whole decisions left it, and
the events of one decision share their time: an event no newer than the job's picture (its `updated` time) was
in that picture already and is skipped, so starting the feed before asking the status loses nothing and counts
nothing twice.

`ACTIONS` is the one table of the keys that act on the selection, key -> verb; `actions(REQUESTS)` keeps those
whose verb the daemon's protocol has, so a key works as soon as its verb exists, with no change here.
`request_for` fills the verb's request from the selection by its field names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from numerusctl.render import cut, visible
from numerusd.protocol.commands import JOB_DONE, JobView, Request, TaskView

_event = msgspec.json.Decoder()

#: Job statuses a job takes from its job-level events; task statuses from task events.
_JOB_STATUS = {
    "JobCompleted": "completed",
    "JobFailed": "failed",
    "JobKilled": "killed",
    "JobInterrupted": "interrupted",
    "PlanValidated": "running",
    "ReplanRequested": "replanning",
    "ReplanFailed": "running",
}
_TASK_STATUS = {
    "TaskWorkCommitted": "checking",
    "GatePassed": "merging",
    "MergeStarted": "merging",
    "TaskRetryScheduled": "retrying",
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskKilled": "killed",
    "TaskSkipped": "skipped",
    "TaskInterrupted": "interrupted",
}
_TASK_ENDS = frozenset({"completed", "failed", "killed", "skipped", "interrupted"})


class Action(NamedTuple):
    """A key that acts on the selection: the verb it sends, what it says in the key bar, whether the selected task
    is sent with the job (else the job alone, whatever row is selected), and whether a task must be selected."""

    key: str
    verb: str
    label: str
    takes_task: bool = False
    needs_task: bool = False


#: Every key that sends a command, key -> verb. A verb not in the protocol's REQUESTS hides its key.
ACTIONS: tuple[Action, ...] = (
    Action("k", "kill", "kill job"),
    Action("d", "diff", "diff", takes_task=True),
    Action("a", "approve", "approve"),
    Action("r", "reject", "reject"),
    Action("t", "retry", "retry", takes_task=True),
    Action("s", "skip", "skip task", takes_task=True, needs_task=True),
)


def actions(requests: Mapping[str, object]) -> list[Action]:
    """The actions whose verb `requests` has."""
    return [action for action in ACTIONS if action.verb in requests]


def request_for(request_type: type[Request], job: str, task: str | None, by: str) -> Request:
    """The request of `request_type` for the selection, its fields filled by name: `job`, `task` or `tasks` (the
    selected task), `reason` (said to come from `top`); a required field it cannot fill is a ValueError."""
    values: dict[str, Any] = {}
    for info in msgspec.structs.fields(request_type):
        if info.name == "job":
            values["job"] = job
        elif info.name == "task" and task is not None:
            values["task"] = task
        elif info.name == "tasks" and task is not None:
            values["tasks"] = [task]
        elif info.name == "reason":
            values["reason"] = f"from numerusctl top ({by})"
        elif info.required:
            raise ValueError(f"{request_type.__name__} needs {info.name}, which top cannot fill in")
    try:
        return msgspec.convert(values, request_type)
    except msgspec.ValidationError as e:
        raise ValueError(f"cannot build {request_type.__name__} from the selection: {e}") from None


@dataclass
class TaskRow:
    """One task as `top` shows it."""

    id: str
    title: str = ""
    status: str = "pending"
    attempt: int = 0
    started: datetime | None = None
    ended: datetime | None = None
    tokens: int = 0
    cost: float | None = None
    #: The locks it holds (their paths), and the tasks it waits for while it waits.
    locks: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()

    @classmethod
    def of(cls, view: TaskView) -> TaskRow:
        """The row of a task in a `status` reply."""
        return cls(
            id=view.id,
            title=view.title,
            status=view.status,
            attempt=view.attempt,
            started=view.started,
            ended=view.ended,
            tokens=view.input_tokens + view.output_tokens,
            cost=_number(msgspec.structs.asdict(view).get("cost")),
            holders=tuple(view.holders),
            locks=tuple(view.locks),
        )


@dataclass
class JobRow:
    """One job as `top` shows it, with its tasks in creation order (empty until known)."""

    id: str
    goal: str = ""
    status: str = "planning"
    created: datetime | None = None
    updated: datetime | None = None
    tokens: int = 0
    cost: float | None = None
    killing: bool = False
    tasks: dict[str, TaskRow] = field(default_factory=dict)
    #: Whether `tasks` holds them all (from a job's status, or its events since its start).
    tasks_known: bool = False
    #: The time of the last event the `status` picture had (None for a job seen from its first event on).
    pictured: datetime | None = None

    @classmethod
    def of(cls, view: JobView) -> JobRow:
        """The row of a job in a `status` reply (with its tasks when the reply names one job)."""
        return cls(
            id=view.id,
            goal=view.goal,
            status=view.status,
            created=view.created,
            updated=view.updated,
            tokens=view.tokens,
            cost=_number(msgspec.structs.asdict(view).get("cost")),
            tasks={task.id: TaskRow.of(task) for task in view.tasks},
            tasks_known=bool(view.tasks) or view.tasks_total == 0,
            pictured=view.updated,
        )

    @property
    def ended(self) -> bool:
        return self.status in JOB_DONE


class Board:
    """Every job `top` knows, newest first, folded from the starting picture and the events since."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRow] = {}

    def load(self, views: Iterable[JobView]) -> None:
        """Take the jobs of a `status` reply as they are now (a job's tasks are kept if the reply has none)."""
        for view in views:
            row = JobRow.of(view)
            known = self.jobs.get(view.id)
            if known is not None and not row.tasks_known:
                row.tasks, row.tasks_known = known.tasks, known.tasks_known
            self.jobs[view.id] = row

    def ordered(self) -> list[JobRow]:
        """The jobs, newest first (ids are ULIDs, which sort by time)."""
        return [self.jobs[job] for job in sorted(self.jobs, reverse=True)]

    def apply(self, wire: bytes) -> str | None:
        """Fold one stored event into the board; the job it changed, or None when it changed nothing."""
        try:
            event = _event.decode(wire)
            kind, job_id, task_id, data = event["type"], event["job"], event.get("task"), event.get("data") or {}
            time = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError, ValueError):
            return None  # not an event the daemon wrote: `audit verify` is where it is named
        job = self.jobs.get(job_id)
        if kind == "JobSubmitted":
            if job is None:
                status = "planning" if data.get("plan") else "running"
                self.jobs[job_id] = JobRow(job_id, str(data.get("goal", "")), status, time, time, tasks_known=True)
            return job_id
        if job is None or (job.pictured is not None and time <= job.pictured):
            return None  # a job from before the picture (not shown), or an event the picture had already
        job.updated = time
        if task_id is None:
            _apply_job(job, kind, data)
        else:
            _apply_task(job, task_id, kind, data, time)
        return job_id


def _apply_job(job: JobRow, kind: str, data: dict[str, Any]) -> None:
    if kind in _JOB_STATUS:
        job.status = _JOB_STATUS[kind]
    elif kind == "KillRequested":
        job.killing = True
    if kind in ("PlanValidated", "PlanRejected"):
        job.tokens += _tokens(data.get("usage"))


def _apply_task(job: JobRow, task_id: str, kind: str, data: dict[str, Any], time: datetime) -> None:
    if kind == "TaskCreated":
        job.tasks[task_id] = TaskRow(task_id, title=str(data.get("title", "")))
        return
    task = job.tasks.get(task_id)
    if task is None:
        task = job.tasks[task_id] = TaskRow(task_id)
    if kind in _TASK_STATUS:
        task.status = _TASK_STATUS[kind]
        if task.status in _TASK_ENDS:
            task.ended = task.ended or time
    match kind:
        case "TaskStarted":
            task.status, task.attempt, task.started, task.ended = "running", int(data.get("attempt", 0)), time, None
        case "TaskExited":
            task.ended = time
        case "ClaimGranted":
            task.status, task.holders = "granted", ()
            task.locks = tuple(str(lock.get("path", "")) for lock in data.get("locks", ()) if isinstance(lock, dict))
        case "ClaimDenied":
            task.status, task.holders = "waiting", tuple(str(holder) for holder in data.get("holders", ()))
        case "LocksReleased":
            task.locks = task.holders = ()
        case "TokensUsed" | "ClaimProposed" | "ClaimRejected" | "ReviewCompleted":
            spent = _tokens(data if kind == "TokensUsed" else data.get("usage"))
            task.tokens += spent
            job.tokens += spent
            cost = _number(data.get("cost"))
            if cost is not None:
                task.cost = (task.cost or 0.0) + cost
                job.cost = (job.cost or 0.0) + cost


def _tokens(usage: object) -> int:
    if not isinstance(usage, dict):
        return 0
    return int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --- rows as text ------------------------------------------------------------------------------------------


def elapsed(started: datetime | None, ended: datetime | None, now: datetime) -> str:
    """`1:05` (minutes:seconds) or `2:03:09`, from start to end (or to now); empty before the start."""
    if started is None:
        return ""
    seconds = max(0, int(((ended or now) - started).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def columns(show_cost: bool) -> list[str]:
    """The table's headers."""
    return ["job / task", "state", "try", "elapsed", "tokens", *(["cost"] if show_cost else []), "claims", "what"]


def show_cost(board: Board) -> bool:
    """Whether any job or task carries a cost (a price table is configured): the column shows only then."""
    jobs = board.jobs.values()
    return any(job.cost is not None or any(task.cost is not None for task in job.tasks.values()) for job in jobs)


def job_cells(job: JobRow, now: datetime, cost: bool) -> list[str]:
    """A job's row: its id, state (`killing` once a kill is asked), age, tokens, cost, its goal."""
    state = "killing" if job.killing and not job.ended else job.status
    end = job.updated if job.ended else None
    cells = [job.id, state, "", elapsed(job.created, end, now), _count(job.tokens)]
    return [*cells, *([_cost(job.cost)] if cost else []), "", _one_line(job.goal)]


def task_cells(task: TaskRow, now: datetime, cost: bool) -> list[str]:
    """A task's row: its id, state, attempt, elapsed time, tokens, cost, claims held (or who it waits for)."""
    if task.status == "waiting" and task.holders:
        claims = "waits for " + ", ".join(task.holders)
    else:
        claims = ", ".join(task.locks)
    cells = [f"  {task.id}", task.status, str(task.attempt or ""), elapsed(task.started, task.ended, now)]
    cells.append(_count(task.tokens))
    return [*cells, *([_cost(task.cost)] if cost else []), _one_line(claims, 40), _one_line(task.title)]


def _count(tokens: int) -> str:
    if tokens >= 1_000_000:
        return f"{tokens / 1_000_000:.1f}M"
    return f"{tokens / 1000:.1f}k" if tokens >= 10_000 else str(tokens) if tokens else ""


def _cost(cost: float | None) -> str:
    return "" if cost is None else f"${cost:.2f}"


def _one_line(text: str, width: int = 60) -> str:
    return visible(cut(text, width))
