"""How numerusctl shows things to a person: aligned plain-text tables, one-line event summaries, progress lines.

Pure functions from protocol types (or an event's wire bytes) to text; the commands decide where it goes.
Machines get `--json` instead, so nothing here is a format to parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from numerusd.protocol.claims import Conflict
from numerusd.protocol.commands import CleanedJob, CleanReply, JobView, KillReply, PlanReply, TaskView
from numerusd.protocol.envelope import InvalidEvent, decode_wire
from numerusd.protocol.events import EVENT_TYPES

#: Longest one-line summary of an event before it is cut.
SUMMARY_WIDTH = 100
#: Longest goal shown in the jobs table.
GOAL_WIDTH = 60
#: How much of a plan hash or a commit is shown: enough to tell them apart, as git does.
HASH_WIDTH = 8
SHA_WIDTH = 7
#: Longest reason on a line of its own (why a task or job ended): cut only so that a line stays a line.
REASON_WIDTH = 1000
#: The type column of `events`: as wide as the longest event type.
TYPE_WIDTH = max(map(len, EVENT_TYPES))

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


def jobs_table(jobs: Sequence[JobView], now: datetime, total: int = 0, cleanable: int = 0) -> str:
    """The `status` overview: one line per job, newest first as the daemon sent them, how many it left out of
    `total`, and how many ended jobs keep worktrees `clean` would remove."""
    if not jobs:
        return "no jobs"
    rows = [
        [
            job.id,
            job.status,
            job.agent,
            f"{job.tasks_done}/{job.tasks_total}",
            count(job.tokens),
            age(now, job.created),
            cut(job.goal, GOAL_WIDTH),
        ]
        for job in jobs
    ]
    text = table(["JOB", "STATUS", "AGENT", "TASKS", "TOKENS", "AGE", "GOAL"], rows)
    if total > len(jobs):
        text += f"\n\nthe newest {len(jobs)} of {total} jobs; 'numerusctl status --all' lists every one"
    if cleanable:
        text += (
            f"\n\n{_n(cleanable, 'ended job')} {'keeps' if cleanable == 1 else 'keep'} the worktrees of tasks that "
            "did not merge; 'numerusctl clean --ended' removes them"
        )
    return text


def job_detail(job: JobView, now: datetime) -> str:
    """`status JOB`: the job's fields, then its tasks (for a planned job, how each stands in the pipeline)."""
    fields = [
        ("job", job.id),
        ("status", job.status + (f" ({job.reason})" if job.reason else "")),
        ("goal", job.goal),
        ("repo", job.repo),
        ("agent", job.agent),
    ]
    if job.planned:
        fields += _plan_fields(job)
    fields += [
        ("created", f"{local_time(job.created)} ({age(now, job.created)} ago)"),
        ("updated", f"{local_time(job.updated)} ({age(now, job.updated)} ago)"),
        ("events", str(job.events)),
    ]
    if job.cleaned:
        removed = "worktrees, task branches and logs" if job.logs_removed else "worktrees and task branches"
        fields.append(("cleaned", f"{removed} removed ('numerusctl clean')"))
    if job.leftovers:
        kept = f"worktrees and branches of {', '.join(job.leftovers)} ('numerusctl clean {job.id}' removes them)"
        fields.append(("kept", kept))
    head = "\n".join(f"{name:<8} {value}" for name, value in fields)
    if not job.tasks:
        return head + "\n\nno tasks yet"
    if job.planned:
        return head + "\n\n" + _planned_tasks(job.tasks)
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


def _plan_fields(job: JobView) -> list[tuple[str, str]]:
    """The lines `status JOB` adds for a planned job: its plan, its integration branch, its limits."""
    if job.plan_hash is None:
        plan = "none yet (the planner is at work)" if job.status == "planning" else "none"
    else:
        plan = f"v{job.plan_version}, hash {job.plan_hash[:HASH_WIDTH]} ('numerusctl plan {job.id}' draws it)"
    branch = "not yet created" if job.integration is None else job.integration
    if job.base_sha:
        branch += f" (from {job.base_sha[:SHA_WIDTH]})"
    own = job.input_tokens + job.output_tokens
    tokens = count(job.tokens) + f" ({count(own)} planning)"
    return [("plan", plan), ("branch", branch), ("parallel", str(job.parallel)), ("tokens", tokens)]


def _planned_tasks(tasks: Sequence[TaskView]) -> str:
    """A planned job's tasks: status, attempt and dependencies, then a line on each that failed or retries."""
    rows = [
        [
            t.id,
            _task_status(t),
            str(t.attempt),
            ", ".join(t.deps) or "-",
            t.agent,
            count(_tokens(t)),
            cut(t.title, GOAL_WIDTH),
        ]
        for t in tasks
    ]
    text = table(["TASK", "STATUS", "ATTEMPT", "AFTER", "AGENT", "TOKENS", "TITLE"], rows)
    notes = [f"{t.id}: {note}" for t in tasks if (note := _task_note(t))]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _task_status(task: TaskView) -> str:
    if task.status == "waiting" and task.holders:
        return f"waiting for {', '.join(task.holders)}"
    return task.status


def _task_note(task: TaskView) -> str | None:
    """Why a task is retrying, failed, never ran or cannot merge yet, in one line; None for a task doing fine."""
    if task.status in ("retrying", "failed") and task.feedback:
        more = len(task.feedback) - 1
        return f"{task.status}: {first_line(task.feedback[0])}" + (f" (+{more} more)" if more else "")
    if task.status in ("failed", "skipped", "interrupted") and task.reason:
        return f"{task.status}: {first_line(task.reason)}"
    if task.status == "merging" and task.reason:
        return f"merge waits: {first_line(task.reason)}"
    return None


def first_line(text: str, width: int = SUMMARY_WIDTH) -> str:
    """The first non-empty line of a message (a check's reason is its command, then the output), cut to `width`.

    A line ending with ':' announces what followed it, so the colon goes with what was left out.
    """
    line = next((line for line in text.splitlines() if line.strip()), "")
    return cut(line.rstrip().removesuffix(":"), width)


def plan_text(reply: PlanReply) -> str:
    """`plan JOB`: which plan, the daemon's drawing of it, then where each task stands."""
    head = f"plan v{reply.version} of job {reply.job} (hash {reply.hash[:HASH_WIDTH]})"
    statuses = table(["TASK", "STATUS"], [[task, status] for task, status in reply.statuses.items()])
    drawing = f"{head}\n{reply.rendered.rstrip()}"
    return f"{drawing}\n\n{statuses}" if reply.statuses else drawing


def kill_text(reply: KillReply) -> str:
    """What `kill` did."""
    if not reply.tasks:
        return f"job {reply.job}: kill recorded; no agent was running"
    return f"job {reply.job}: stopping {', '.join(reply.tasks)}"


def clean_text(reply: CleanReply) -> str:
    """What `clean` removed, a line per job."""
    if not reply.jobs:
        return "no ended job left anything to remove"
    return "\n".join(_cleaned_line(job) for job in reply.jobs)


def _cleaned_line(job: CleanedJob) -> str:
    line = f"job {job.job}: {_removed(len(job.worktrees), len(job.branches), job.logs, job.freed_bytes)}"
    return line + (f"; kept its result, branch {job.kept}" if job.kept else "")


def _removed(worktrees: int, branches: int, logs: bool, freed_bytes: int) -> str:
    """`removed 1 worktree, 2 branches, the logs (3.0 MiB)`, or `nothing left to remove`."""
    parts = [_n(n, noun) for n, noun in ((worktrees, "worktree"), (branches, "branch")) if n]
    parts += ["the logs"] if logs else []
    return f"removed {', '.join(parts)} ({_size(freed_bytes)})" if parts else "nothing left to remove"


def _size(size: int) -> str:
    """`1,234 bytes`, `5.1 MiB`: a size as people read it."""
    if size < 1024:
        return f"{size:,} bytes"
    value, units = size / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:,.1f} {units[0]}"


def summary(type_name: str, data: Any) -> str:
    """One line saying what an event's payload says (`data` as decoded from JSON)."""
    d = data if isinstance(data, dict) else {}
    get = d.get
    story = _pipeline_story(type_name, d)
    if story is not None:
        return cut(story, SUMMARY_WIDTH)
    match type_name:
        case "JobSubmitted":
            text = f"{get('goal', '')!r} in {get('repo')} with {get('agent')}"
            if get("plan"):
                text += f", planned, {get('parallel')} at once"
            if get("base_sha"):
                text += f", from {_sha(get('base_sha'))}"
            if get("uncommitted_count") is None and "uncommitted_count" in d:
                text += " (uncommitted changes: not known)"
            elif get("uncommitted_count"):
                text += f" ({_n(get('uncommitted_count'), 'uncommitted change')} left out)"
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
        case "TaskRetryScheduled":
            text = f"{_retry(d)}: {_reasons(get('reasons'))}"
        case "LocksReleased":
            text = f"locks released ({get('reason') or 'no reason given'})"
        case "JobCleaned":
            worktrees, branches = len(get("worktrees") or []), len(get("branches") or [])
            text = _removed(worktrees, branches, bool(get("logs")), get("freed_bytes") or 0)
        case "MergeStarted":
            text = f"merging {_sha(get('task_sha'))} into {get('integration')} at {_sha(get('parent'))}"
        case _:
            # Reasons, and any payload this numerusctl does not know yet: its fields, compactly.
            reason = get("reason")
            text = str(reason) if isinstance(reason, str) and len(d) == 1 else _compact(d)
    return cut(text, SUMMARY_WIDTH)


def _pipeline_story(type_name: str, d: dict[str, Any]) -> str | None:
    """What a step of the planned pipeline did, told the same way by `events` and `run --wait` (without the
    task's id, which each puts in its own place); None for every other event."""
    get = d.get
    match type_name:
        case "ReplanRequested":
            return f"replanning: {get('task')} failed for good ({_reasons(get('reason'))})"
        case "ReplanFailed":
            return f"no revised plan, going on with the one there is: {_reasons(get('reason'))}"
        case "PlanRequested":
            return f"plan attempt {get('attempt')}: asking the {get('role', 'planner')} ({get('agent')})"
        case "PlanRejected":
            return f"plan attempt {get('attempt')} rejected: {_reasons(get('errors'))}"
        case "PlanValidated":
            plan = get("plan") if isinstance(get("plan"), dict) else {}
            tasks = plan.get("tasks") if isinstance(plan.get("tasks"), list) else []
            return f"plan v{get('version')} accepted: {_n(len(tasks), 'task')} (hash {str(get('hash'))[:HASH_WIDTH]})"
        case "IntegrationBranchCreated":
            return f"integration branch {get('branch')} created at {_sha(get('base_sha'))}"
        case "ClaimProposed":
            paths = [f"{p.get('mode')} {p.get('path')}" for p in _dicts(get("paths"))]
            runs = f"; runs {_listed(get('commands') or [])}" if get("commands") else ""
            return f"claims {_listed(paths) or 'nothing'}{runs}"
        case "ClaimRejected":
            return f"claim attempt {get('attempt')} rejected: {_reasons(get('errors'))}"
        case "ClaimGranted":
            return f"GO ({_n(len(_dicts(get('locks'))), 'lock')})"
        case "ClaimDenied":
            return f"NO GO: {_conflicts(d)}"
        case "WorktreeCreated":
            # The path is what a reader wants (to look at the work); the branch is numerus/<job>/<task>.
            return f"works in {get('path')}, from {_sha(get('base_sha'))}"
        case "TaskWorkCommitted":
            changes = get("changes") or []
            return f"committed {_sha(get('commit'))}: {_listed(changes) if changes else 'no changes'}"
        case "ClaimViolated":
            return f"changed outside its claim: {_reasons(get('violations'))}"
        case "CheckCompleted":
            return _check(d)
        case "ReviewCompleted":
            verdict = {"pass": "passed", "fail": "failed"}.get(str(get("verdict")), f"answered {get('verdict')!r}")
            reasons = get("reasons") or []
            return f"review {verdict}" + (f": {_reasons(reasons)}" if reasons else "")
        case "GatePassed":
            return "gate passed"
        case "GateFailed":
            return f"gate failed: {_reasons(get('reasons'))}"
        case "TaskMerged":
            branch = get("integration") or "the integration branch"
            if get("created") is False:
                return f"already in {branch} at {_sha(get('sha'))} (nothing new to merge)"
            return f"merged into {branch} at {_sha(get('sha'))}"
        case "MergeConflicted":
            return f"merge conflicts on {_listed(get('paths') or [])}; retried from the new tip"
        case "MergeBlocked":
            return f"merge waits (tried again every {float(get('retry_s') or 0):g} s): {get('reason')}"
    return None


def _n(n: int, noun: str) -> str:
    """`1 branch`, `2 branches`, `0 tasks`."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith(('ch', 'sh', 's', 'x')) else 's'}"


def _sha(value: Any) -> str:
    return str(value)[:SHA_WIDTH] if value else "?"


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _listed(items: Sequence[Any], shown: int = 3) -> str:
    """`a, b, c (+2 more)`."""
    more = len(items) - shown
    return ", ".join(str(item) for item in items[:shown]) + (f" (+{more} more)" if more > 0 else "")


def _reasons(value: Any) -> str:
    """A list of reasons in one line: the first line of each (a check's reason goes on with its output)."""
    reasons = value if isinstance(value, list) else [value] if value else []
    return "; ".join(first_line(str(reason), REASON_WIDTH) for reason in reasons) or "no reason given"


def _conflicts(d: dict[str, Any]) -> str:
    """`src/app.py held by t1 (modify)`, as the protocol's `Conflict` says it; the holders if unreadable."""
    try:
        conflicts = msgspec.convert(d.get("conflicts"), tuple[Conflict, ...])
    except msgspec.ValidationError:
        conflicts = ()
    if conflicts:
        return "; ".join(str(conflict) for conflict in conflicts)
    return f"waiting for {', '.join(map(str, d.get('holders') or [])) or 'another task'}"


def _check(d: dict[str, Any]) -> str:
    command, exit_code = d.get("command", ""), d.get("exit_code")
    took = f"{float(d.get('duration_s') or 0):.1f} s"
    if exit_code == 0:
        return f"check {command!r} passed ({took})"
    how = f"timed out after {took}" if exit_code is None else f"failed (exit {exit_code})"
    last = next((line.strip() for line in reversed(str(d.get("output", "")).splitlines()) if line.strip()), "")
    return f"check {command!r} {how}" + (f": {last}" if last else "")


def _retry(d: dict[str, Any]) -> str:
    return f"retry {d.get('next_attempt')} in {float(d.get('delay_s') or 0):g}s"


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
    text = summary(env.type, data)
    return f"{where:>6}  {local_time(env.time)}  {env.type:<{TYPE_WIDTH}} {env.task or '-':<6} {text}".rstrip()


def progress_line(job: str, type_name: str, task: str | None, data: Any) -> str | None:
    """What `run --wait` prints for an event, or None for events not worth a line (tokens, pids)."""
    d = data if isinstance(data, dict) else {}
    reason = f": {first_line(d['reason'], REASON_WIDTH)}" if isinstance(d.get("reason"), str) else ""
    # LocksReleased and MergeStarted tell no story of their own here: the line after them says what came of it.
    story = _pipeline_story(type_name, d)
    if story is not None:
        return cut(story if task is None else f"{task} {story}", SUMMARY_WIDTH)
    match type_name:
        case "TaskCreated":
            deps = d.get("deps") or []
            after = f" (after {', '.join(map(str, deps))})" if deps else ""
            return f"task {task} created: {cut(str(d.get('title', '')), SUMMARY_WIDTH)}{after}"
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
        case "TaskRetryScheduled":
            return f"{task} {_retry(d)}"
        case "TaskCompleted":
            return f"task {task} completed"
        case "TaskFailed" | "TaskKilled" | "TaskInterrupted" | "TaskSkipped":
            return f"task {task} {type_name.removeprefix('Task').lower()}{reason}"
        case "KillRequested":
            return f"kill requested{reason}"
        case "JobCompleted":
            return f"job {job} completed"
        case "JobFailed" | "JobKilled" | "JobInterrupted":
            return f"job {job} {type_name.removeprefix('Job').lower()}{reason}"
    return None
