"""How numerusctl shows things to a person: aligned plain-text tables, one-line event summaries, progress lines.

Pure functions from protocol types (or an event's wire bytes) to text; the commands decide where it goes.
Machines get `--json` instead, so nothing here is a format to parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from numerusd.protocol.commands import JobView, KillReply, TaskView
from numerusd.protocol.envelope import InvalidEvent, decode_wire

#: Longest one-line summary of an event before it is cut.
SUMMARY_WIDTH = 100
#: Longest goal shown in the jobs table.
GOAL_WIDTH = 60

_data_decoder = msgspec.json.Decoder()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged so long text does not pad lines."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def cut(text: str, width: int) -> str:
    """One line of at most `width` characters: whitespace runs (newlines too) collapsed, an ellipsis if cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def age(now: datetime, then: datetime) -> str:
    """`42s`, `5m`, `3h`, `2d`: how long ago, to one unit."""
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def count(n: int) -> str:
    """`950`, `12.3k`, `4.1M`: a token count at a glance."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def local_time(moment: datetime) -> str:
    """An event time in the reader's time zone, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _tokens(task: TaskView) -> int:
    return task.input_tokens + task.output_tokens


def jobs_table(jobs: Sequence[JobView], now: datetime) -> str:
    """The `status` overview: one line per job, newest first as the daemon sent them."""
    if not jobs:
        return "no jobs"
    rows = [
        [
            job.id,
            job.status,
            job.agent,
            f"{sum(t.status == 'completed' for t in job.tasks)}/{len(job.tasks)}",
            count(sum(_tokens(t) for t in job.tasks)),
            age(now, job.created),
            cut(job.goal, GOAL_WIDTH),
        ]
        for job in jobs
    ]
    return table(["JOB", "STATUS", "AGENT", "TASKS", "TOKENS", "AGE", "GOAL"], rows)


def job_detail(job: JobView, now: datetime) -> str:
    """`status JOB`: the job's fields, then its tasks."""
    fields = [
        ("job", job.id),
        ("status", job.status + (f" ({job.reason})" if job.reason else "")),
        ("goal", job.goal),
        ("repo", job.repo),
        ("agent", job.agent),
        ("created", f"{local_time(job.created)} ({age(now, job.created)} ago)"),
        ("updated", f"{local_time(job.updated)} ({age(now, job.updated)} ago)"),
        ("events", str(job.events)),
    ]
    head = "\n".join(f"{name:<8} {value}" for name, value in fields)
    if not job.tasks:
        return head + "\n\nno tasks yet"
    rows = [
        [
            t.id,
            t.status + (f" ({cut(t.reason, 40)})" if t.reason else ""),
            t.agent,
            str(t.attempt),
            "-" if t.pid is None else str(t.pid),
            "-" if t.exit_code is None else str(t.exit_code),
            count(_tokens(t)),
            cut(t.title, GOAL_WIDTH),
        ]
        for t in job.tasks
    ]
    return head + "\n\n" + table(["TASK", "STATUS", "AGENT", "ATTEMPT", "PID", "EXIT", "TOKENS", "TITLE"], rows)


def kill_text(reply: KillReply) -> str:
    """What `kill` did."""
    if not reply.tasks:
        return f"job {reply.job}: kill recorded; no agent was running"
    return f"job {reply.job}: stopping {', '.join(reply.tasks)}"


def summary(type_name: str, data: Any) -> str:
    """One line saying what an event's payload says (`data` as decoded from JSON)."""
    d = data if isinstance(data, dict) else {}
    get = d.get
    match type_name:
        case "JobSubmitted":
            text = f"{get('goal', '')!r} in {get('repo')} with {get('agent')}"
        case "TaskCreated":
            deps = get("deps") or []
            text = f"{get('title', '')} ({get('agent')}{', after ' + ', '.join(deps) if deps else ''})"
        case "TaskStarted":
            text = f"attempt {get('attempt')} with {get('agent')} in {get('workdir')}"
        case "AgentSpawned":
            text = f"pid {get('pid')}"
        case "AgentThreadStarted":
            text = f"thread {get('thread_id')}"
        case "AgentMessageReceived":
            text = str(get("text", ""))
        case "AgentCommandExecuted":
            text = f"$ {get('command', '')} -> {get('exit_code')} {get('status', '')}"
        case "AgentFileChanged":
            text = f"{get('kind')} {get('path')}"
        case "AgentErrorReported":
            text = str(get("message", ""))
        case "TokensUsed":
            text = f"in {get('input_tokens')} (cached {get('cached_input_tokens')}) out {get('output_tokens')}"
        case "TaskExited":
            how = f"signal {get('signal')}" if get("signal") else f"exit {get('exit_code')}"
            text = f"{how} after {float(get('duration_s') or 0):.1f} s, {get('log_bytes')} bytes of output"
        case _:
            # Reasons, and any payload this numerusctl does not know yet: its fields, compactly.
            reason = get("reason")
            text = str(reason) if isinstance(reason, str) and len(d) == 1 else _compact(d)
    return cut(text, SUMMARY_WIDTH)


def _compact(d: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in d.items())


def event_line(seq: int | None, wire: bytes) -> str:
    """`seq time type task summary` for one stored event; a damaged one is shown as such, not skipped."""
    where = "-" if seq is None else str(seq)
    try:
        env = decode_wire(wire)
        data = _data_decoder.decode(env.data)
    except (InvalidEvent, msgspec.DecodeError, UnicodeDecodeError) as e:
        return f"{where:>6}  (not a valid event: {cut(str(e), SUMMARY_WIDTH)})"
    return f"{where:>6}  {local_time(env.time)}  {env.type:<22} {env.task or '-':<6} {summary(env.type, data)}".rstrip()


def progress_line(job: str, type_name: str, task: str | None, data: Any) -> str | None:
    """What `run --wait` prints for an event, or None for events not worth a line (tokens, pids)."""
    d = data if isinstance(data, dict) else {}
    reason = f": {d['reason']}" if isinstance(d.get("reason"), str) else ""
    match type_name:
        case "TaskCreated":
            return f"task {task} created: {cut(str(d.get('title', '')), SUMMARY_WIDTH)}"
        case "TaskStarted":
            return f"task {task} started (attempt {d.get('attempt')}, agent {d.get('agent')})"
        case "AgentSpawnFailed":
            return f"task {task} could not start{reason}"
        case "AgentMessageReceived":
            text = str(d.get("text", "")).rstrip("\n")
            return "\n".join(f"{task}> {line}" for line in text.splitlines() or [""])
        case "AgentCommandExecuted":
            return f"{task} $ {cut(str(d.get('command', '')), SUMMARY_WIDTH)} (exit {d.get('exit_code')})"
        case "AgentFileChanged":
            return f"{task} {d.get('kind')} {d.get('path')}"
        case "AgentErrorReported":
            return f"{task} error: {cut(str(d.get('message', '')), SUMMARY_WIDTH)}"
        case "TaskExited":
            how = f"signal {d.get('signal')}" if d.get("signal") else f"code {d.get('exit_code')}"
            return f"task {task} exited with {how} after {float(d.get('duration_s') or 0):.1f} s"
        case "TaskCompleted":
            return f"task {task} completed"
        case "TaskFailed" | "TaskKilled" | "TaskInterrupted":
            return f"task {task} {type_name.removeprefix('Task').lower()}{reason}"
        case "KillRequested":
            return f"kill requested{reason}"
        case "JobCompleted":
            return f"job {job} completed"
        case "JobFailed" | "JobKilled" | "JobInterrupted":
            return f"job {job} {type_name.removeprefix('Job').lower()}{reason}"
    return None
