"""The daemon's log lines: text or one JSON object a line, each saying which job, task and trace it concerns.

`configure(level, fmt)` sets up the root logger on stderr: `text` is the classic
`time LEVEL logger: message` line, `json` one object per line with `time`, `level`, `logger`, `message`, and,
when the line concerns one, `job`, `task` and `trace_id` (and `exc` with the traceback of an exception). The
message is escaped like any JSON string, so a goal full of newlines or quotes stays inside its line.

Which job, task and trace a line concerns comes from context variables, set where a job's pipeline, a task's
flow or a command's handler runs (`scope`), and copied by asyncio into every task started from there; the
`ContextFilter` puts them on each record. A caller that knows better (the job book logging a decision from the
write-ahead log's callback, which runs in whatever context the flusher has) passes them in `extra`.

`decision_lines` is the one place the life of a job is logged at INFO: from the events of each decision once
they are durable (called by `JobBook`), so the lines follow the record, never a step that was refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from numerusd.errors import one_line
from numerusd.protocol import events as ev

if TYPE_CHECKING:
    from numerusd.domain.state import JobState
    from numerusd.protocol.envelope import Sealed

LogFormat = Literal["text", "json"]

#: The job, task and W3C traceparent the code running now works for ("" when none).
JOB: contextvars.ContextVar[str] = contextvars.ContextVar("numerus_job", default="")
TASK: contextvars.ContextVar[str] = contextvars.ContextVar("numerus_task", default="")
TRACEPARENT: contextvars.ContextVar[str] = contextvars.ContextVar("numerus_traceparent", default="")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_job_log = logging.getLogger("numerusd.jobs")


@contextlib.contextmanager
def scope(*, job: str | None = None, task: str | None = None, traceparent: str | None = None) -> Iterator[None]:
    """Lines logged in the block (and in tasks started from it) concern this job, task and trace; each one
    given replaces the one around it, and is put back when the block ends."""
    tokens = [
        (var, var.set(value))
        for var, value in ((JOB, job), (TASK, task), (TRACEPARENT, traceparent))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def enter(*, job: str | None = None, task: str | None = None, traceparent: str | None = None) -> None:
    """From here on, the current asyncio task (and the tasks it starts) works for this job, task and trace: the
    first line of a coroutine that runs as a task of its own (a pipeline, a task's flow), whose context asyncio
    copied when it was created, so nothing outside it is changed."""
    for var, value in ((JOB, job), (TASK, task), (TRACEPARENT, traceparent)):
        if value is not None:
            var.set(value)


def trace_id(traceparent: str) -> str:
    """The trace id of a W3C traceparent (`00-<trace id>-<span id>-<flags>`), or ""."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


class ContextFilter(logging.Filter):
    """Puts `job`, `task` and `trace_id` on every record, from the context unless the caller gave them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job"):
            record.job = JOB.get()
        if not hasattr(record, "task"):
            record.task = TASK.get()
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id(TRACEPARENT.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, whatever the message holds."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("job", "task", "trace_id"):
            value = getattr(record, name, "")
            if value:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exc"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: LogFormat = "text") -> None:
    """Log to stderr at `level` (`info`, `debug`…) in `fmt`, replacing whatever was set up before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def decision_lines(job_id: str, state: JobState, sealed: Sequence[Sealed]) -> None:
    """Log at INFO the steps of a job's life among the events of one decision, now durable; `state` is the
    job after them."""
    if not _job_log.isEnabledFor(logging.INFO):
        return
    try:
        for one in sealed:
            envelope = one.envelope
            line = _line(state, envelope.task, envelope.data, envelope.time)
            if line is not None:
                extra = {"job": job_id, "task": envelope.task or "", "trace_id": trace_id(envelope.traceparent)}
                task = f" task {envelope.task}" if envelope.task else ""
                _job_log.info("job %s%s: %s", job_id, task, line, extra=extra)
    except Exception:  # called back by the WAL once the events are durable: a log line must never break that
        _job_log.exception("cannot log the steps of job %s", job_id)


def _line(state: JobState, task_id: str | None, data: object, time: datetime) -> str | None:
    """What one event says of the job's life, in a few words; None for the events that are details."""
    match data:
        case ev.JobSubmitted(goal=goal, agent=agent):
            return f"submitted ({'planned' if data.plan else 'not planned'}, agent {agent}): {_short(goal)}"
        case ev.PlanValidated(version=version, plan=plan):
            return f"planned: {len(plan.tasks)} tasks (plan version {version})"
        case ev.TaskStarted(attempt=attempt, agent=agent):
            return f"started: attempt {attempt}, agent {agent}"
        case ev.TaskCompleted() | ev.TaskFailed() | ev.TaskKilled() | ev.TaskSkipped():
            task = state.tasks.get(task_id or "")
            reason = getattr(data, "reason", "")
            return f"ended: {task.status if task else type(data).__name__}" + (f" ({_short(reason)})" if reason else "")
        case ev.TaskMerged(sha=sha):
            return f"merged: {sha[:12]}"
        case ev.JobCompleted() | ev.JobFailed() | ev.JobKilled():
            seconds = (time - state.created).total_seconds()
            reason = getattr(data, "reason", "")
            return f"ended: {state.status} in {seconds:.1f} s" + (f" ({_short(reason)})" if reason else "")
        case ev.JobInterrupted(reason=reason):
            return f"interrupted: {_short(reason)}"
    return None


def _short(text: str, most: int = 200) -> str:
    """`text` on one line, cut to `most` characters, its control characters escaped: a goal or a reason (a client's
    or an agent's words) in a log line, never a terminal escape in the journal."""
    return one_line(" ".join(text.split()), most)
