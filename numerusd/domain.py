"""The pure domain: job and task state as a fold of events, and commands decided against that state.

`evolve(state, event) -> state` is the only way state changes; the daemon, the projector, a restart and an
auditor's replay all use it, so none of them can drift from the others. The `decide_*` functions take state and
a command or an observed outcome and return the events to append; they never perform I/O, read a clock or
touch NATS. Events are returned as `(task id or None, payload)` pairs; the event store adds the envelope.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TypeVar

import msgspec

from numerusd import locks
from numerusd.errors import BadRequest, CommandRefused
from numerusd.protocol.claims import ClaimedPath, Lock
from numerusd.protocol.commands import JOB_DONE, JobView, TaskView
from numerusd.protocol.envelope import Envelope, WireEnvelope, typed
from numerusd.protocol.events import (
    UNCOMMITTED_NAMED,
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    AgentSpawned,
    AgentSpawnFailed,
    AgentThreadStarted,
    CheckCompleted,
    ClaimDenied,
    ClaimGranted,
    ClaimProposed,
    ClaimRejected,
    ClaimViolated,
    EventData,
    GateFailed,
    GatePassed,
    IntegrationBranchCreated,
    JobCleaned,
    JobCompleted,
    JobFailed,
    JobInterrupted,
    JobKilled,
    JobSubmitted,
    KillRequested,
    LocksReleased,
    MergeBlocked,
    MergeConflicted,
    MergeStarted,
    PlanRejected,
    PlanRequested,
    PlanValidated,
    ReplanFailed,
    ReplanRequested,
    ReviewCompleted,
    TaskCompleted,
    TaskCreated,
    TaskExited,
    TaskFailed,
    TaskInterrupted,
    TaskKilled,
    TaskMerged,
    TaskRetryScheduled,
    TaskSkipped,
    TaskStarted,
    TaskWorkCommitted,
    TokensUsed,
    Usage,
    WorktreeCreated,
)
from numerusd.protocol.plan import FileIntent, Plan

#: What `decide_*` returns: payloads with the task they belong to (None for job events).
Decision = list[tuple[str | None, EventData]]

TASK_DONE = frozenset({"completed", "failed", "killed", "interrupted", "skipped"})


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One task as its events made it."""

    id: str
    title: str
    instructions: str
    agent: str
    role: str
    deps: tuple[str, ...]
    intents: tuple[FileIntent, ...] = ()
    #: pending, waiting (NO GO), granted (GO), running, checking, retrying, merging, then one of TASK_DONE.
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
    #: The claim the executor made (paths and commands) and, while it waits, who holds what it wants.
    claim: tuple[ClaimedPath, ...] | None = None
    commands: tuple[str, ...] = ()
    claim_attempts: int = 0
    holders: tuple[str, ...] = ()
    worktree: str | None = None
    branch: str | None = None
    base_sha: str | None = None
    commit: str | None = None
    #: Why the last attempt failed (gate, checks, review, merge): told to the next attempt.
    feedback: tuple[str, ...] = ()
    merge_parent: str | None = None
    merged_sha: str | None = None


class JobState(msgspec.Struct, frozen=True, kw_only=True):
    """One job as its events made it; `tasks` keeps creation order."""

    id: str
    goal: str
    repo: str
    agent: str
    #: planning (the planner is asked), running, then one of JOB_DONE.
    status: str = "running"
    reason: str | None = None
    kill_requested: bool = False
    created: datetime
    updated: datetime
    events: int = 1
    last_event_id: str = ""
    tasks: dict[str, TaskState] = {}
    #: The pipeline's settings, as submitted (see JobSubmitted).
    planned: bool = False
    roles: dict[str, str] = {}
    parallel: int = 1
    checks: tuple[str, ...] = ()
    review: bool = True
    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_replans: int = 0
    replans: int = 0
    claims: str = "agent"
    #: The task whose failure asked for the last revised plan, and why it failed.
    replan_for: tuple[str, str] | None = None
    plan: Plan | None = None
    plan_version: int = 0
    plan_hash: str | None = None
    plan_attempts: int = 0
    plan_errors: tuple[str, ...] = ()
    integration: str | None = None
    #: The commit the job works from (recorded at submission; older jobs: when the integration branch was made).
    base_sha: str | None = None
    #: Where the integration branch is: its base, then each merge's commit (Numerus is its only writer).
    integration_tip: str | None = None
    #: `numerusctl clean` removed its worktrees and task branches; with `logs_removed`, its logs too.
    cleaned: bool = False
    logs_removed: bool = False
    #: The lock table as plain data (holders and the FIFO queue of waiting claims); `lock_table()` builds it.
    lock_holds: dict[str, tuple[Lock, ...]] = {}
    lock_queue: dict[str, tuple[Lock, ...]] = {}
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


#: A state that counts tokens: a job or a task.
_Counted = TypeVar("_Counted", JobState, TaskState)


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
            status="planning" if data.plan else "running",
            created=event.time,
            updated=event.time,
            last_event_id=event.id,
            planned=data.plan,
            roles=data.roles,
            parallel=data.parallel,
            checks=data.checks,
            review=data.review,
            max_attempts=data.max_attempts,
            backoff_s=data.backoff_s,
            max_replans=data.max_replans,
            claims=data.claims,
            base_sha=data.base_sha,
        )
    job = msgspec.structs.replace(state, updated=event.time, events=state.events + 1, last_event_id=event.id)
    if event.task is not None:
        return _evolve_task(job, event.task, event.time, data)
    replace = msgspec.structs.replace
    match data:
        case KillRequested():
            return replace(job, kill_requested=True)
        case ReplanRequested(task=failed, reason=reason):
            return replace(
                job,
                status="replanning",
                replans=job.replans + 1,
                replan_for=(failed, reason),
                plan_attempts=0,
                plan_errors=(),
            )
        case ReplanFailed():
            return replace(job, status="running")
        case PlanRequested(attempt=attempt):
            return replace(job, plan_attempts=attempt)
        case PlanRejected(errors=errors, usage=usage):
            return _add_usage(replace(job, plan_errors=errors), usage)
        case PlanValidated(version=version, hash=plan_hash, plan=plan, usage=usage):
            job = replace(job, plan=plan, plan_version=version, plan_hash=plan_hash, plan_errors=(), status="running")
            return _add_usage(job, usage)
        case IntegrationBranchCreated(branch=branch, base_sha=base_sha):
            return replace(job, integration=branch, base_sha=base_sha, integration_tip=base_sha)
        case JobCompleted():
            return replace(job, status="completed")
        case JobFailed(reason=reason):
            return replace(job, status="failed", reason=reason)
        case JobKilled(reason=reason):
            return replace(job, status="killed", reason=reason)
        case JobInterrupted(reason=reason):
            return replace(job, status="interrupted", reason=reason)
        case JobCleaned(logs=logs):
            return replace(job, cleaned=True, logs_removed=job.logs_removed or logs)
    return job


def _add_usage(state: _Counted, usage: Usage) -> _Counted:
    """`state` (a job: planner and queen calls; a task: claims and reviews) with the call's tokens added."""
    if usage == Usage():
        return state
    return msgspec.structs.replace(
        state,
        input_tokens=state.input_tokens + usage.input_tokens,
        cached_input_tokens=state.cached_input_tokens + usage.cached_input_tokens,
        output_tokens=state.output_tokens + usage.output_tokens,
    )


#: Tables recently built or folded, by the identity of the two dicts a JobState holds them as. Building a table
#: indexes every lock, so a job of many tasks would pay it at every claim event; the dicts are never mutated
#: (states are immutable), and each entry keeps its dicts alive, so an id cannot be reused while cached.
_TABLES: dict[tuple[int, int], tuple[dict[str, tuple[Lock, ...]], dict[str, tuple[Lock, ...]], locks.LockTable]] = {}
_TABLES_KEPT = 64
_TABLES_LOCK = threading.Lock()


def lock_table(job: JobState) -> locks.LockTable:
    """The job's lock table, built from the plain data its events folded (or found where it was last built)."""
    cached = _TABLES.get((id(job.lock_holds), id(job.lock_queue)))
    if cached is not None and cached[0] is job.lock_holds and cached[1] is job.lock_queue:
        return cached[2]
    table = locks.LockTable(job.lock_holds, job.lock_queue)
    _remember(job.lock_holds, job.lock_queue, table)
    return table


def _remember(holds: dict[str, tuple[Lock, ...]], queue: dict[str, tuple[Lock, ...]], table: locks.LockTable) -> None:
    with _TABLES_LOCK:  # the projector may fold in another thread
        if len(_TABLES) >= _TABLES_KEPT:
            del _TABLES[next(iter(_TABLES))]
        _TABLES[(id(holds), id(queue))] = (holds, queue, table)


def _with_table(job: JobState, table: locks.LockTable) -> JobState:
    queue = {task: claim for task in table.waiting if (claim := table.queued_claim(task)) is not None}
    holds = dict(table.holders)
    _remember(holds, queue, table)
    return msgspec.structs.replace(job, lock_holds=holds, lock_queue=queue)


def _evolve_task(job: JobState, task_id: str, time: datetime, data: EventData) -> JobState:
    if isinstance(data, TaskCreated):
        task = TaskState(
            id=task_id,
            title=data.title,
            instructions=data.instructions,
            agent=data.agent,
            role=data.role,
            deps=data.deps,
            intents=data.intents,
        )
        return msgspec.structs.replace(job, tasks={**job.tasks, task_id: task})
    task = job.tasks.get(task_id)
    if task is None or type(data) in _NO_TASK_STATE:
        return job  # the most frequent events (what agents say and do) are settled before the long match
    replace = msgspec.structs.replace
    if type(data) is TokensUsed:  # the most frequent one with state (a replay spends its time on it): no match
        task = replace(
            task,
            input_tokens=task.input_tokens + data.input_tokens,
            cached_input_tokens=task.cached_input_tokens + data.cached_input_tokens,
            output_tokens=task.output_tokens + data.output_tokens,
        )
        return replace(job, tasks={**job.tasks, task_id: task})
    match data:
        case ClaimProposed(attempt=attempt, paths=paths, commands=commands, usage=usage):
            task = _add_usage(replace(task, claim=paths, commands=commands, claim_attempts=attempt), usage)
        case ClaimRejected(attempt=attempt, errors=errors, usage=usage):
            task = _add_usage(replace(task, claim_attempts=attempt, feedback=errors), usage)
        case ClaimGranted(locks=granted):
            job = _with_table(job, locks.apply_granted(lock_table(job), task_id, granted))
            if task_id in job.lock_holds:
                task = replace(task, status="granted", holders=())
        case ClaimDenied(locks=wanted, holders=holders):
            job = _with_table(job, locks.apply_denied(lock_table(job), task_id, wanted))
            if task_id in job.lock_queue:
                task = replace(task, status="waiting", holders=holders)
        case LocksReleased():
            job = _with_table(job, locks.release(lock_table(job), task_id))
        case WorktreeCreated(path=path, branch=branch, base_sha=base_sha):
            task = replace(task, worktree=path, branch=branch, base_sha=base_sha)
        case TaskWorkCommitted(commit=commit):
            task = replace(task, commit=commit, status="checking")
        case ClaimViolated() | CheckCompleted():
            return job  # the reasons reach the state through GateFailed
        case ReviewCompleted(usage=usage):
            task = _add_usage(task, usage)
        case GatePassed():
            task = replace(task, status="merging", feedback=())
        case GateFailed(reasons=reasons):
            task = replace(task, feedback=reasons)
        case TaskRetryScheduled(reasons=reasons):
            task = replace(task, status="retrying", feedback=reasons)
        case MergeStarted(parent=parent):
            task = replace(task, status="merging", merge_parent=parent)
        case MergeBlocked(reason=reason):
            task = replace(task, reason=reason)  # it stays merging, and says what it waits for
        case TaskMerged(sha=sha):
            task = replace(task, merged_sha=sha, reason=None)
            job = replace(job, integration_tip=sha)
        case MergeConflicted(paths=paths):
            task = replace(task, feedback=(f"merging into the integration branch conflicts on {', '.join(paths)}",))
        case TaskSkipped(reason=reason):
            task = replace(task, status="skipped", reason=reason, ended=task.ended or time)
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
    return msgspec.structs.replace(job, tasks={**job.tasks, task_id: task})


#: Task events with no state of their own: recorded in the stream and the event index only.
_NO_TASK_STATE = frozenset({AgentMessageReceived, AgentCommandExecuted, AgentFileChanged, AgentErrorReported})
#: The names of the event types a job only counts, the most frequent ones (what agents say and do).
_COUNTED_ONLY = frozenset(cls.__name__ for cls in _NO_TASK_STATE)


def evolve_untyped(state: JobState | None, event: WireEnvelope) -> JobState:
    """`evolve` for an event whose payload is still raw bytes (`envelope.open_untyped`), decoded only if the job
    needs it: most events are only counted. Raises InvalidEvent when the payload does not fit its type."""
    if event.type not in _COUNTED_ONLY:
        return evolve(state, typed(event))
    if state is None:
        raise ValueError(f"job {event.job} starts with {event.type}, not JobSubmitted")
    return msgspec.structs.replace(state, updated=event.time, events=state.events + 1, last_event_id=event.id)


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
        raise BadRequest("the goal is empty: say what the agent should do, e.g. numerusctl run 'fix the tests'")
    title = goal.strip().splitlines()[0][:80]
    return [
        (None, JobSubmitted(goal=goal, repo=repo, agent=agent)),
        ("t1", TaskCreated(title=title, instructions=goal, agent=agent)),
    ]


def check_cleanable(job: JobState) -> None:
    """Refuse to clean a job that has not ended: its agents and merges still use its worktrees and branches."""
    if job.status not in JOB_DONE:
        raise CommandRefused(
            f"job {job.id} is {job.status}: its tasks still use their worktrees; wait for it to end, or "
            f"'numerusctl kill {job.id}' first. Nothing was removed",
            job=job.id,
        )


def decide_cleaned(job: JobState, cleaned: JobCleaned) -> Decision:
    """Record what `clean` removed: nothing when it removed nothing from a job already cleaned."""
    check_cleanable(job)
    if job.cleaned and not (cleaned.worktrees or cleaned.branches or cleaned.logs):
        return []
    return [(None, cleaned)]


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
        elif task.status == "waiting":
            events += [(task.id, LocksReleased(reason="killed")), (task.id, TaskKilled())]
    busy = [task for task in job.tasks.values() if task.status in ACTIVE and task.status != "waiting"]
    if not busy and job.status not in ("planning", "replanning"):
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
    """After a restart: tasks whose agent was running are `interrupted`, never completed, and so is the job.

    A planned job is interrupted whatever its tasks were doing (planning, waiting for a lock, being checked):
    its pipeline lived in the daemon that stopped. A single-task job whose task had not started yet is not.
    """
    if job.status in JOB_DONE:
        return []
    events: Decision = [
        (task.id, TaskInterrupted(reason=reason)) for task in job.tasks.values() if task.status in ACTIVE
    ]
    if not events and not job.planned:
        return []
    if job.kill_requested:
        return [(task_id, TaskKilled()) for task_id, _ in events] + [(None, JobKilled())]
    return [*events, (None, JobInterrupted(reason=reason))]


# --- decide: the pipeline of a planned job -------------------------------------------------------------------

#: Task statuses in which the daemon is doing something for the task (an agent, git, a check) or it holds or
#: waits for locks: a restart interrupts them.
ACTIVE = frozenset({"running", "waiting", "granted", "checking", "retrying", "merging"})


def decide_submit(
    goal: str,
    repo: str,
    roles: dict[str, str],
    *,
    parallel: int,
    checks: tuple[str, ...],
    review: bool,
    max_attempts: int,
    backoff_s: tuple[float, ...],
    max_replans: int = 0,
    claims: str = "agent",
    base_sha: str | None = None,
    uncommitted: Sequence[str] | None = (),
) -> Decision:
    """A new planned job, working from `base_sha` without the `uncommitted` changes (None: not known): the
    planner is asked next."""
    if not goal.strip():
        raise BadRequest("the goal is empty: say what the agents should do, e.g. numerusctl run 'fix the tests'")
    return [
        (
            None,
            JobSubmitted(
                goal=goal,
                repo=repo,
                agent=roles["executor"],
                plan=True,
                roles=roles,
                parallel=parallel,
                checks=checks,
                review=review,
                max_attempts=max_attempts,
                backoff_s=backoff_s,
                max_replans=max_replans,
                claims=claims,
                base_sha=base_sha,
                uncommitted_count=None if uncommitted is None else len(uncommitted),
                uncommitted=tuple((uncommitted or ())[:UNCOMMITTED_NAMED]),
            ),
        )
    ]


def decide_plan_rejected(
    job: JobState, attempt: int, errors: list[str], answer: str, usage: Usage, max_attempts: int
) -> Decision:
    """The planner's answer is no plan; after `max_attempts` the job fails with the reasons."""
    events: Decision = [(None, PlanRejected(attempt=attempt, errors=tuple(errors), answer=answer[:8192], usage=usage))]
    if attempt >= max_attempts:
        shown = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
        events.append((None, JobFailed(reason=f"no valid plan after {attempt} attempts: {shown}")))
    return events


def replan_errors(job: JobState, plan: Plan) -> list[str]:
    """Why the queen's revised plan cannot replace the current one (beyond `validate_plan`'s checks).

    A revised plan lists the whole job again: completed and running tasks stay as they are (listed so that
    others may depend on them), pending ones may be kept, changed or dropped, new ones added; but a task that
    ended without completing (failed, skipped, killed) cannot come back under its id (its branch and events are
    its own): a new task needs a new id.
    """
    errors = []
    for task in plan.tasks:
        existing = job.tasks.get(task.id)
        if existing is not None and existing.status in TASK_DONE and existing.status != "completed":
            errors.append(
                f"task {task.id} already {existing.status}: give the task that replaces it a new id, e.g. {task.id}b"
            )
    return errors


def decide_plan_validated(job: JobState, attempt: int, plan: Plan, plan_hash: str, usage: Usage) -> Decision:
    """A valid plan: recorded with its hash, then one TaskCreated per task to do, in the plan's order.

    For a revised plan (the queen's), completed tasks are left as they are, pending tasks it leaves out are
    dropped (skipped), and pending tasks it lists are created again with their new instructions and deps.
    """
    executor = job.roles.get("executor", job.agent)
    version = job.plan_version + 1
    events: Decision = [(None, PlanValidated(version=version, attempt=attempt, hash=plan_hash, plan=plan, usage=usage))]
    listed = {task.id for task in plan.tasks}
    for task in job.tasks.values():
        if task.status == "pending" and task.id not in listed:
            events.append((task.id, TaskSkipped(reason=f"dropped by plan v{version}")))
    for task in plan.tasks:
        existing = job.tasks.get(task.id)
        if existing is not None and existing.status != "pending":
            continue  # completed, or under way: it stays as it is
        created = TaskCreated(
            title=task.title,
            instructions=task.instructions,
            agent=executor,
            role=task.role,
            deps=task.deps,
            intents=task.intents,
        )
        events.append((task.id, created))
    return events


def decide_claim(job: JobState, task_id: str, wanted: tuple[Lock, ...]) -> Decision:
    """GO or NO GO for the task's claim against the job's lock table."""
    decision = locks.arbitrate(lock_table(job), task_id, wanted)
    if isinstance(decision, locks.Granted):
        return [(task_id, ClaimGranted(locks=decision.locks))]
    return [(task_id, ClaimDenied(locks=decision.locks, holders=decision.holders, conflicts=tuple(decision.conflicts)))]


def _release(job: JobState, task_id: str, reason: str) -> Decision:
    """The task gives its locks back (or leaves the queue), and every waiting task whose way that clears is
    granted in the same decision, in FIFO order, with the claim it waits with. Nothing when it holds nothing."""
    table = lock_table(job)
    if task_id not in table.holders and table.queued_claim(task_id) is None:
        return []
    table = locks.release(table, task_id)
    events: Decision = [(task_id, LocksReleased(reason=reason))]
    for woken in locks.wakeable(table):
        claim = table.queued_claim(woken)
        if claim is not None:
            events.append((woken, ClaimGranted(locks=claim)))
    return events


def decide_attempt_failed(job: JobState, task_id: str, reasons: tuple[str, ...]) -> Decision:
    """An attempt failed: retry after the next backoff pause, or, with no attempt left, fail the task.

    A task that fails for good while the job may still be replanned asks the queen (`ReplanRequested`) instead
    of failing the tasks that depend on it.
    """
    task = job.tasks[task_id]
    if job.kill_requested:
        return decide_task_killed(job, task_id)
    if task.attempt < job.max_attempts:
        pauses = job.backoff_s or (0.0,)
        delay = pauses[min(max(task.attempt, 1), len(pauses)) - 1]  # 1 s after the first, 2 s after the second…
        return [(task_id, TaskRetryScheduled(next_attempt=task.attempt + 1, delay_s=delay, reasons=reasons))]
    reason = f"failed after {task.attempt} attempt{'s' if task.attempt != 1 else ''}: {'; '.join(reasons)}"
    if job.replans < job.max_replans and job.status == "running":
        failed = (task_id, TaskFailed(reason=reason[:4000]))
        return [*_release(job, task_id, "failed"), failed, (None, ReplanRequested(task=task_id, reason=reason[:4000]))]
    return decide_task_failed(job, task_id, reason)


def decide_settled(job: JobState) -> Decision:
    """Every task of the job has ended: the job's end, if no decision recorded it yet."""
    if job.status in JOB_DONE:
        return []
    return _job_outcome(job, {})


def decide_stalled(job: JobState, idle_s: float) -> Decision:
    """No task has completed for `idle_s` seconds: ask the queen for a revised plan, if she may still be asked."""
    if job.status != "running" or job.kill_requested or job.replans >= job.max_replans:
        return []
    return [(None, ReplanRequested(task="", reason=f"no task completed for {idle_s:g} s"))]


def decide_replan_failed(job: JobState, reason: str) -> Decision:
    """The queen gave no usable plan: the failed tasks' dependents are skipped, and the job may end."""
    events: Decision = [(None, ReplanFailed(reason=reason))]
    job = msgspec.structs.replace(job, status="running")
    changed: dict[str, str] = {}
    for task in job.tasks.values():
        if task.status == "failed":
            for skipped in _dependents(job, task.id):
                if job.tasks[skipped].status == "pending" and skipped not in changed:
                    events.append((skipped, TaskSkipped(reason=f"depends on {task.id}, which failed")))
                    changed[skipped] = "skipped"
    outcome = _job_outcome(job, changed)
    if outcome and isinstance(outcome[0][1], JobFailed):
        outcome = [(None, JobFailed(reason=f"{outcome[0][1].reason}; {reason}"))]
    return events + outcome


def decide_task_failed(job: JobState, task_id: str, reason: str) -> Decision:
    """The task fails for good: its locks go, the tasks that depend on it are skipped, maybe the job ends."""
    events: Decision = [*_release(job, task_id, "failed"), (task_id, TaskFailed(reason=reason[:4000]))]
    changed = {task_id: "failed"}
    for skipped in _dependents(job, task_id):
        if job.tasks[skipped].status == "pending":
            events.append((skipped, TaskSkipped(reason=f"depends on {task_id}, which failed")))
            changed[skipped] = "skipped"
    return events + _job_outcome(job, changed)


def decide_task_killed(job: JobState, task_id: str) -> Decision:
    """The job is being killed: the task stops where it is and gives its locks back."""
    events: Decision = [*_release(job, task_id, "killed"), (task_id, TaskKilled())]
    return events + _job_outcome(job, {task_id: "killed"})


def decide_skip(job: JobState, task_id: str, reason: str) -> Decision:
    """The task will never run (a dependency did not complete)."""
    if job.tasks[task_id].status != "pending":
        return []
    return [(task_id, TaskSkipped(reason=reason)), *_job_outcome(job, {task_id: "skipped"})]


def decide_merged(job: JobState, task_id: str, sha: str, created: bool) -> Decision:
    """The task's work is on the integration branch: it is done and gives its locks back."""
    events: Decision = [
        (task_id, TaskMerged(sha=sha, created=created, integration=job.integration or "")),
        *_release(job, task_id, "merged"),
        (task_id, TaskCompleted()),
    ]
    return events + _job_outcome(job, {task_id: "completed"})


def decide_job_failed(job: JobState, reason: str) -> Decision:
    """The daemon cannot go on with the job (an error of its own): every unfinished task and the job fail."""
    if job.status in JOB_DONE:
        return []
    events: Decision = [
        (task.id, TaskFailed(reason=reason)) for task in job.tasks.values() if task.status not in TASK_DONE
    ]
    return [*events, (None, JobFailed(reason=reason))]


def decide_planning_killed(job: JobState) -> Decision:
    """A kill that arrived while the planner ran: the job ends without tasks."""
    if job.status in JOB_DONE:
        return []
    return [(None, JobKilled())]


def _dependents(job: JobState, task_id: str) -> list[str]:
    """Every task that depends on `task_id`, directly or not, in creation order."""
    found: set[str] = {task_id}
    changed = True
    while changed:
        changed = False
        for task in job.tasks.values():
            if task.id not in found and found.intersection(task.deps):
                found.add(task.id)
                changed = True
    return [task.id for task in job.tasks.values() if task.id in found and task.id != task_id]


def _job_outcome(job: JobState, changed: dict[str, str]) -> Decision:
    """The job event that follows when `changed` task statuses leave no task pending or running.

    While the queen revises the plan, the job goes on. Of a planned job, the tasks that count are those of the
    current plan: a failed task the queen replaced does not fail the job.
    """
    if job.status in ("planning", "replanning"):
        return []
    statuses = {task.id: changed.get(task.id, task.status) for task in job.tasks.values()}
    if job.plan is not None:
        current = {task.id for task in job.plan.tasks}
        statuses = {task: status for task, status in statuses.items() if task in current or status == "completed"}
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


def leftovers(job: JobState) -> list[str]:
    """The tasks of an ended job whose worktrees it keeps (those that did not merge), until `numerusctl clean`."""
    if job.status not in JOB_DONE or job.cleaned:
        return []
    return [task.id for task in job.tasks.values() if task.worktree is not None and task.status != "completed"]


def job_view(job: JobState, *, tasks: bool = True) -> JobView:
    """What `status` shows of a job: with `tasks`, each of its tasks too (else only how many there are)."""
    own = job.input_tokens + job.output_tokens
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
        planned=job.planned,
        plan_version=job.plan_version,
        plan_hash=job.plan_hash,
        integration=job.integration,
        base_sha=job.base_sha,
        parallel=job.parallel,
        input_tokens=job.input_tokens,
        output_tokens=job.output_tokens,
        cleaned=job.cleaned,
        logs_removed=job.logs_removed,
        leftovers=leftovers(job),
        tasks_total=len(job.tasks),
        tasks_done=sum(task.status == "completed" for task in job.tasks.values()),
        tokens=own + sum(task.input_tokens + task.output_tokens for task in job.tasks.values()),
        tasks=[
            TaskView(
                id=task.id,
                title=task.title,
                agent=task.agent,
                status=task.status,
                role=task.role,
                deps=list(task.deps),
                holders=list(task.holders),
                branch=task.branch,
                feedback=list(task.feedback),
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
            for task in (job.tasks.values() if tasks else ())
        ],
    )
