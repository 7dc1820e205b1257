"""How numerusctl shows events to a person: one-line summaries (`events`) and progress lines (`run --wait`).

Pure functions from an event's type and payload (or its wire bytes) to text, told the same way by both
commands. Only the commands that show events import this module: it needs the envelope and event types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from numerusctl.render import HASH_WIDTH, SHA_WIDTH, SUMMARY_WIDTH, cut, first_line, local_time, plural, removed
from numerusd.protocol.claims import Conflict
from numerusd.protocol.envelope import InvalidEvent, decode_wire
from numerusd.protocol.events import EVENT_TYPES

#: Longest reason on a line of its own (why a task or job ended): cut only so that a line stays a line.
REASON_WIDTH = 1000
#: The type column of `events`: as wide as the longest event type.
TYPE_WIDTH = max(map(len, EVENT_TYPES))

_data_decoder = msgspec.json.Decoder()


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
                text += f" ({plural(get('uncommitted_count'), 'uncommitted change')} left out)"
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
        case "AgentInputSent":
            text = f"{get('size')} bytes typed by {get('by')}"
        case "TokensUsed":
            text = f"in {get('input_tokens')} (cached {get('cached_input_tokens')}) out {get('output_tokens')}"
        case "TaskExited":
            how = f"signal {get('signal')}" if get("signal") else f"exit {get('exit_code')}"
            text = f"{how} after {float(get('duration_s') or 0):.1f} s, {get('log_bytes')} bytes of output"
        case "TaskRetryScheduled":
            text = f"{_retry(d)}: {_reasons(get('reasons'))}"
        case "LocksReleased":
            text = f"locks released ({get('reason') or 'no reason given'})"
        case "SecretRedacted":
            counts = get("counts") or {}
            kinds = ", ".join(f"{count} {kind}" for kind, count in counts.items()) if isinstance(counts, dict) else ""
            text = f"secrets redacted{' in ' + str(get('task')) if get('task') else ''}: {kinds}"
        case "JobCleaned":
            worktrees, branches = len(get("worktrees") or []), len(get("branches") or [])
            text = removed(worktrees, branches, bool(get("logs")), get("freed_bytes") or 0)
        case "JobAccepted":
            where = "{} fast-forwarded to {}" if get("how") == "fast-forward" else "on branch {} at {}"
            text = "accepted: " + where.format(get("branch"), _sha(get("sha")))
            text += f", pushed to {get('pushed')}" if get("pushed") else ""
            text += f", by {get('by')}" if get("by") else ""
        case "JobDiscarded":
            worktrees, branches = len(get("worktrees") or []), len(get("branches") or [])
            text = (
                f"discarded by {get('by') or 'a user'}: {removed(worktrees, branches, False, get('freed_bytes') or 0)}"
            )
        case "MergeStarted":
            text = f"merging {_sha(get('task_sha'))} into {get('integration')} at {_sha(get('parent'))}"
        case "KillRequested" | "TaskKillRequested":
            text = f"kill requested by {get('by')}" if get("by") else str(get("reason") or "kill requested")
        case "JobInterrupted":
            text = str(get("reason")) + (f"; {get('next')}" if get("next") else "")
        case "JobResumed" | "JobReopened":
            text = f"{type_name.removeprefix('Job').lower()} by {get('by') or 'a user'}"
        case "TaskRetryRequested":
            text = f"retry asked by {get('by') or 'a user'}" + (f": {get('reason')}" if get("reason") else "")
        case _:
            # Reasons, and any payload this numerusctl does not know yet: its fields (those set), compactly.
            shown = {key: value for key, value in d.items() if value not in ("", None, False, [], {})}
            reason = get("reason")
            text = str(reason) if isinstance(reason, str) and set(shown) <= {"reason"} else _compact(shown)
    return cut(text, SUMMARY_WIDTH)


def _pipeline_story(type_name: str, d: dict[str, Any]) -> str | None:
    """What a step of the planned pipeline or the daemon's queue did, told the same way by `events` and
    `run --wait` (without the task's id, which each puts in its own place); None for every other event."""
    get = d.get
    match type_name:
        case "JobQueued":
            return "queued: every agent slot of numerusd is taken (max_agents); it starts at its turn"
        case "JobStarted":
            return "out of the queue: its first agent starts"
        case "JobPaused":
            return f"paused by {get('by')}: no new agent starts; those running finish their step"
        case "JobUnpaused":
            return f"goes on, started by {get('by')}"
        case "JobPromoted":
            return f"moved to the front of the queue by {get('by')}"
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
            digest = str(get("hash"))[:HASH_WIDTH]
            return f"plan v{get('version')} accepted: {plural(len(tasks), 'task')} (hash {digest})"
        case "IntegrationBranchCreated":
            return f"integration branch {get('branch')} created at {_sha(get('base_sha'))}"
        case "ClaimProposed":
            paths = [f"{p.get('mode')} {p.get('path')}" for p in _dicts(get("paths"))]
            runs = f"; runs {_listed(get('commands') or [])}" if get("commands") else ""
            return f"claims {_listed(paths) or 'nothing'}{runs}"
        case "ClaimRejected":
            return f"claim attempt {get('attempt')} rejected: {_reasons(get('errors'))}"
        case "ClaimGranted":
            return f"GO ({plural(len(_dicts(get('locks'))), 'lock')})"
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
    return _approval_story(type_name, d)


def _approval_story(type_name: str, d: dict[str, Any]) -> str | None:
    """What an approval, a rejection, an escalation or a budget did; None for every other event."""
    get = d.get
    because = f": {first_line(str(get('reason')), REASON_WIDTH)}" if get("reason") else ""
    match type_name:
        case "ApprovalRequested":
            return f"waits for approval of its {get('gate')}{because}"
        case "JobApproved":
            added = f", {get('added_tokens')} tokens added" if get("added_tokens") else ""
            return f"{get('gate')} approved by {get('by')}{added}"
        case "JobRejected":
            return f"{get('gate')} rejected by {get('by')}{because}"
        case "BudgetExceeded":
            what = f"task {get('task')}" if get("scope") == "task" else "the job"
            return f"over budget: {what} used {get('used')} tokens of its {get('cap')} ({get('action')})"
        case "TaskEscalated":
            return f"escalated from {get('previous')} to {get('agent')}"
        case "TaskApprovalRequested":
            return f"waits for approval{because}"
        case "TaskApproved":
            return f"approved by {get('by')} for one more attempt"
        case "TaskRejected":
            return f"rejected by {get('by')}{because}"
    return None


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
    if type_name == "ApprovalRequested":
        budget = " --add-tokens N" if d.get("gate") == "budget" else ""
        answer = f"numerusctl approve {job}{budget}, or numerusctl reject {job}"
        return cut(f"job {job} waits for approval of its {d.get('gate')}{reason} ({answer})", SUMMARY_WIDTH * 2)
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
        case "KillRequested" | "TaskKillRequested":
            return f"{'job' if task is None else 'task ' + task} kill requested by {d.get('by') or 'a user'}"
        case "JobResumed" | "JobReopened" | "TaskRetryRequested":
            who = "job " + job if task is None else "task " + task
            return f"{who} {summary(type_name, d)}"
        case "JobCompleted":
            return f"job {job} completed"
        case "JobFailed" | "JobKilled" | "JobInterrupted":
            return f"job {job} {type_name.removeprefix('Job').lower()}{reason}"
    return None
