"""`decide(job, message) -> events`: every state change of a job, decided against its folded state.

A message is a command (`SubmitJob`, `Kill`, `Resume`, `Retry`, `Skip`, `CleanedUp`, `Accepted`,
`Discarded`, `Pause`, `Start`) or an observation of a side
effect (see `numerusd.domain.observations`). `decide` returns the events it implies, as `(task id or None, payload)`
pairs (the event store adds the envelope), or `[]` when it implies nothing, or raises: `CommandRefused` (and its
subclasses) for a user's command the job's state does not allow, `InvalidTransition` for an observation that cannot
happen in the job's state (a bug or a race in the daemon; nothing is recorded). It performs no I/O, reads no clock
and touches no NATS.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from numerusd import locks
from numerusd.domain import queueing
from numerusd.domain.observations import (
    Accepted,
    AgentExited,
    AgentFailedToStart,
    AgentReported,
    AgentSlotAwaited,
    AgentSlotTaken,
    AgentStarted,
    AgentStarting,
    Approve,
    AttemptFailed,
    CheckRan,
    ClaimAnswered,
    ClaimCompared,
    CleanedUp,
    Command,
    Discarded,
    FinishedInPlace,
    GateDone,
    InputSent,
    IntegrationReady,
    Interrupted,
    Kill,
    Lost,
    MergeBegun,
    MergeConflict,
    Merged,
    MergeWaiting,
    Observation,
    Offered,
    Pause,
    PipelineFailed,
    PlanAnswered,
    PlanAsked,
    Redacted,
    Reject,
    ReplanGaveUp,
    Resume,
    Retry,
    Reviewed,
    Settled,
    Skip,
    Stalled,
    Start,
    StoppedForKill,
    SubmitJob,
    Taken,
    TaskObservation,
    TaskReady,
    WorkCommitted,
    WorktreeReady,
)
from numerusd.domain.state import (
    ACTIVE,
    TASK_DONE,
    Decision,
    JobState,
    TaskState,
    budget_scope,
    budget_stop_reason,
    lock_table,
    rejected_reason,
    scope_name,
)
from numerusd.errors import BadRequest, CommandRefused, InvalidTransition, NotFound
from numerusd.protocol.commands import JOB_DONE, TaskStatus
from numerusd.protocol.events import (
    UNCOMMITTED_NAMED,
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentInputSent,
    AgentMessageReceived,
    AgentSpawned,
    AgentSpawnFailed,
    AgentThreadStarted,
    ApprovalRequested,
    BudgetExceeded,
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
    JobAccepted,
    JobApproved,
    JobCleaned,
    JobCompleted,
    JobDiscarded,
    JobFailed,
    JobInterrupted,
    JobKilled,
    JobRejected,
    JobReopened,
    JobResumed,
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
    SecretRedacted,
    TaskApprovalRequested,
    TaskApproved,
    TaskCompleted,
    TaskCreated,
    TaskEscalated,
    TaskExited,
    TaskFailed,
    TaskInterrupted,
    TaskKilled,
    TaskKillRequested,
    TaskLost,
    TaskMerged,
    TaskOffered,
    TaskRejected,
    TaskRetryRequested,
    TaskRetryScheduled,
    TaskSkipped,
    TaskStarted,
    TaskTaken,
    TaskWorkCommitted,
    TokensUsed,
    WorktreeCreated,
)
from numerusd.protocol.plan import Plan, PlannedTask

__all__ = ["check_acceptable", "check_cleanable", "decide", "replan_errors"]

#: What an agent's output parser may report: anything else is refused.
_REPORTED = (
    AgentMessageReceived,
    AgentCommandExecuted,
    AgentFileChanged,
    AgentErrorReported,
    TokensUsed,
    AgentThreadStarted,
)
#: Task statuses in which the task's agent may still print and exit: running, or ended by a decision taken while
#: it ran (the job failed or was killed, and the daemon stopped the agent after recording it).
_AGENT_ALIVE: tuple[TaskStatus, ...] = ("running", "failed", "killed")
#: The id of the one task of a job worked on in place (`--no-plan`).
IN_PLACE_TASK = "t1"
#: Task statuses from which an attempt is made next: GO in hand, a retry due, or an attempt cut by a daemon stop.
_ATTEMPT_AHEAD: tuple[TaskStatus, ...] = ("granted", "retrying", "interrupted")
#: Statuses of a task that a user may retry: ended without completing, or cut by a daemon stop.
_RETRYABLE: tuple[TaskStatus, ...] = ("failed", "killed", "interrupted", "skipped")


def decide(job: JobState | None, message: Command | Observation) -> Decision:
    """The events `message` implies for `job` (None: no job yet, for `SubmitJob` only); see the module docstring."""
    if isinstance(message, SubmitJob):
        if job is not None:
            raise InvalidTransition(f"job {job.id} was submitted already")
        return _submit(message)
    if job is None:
        raise InvalidTransition(f"{type(message).__name__} for a job that was never submitted")
    if isinstance(message, TaskObservation):
        return _decide_task(job, _task(job, message), message)
    match message:
        case Kill(by=by, task=None):
            return _kill(job, by) + queueing.killed_in_queue(job)
        case Kill(by=by, task=str(task_id)):
            return _kill_task(job, _named_task(job, task_id), by)
        case Resume(by=by):
            return _resume(job, by)
        case Retry(by=by, tasks=tasks):
            return _retry(job, tasks, by)
        case Skip(by=by, task=task_id):
            return _skip(job, _named_task(job, task_id), by)
        case Pause() | Start() | AgentSlotAwaited() | AgentSlotTaken():
            return queueing.decide_queue(job, message)
        case CleanedUp():
            return _cleaned(job, message)
        case Accepted():
            check_acceptable(job, partial=message.partial)
            fields = msgspec.structs.asdict(message)
            del fields["partial"]
            return [(None, JobAccepted(**fields))]
        case Discarded():
            return _discarded(job, message)
        case Approve():
            return _approve(job, message)
        case Reject():
            return _reject(job, message)
        case PlanAsked(role=role, attempt=attempt, agent=agent, log_path=log_path):
            _expect_job(job, message, ("planning", "replanning"))
            return [(None, PlanRequested(attempt=attempt, agent=agent, role=role, log_path=log_path))]
        case PlanAnswered():
            return _plan_answered(job, message)
        case IntegrationReady(branch=branch, base_sha=base_sha):
            if job.integration is not None:
                raise InvalidTransition(f"job {job.id} has its integration branch already: {job.integration}")
            return [(None, IntegrationBranchCreated(branch=branch, base_sha=base_sha))]
        case Stalled(idle_s=idle_s):
            if job.status != "running" or job.kill_requested or job.replans >= job.max_replans or job.paused_by:
                return []
            return [(None, ReplanRequested(task="", reason=f"no task completed for {idle_s:g} s"))]
        case ReplanGaveUp(reason=reason):
            _expect_job(job, message, ("replanning",))
            return _replan_failed(job, reason)
        case PipelineFailed(reason=reason):
            return _job_failed(job, reason)
        case Settled():
            return [] if job.status in JOB_DONE else _job_outcome(job, {})
        case Interrupted(reason=reason, next=then):
            return _interrupt(job, reason, then)
        case Redacted(counts=counts, task=task):
            # Whatever the job's state: the redacted text is stored already, so what was hidden is recorded.
            counts = {kind: count for kind, count in sorted(counts.items()) if count > 0}
            return [(None, SecretRedacted(task=task, counts=counts))] if counts else []
    raise InvalidTransition(f"cannot decide on {type(message).__name__}")


def _decide_task(job: JobState, task: TaskState, seen: TaskObservation) -> Decision:
    """The events an observation of one task implies, once its status allows it."""
    match seen:
        case TaskReady():
            _expect_task(job, task, seen, ("pending",))
            return _ready(job, task)
        case ClaimAnswered():
            _expect_task(job, task, seen, ("pending",))
            return _claim_answered(job, task, seen)
        case WorktreeReady(path=path, branch=branch, base_sha=base_sha):
            _expect_task(job, task, seen, _ATTEMPT_AHEAD)
            return [(task.id, WorktreeCreated(path=path, branch=branch, base_sha=base_sha))]
        case AgentStarting(argv=argv, workdir=workdir, log_path=log_path, resumes=resumes):
            _expect_task(job, task, seen, (*_ATTEMPT_AHEAD, *(("pending",) if job.in_place else ())))
            if resumes is not None and resumes != task.resumable_thread:
                raise InvalidTransition(f"task {task.id} of job {job.id} has no interrupted thread {resumes}")
            number = task.attempt if resumes else task.next_attempt
            started = TaskStarted(
                attempt=number, agent=task.agent, argv=argv, workdir=workdir, log_path=log_path, resumes=resumes
            )
            return [(task.id, started)]
        case AgentStarted(pid=pid, start_ticks=start_ticks):
            _expect_task(job, task, seen, ("running",))
            return [(task.id, AgentSpawned(pid=pid, start_ticks=start_ticks))]
        case AgentFailedToStart(reason=reason):
            _expect_task(job, task, seen, ("running",))
            return [(task.id, AgentSpawnFailed(reason=reason))]
        case Offered(pool=pool, lease=lease):
            _expect_task(job, task, seen, ("running",))
            if task.lease is not None:
                raise InvalidTransition(f"task {task.id} of job {job.id} was offered already under another lease")
            return [(task.id, TaskOffered(pool=pool, lease=lease))]
        case Taken(lease=lease, worker=worker, host=host):
            _expect_task(job, task, seen, ("running",))
            if lease != task.lease or task.worker is not None:
                raise InvalidTransition(f"task {task.id} of job {job.id} has no attempt to give under lease {lease}")
            return [(task.id, TaskTaken(worker=worker, lease=lease, host=host))]
        case Lost(lease=lease, worker=worker, reason=reason):
            _expect_task(job, task, seen, _AGENT_ALIVE)
            if lease != task.lease:
                raise InvalidTransition(f"task {task.id} of job {job.id} has no attempt under lease {lease}")
            if task.status != "running":  # the job ended while the worker had it: nothing is to be made again
                return []
            return [(task.id, TaskLost(worker=worker, lease=lease, reason=reason))]
        case AgentReported(events=events):
            _expect_task(job, task, seen, _AGENT_ALIVE)
            for event in events:
                if not isinstance(event, _REPORTED):
                    raise InvalidTransition(f"an agent's output cannot report {type(event).__name__}")
            return [(task.id, event) for event in events] + _budget(job, task, events)
        case InputSent(size=size, mac=mac, by=by):
            if task.status != "running":  # a user's doing: refused in words, not as a daemon bug
                raise CommandRefused(
                    f"task {task.id} of job {job.id} is {task.status}: only a running agent takes input", job=job.id
                )
            return [(task.id, AgentInputSent(size=size, mac=mac, by=by))]
        case AgentExited():
            _expect_task(job, task, seen, _AGENT_ALIVE)
            fields = msgspec.structs.asdict(seen)
            del fields["task"]
            fields["duration_s"] = round(seen.duration_s, 3)
            return [(task.id, TaskExited(**fields))]
        case WorkCommitted(commit=commit, changes=changes):
            _expect_task(job, task, seen, ("running",), worktree=True)
            return [(task.id, TaskWorkCommitted(commit=commit, changes=changes))]
        case ClaimCompared(violations=violations):
            _expect_task(job, task, seen, ("checking",), worktree=True)
            return [(task.id, ClaimViolated(violations=violations))] if violations else []
        case CheckRan(command=command, exit_code=exit_code, duration_s=duration_s, output=output):
            _expect_task(job, task, seen, ("checking",), worktree=True)
            ran = CheckCompleted(command=command, exit_code=exit_code, duration_s=round(duration_s, 3), output=output)
            return [(task.id, ran)]
        case Reviewed(verdict=verdict, reasons=reasons, usage=usage):
            _expect_task(job, task, seen, ("checking",), worktree=True)
            return [(task.id, ReviewCompleted(verdict=verdict, reasons=reasons, usage=usage))]
        case GateDone(reasons=reasons):
            _expect_task(job, task, seen, ("checking",), worktree=True)
            if task.kill_requested:  # a user killed it while the gate ran: it stops here, nothing of it merges
                return _task_killed(job, task.id, reason=f"killed by {task.kill_by or 'a user'}", dependents=True)
            return [(task.id, GateFailed(reasons=reasons) if reasons else GatePassed())]
        case MergeBegun(integration=integration, parent=parent, task_sha=task_sha):
            _expect_task(job, task, seen, ("merging",), worktree=True)
            return [(task.id, MergeStarted(integration=integration, parent=parent, task_sha=task_sha))]
        case MergeWaiting(reason=reason, retry_s=retry_s):
            _expect_task(job, task, seen, ("merging",), worktree=True)
            return [(task.id, MergeBlocked(reason=reason, retry_s=retry_s))]
        case MergeConflict(paths=paths, messages=messages):
            _expect_task(job, task, seen, ("merging",), worktree=True)
            return [(task.id, MergeConflicted(paths=paths, messages=messages))]
        case Merged(sha=sha, created=created):
            _expect_task(job, task, seen, ("merging",), worktree=True)
            return _merged(job, task.id, sha, created)
        case FinishedInPlace():
            if not job.in_place:
                raise InvalidTransition(f"job {job.id} works in worktrees: task {task.id} must merge to finish")
            _expect_task(job, task, seen, ("running",))
            return [(task.id, TaskCompleted()), *_job_outcome(job, {task.id: "completed"})]
        case AttemptFailed(reasons=reasons, fresh_worktree=fresh):
            _expect_task(job, task, seen, ("running", "checking", "merging", *_ATTEMPT_AHEAD))
            return _attempt_failed(job, task, reasons, fresh)
        case StoppedForKill():
            if not (job.kill_requested or task.kill_requested):
                raise InvalidTransition(f"task {task.id} cannot stop for a kill: neither it nor job {job.id} is killed")
            if task.status in TASK_DONE:
                return []
            if job.kill_requested:
                return _task_killed(job, task.id)
            return _task_killed(job, task.id, reason=f"killed by {task.kill_by or 'a user'}", dependents=True)
    raise InvalidTransition(f"cannot decide on {type(seen).__name__}")


def _named_task(job: JobState, task_id: str) -> TaskState:
    """The task a user's command names, or NotFound listing the job's tasks."""
    task = job.tasks.get(task_id)
    if task is None:
        listed = ", ".join(job.tasks) or "none yet"
        raise NotFound(f"job {job.id} has no task {task_id!r} (its tasks: {listed})", job=job.id)
    return task


def _task(job: JobState, seen: TaskObservation) -> TaskState:
    task = job.tasks.get(seen.task)
    if task is None:
        raise InvalidTransition(f"{type(seen).__name__} for task {seen.task!r}, which job {job.id} does not have")
    return task


def _expect_task(
    job: JobState, task: TaskState, seen: TaskObservation, statuses: Collection[TaskStatus], *, worktree: bool = False
) -> None:
    """Refuse `seen` unless the task is in one of `statuses` (and, with `worktree`, the job works in worktrees)."""
    if task.status not in statuses:
        raise InvalidTransition(
            f"{type(seen).__name__} for task {task.id} of job {job.id}, which is {task.status} "
            f"(expected {' or '.join(statuses)})"
        )
    if worktree and job.in_place:
        raise InvalidTransition(f"{type(seen).__name__} for job {job.id}, which works in place: no worktree")


def _expect_job(job: JobState, seen: Observation, statuses: Collection[str]) -> None:
    if job.status not in statuses:
        raise InvalidTransition(
            f"{type(seen).__name__} for job {job.id}, which is {job.status} (expected {' or '.join(statuses)})"
        )


# --- commands ------------------------------------------------------------------------------------------------


def _submit(command: SubmitJob) -> Decision:
    """A new job: planned (the planner is asked next), or one task worked on in place."""
    if not command.goal.strip():
        raise BadRequest("the goal is empty: say what the agents should do, e.g. numerusctl run 'fix the tests'")
    executor = command.roles["executor"]
    uncommitted = command.uncommitted
    if not command.plan:
        # One task, worked on in place: nothing to plan, claim, check, review or retry.
        title = command.goal.strip().splitlines()[0][:80]
        submitted = JobSubmitted(
            goal=command.goal,
            repo=command.repo,
            agent=executor,
            roles={"executor": executor},
            review=False,
            max_attempts=1,
            claims="none",
            unsandboxed=tuple(role for role in command.unsandboxed if role == "executor"),
            priority=command.priority,
            by=command.by,
            max_tokens=command.max_tokens,
            task_max_tokens=command.task_max_tokens,
            on_budget=command.on_budget,
        )
        return [(None, submitted), (IN_PLACE_TASK, TaskCreated(title=title, instructions=command.goal, agent=executor))]
    submitted = JobSubmitted(
        goal=command.goal,
        repo=command.repo,
        agent=executor,
        plan=True,
        roles=command.roles,
        parallel=command.parallel,
        checks=command.checks,
        review=command.review,
        max_attempts=command.max_attempts,
        backoff_s=command.backoff_s,
        max_replans=command.max_replans,
        claims=command.claims,
        base_sha=command.base_sha,
        branch=command.branch,
        uncommitted_count=None if uncommitted is None else len(uncommitted),
        uncommitted=tuple((uncommitted or ())[:UNCOMMITTED_NAMED]),
        unsandboxed=command.unsandboxed,
        priority=command.priority,
        by=command.by,
        approve=command.approve,
        max_tokens=command.max_tokens,
        task_max_tokens=command.task_max_tokens,
        on_budget=command.on_budget,
        escalate=command.escalate,
        pool=command.pool,
    )
    if command.given_plan is not None:
        return [(None, submitted), *_given_plan(command, command.given_plan)]
    return [(None, submitted)]


def _kill(job: JobState, by: str) -> Decision:
    """Record a kill; tasks not yet running are killed at once, running ones when their agent has ended. An
    interrupted job has no agent running: it is killed at once."""
    if job.status in JOB_DONE:
        raise CommandRefused(f"job {job.id} is already {job.status}; nothing to kill", job=job.id)
    if job.kill_requested:
        return []
    events: Decision = [(None, KillRequested(by=by))]
    if job.status == "interrupted":
        unfinished = [task for task in job.tasks.values() if task.status not in TASK_DONE]
        return events + [event for task in unfinished for event in _ended_with_job(job, task)] + [(None, JobKilled())]
    for task in job.tasks.values():
        if task.status in ("pending", "waiting", "awaiting_approval"):
            events += _ended_with_job(job, task)
    busy = [task for task in job.tasks.values() if task.status in ACTIVE and task.status != "waiting"]
    if not busy and job.status not in ("planning", "replanning"):
        events.append((None, JobKilled()))
    return events


def _kill_task(job: JobState, task: TaskState, by: str) -> Decision:
    """Stop one task: at once when no agent of it runs, else once its agent has ended (the runner stops it). Its
    dependents are skipped, as after a failure; `retry` brings them back."""
    if task.status in TASK_DONE:
        raise CommandRefused(f"task {task.id} of job {job.id} is already {task.status}; nothing to kill", job=job.id)
    if job.status in JOB_DONE or job.kill_requested:
        raise CommandRefused(f"job {job.id} is {job.status}; nothing of it to kill", job=job.id)
    if task.kill_requested:
        return []
    events: Decision = [(task.id, TaskKillRequested(by=by))]
    if task.status in ("running", "checking", "merging"):
        return events  # its step ends first (the agent is stopped; a check or a merge runs to its end)
    return events + _task_killed(job, task.id, reason=f"killed by {by or 'a user'}", dependents=True)


def _resume(job: JobState, by: str) -> Decision:
    """An interrupted job goes on where it was."""
    if job.status != "interrupted":
        raise CommandRefused(
            f"job {job.id} is {job.status}, not interrupted: nothing to resume"
            + ("; 'numerusctl retry' runs its failed tasks again" if job.status in JOB_DONE else ""),
            job=job.id,
        )
    return [(None, JobResumed(by=by))]


def _retry(job: JobState, named: tuple[str, ...], by: str) -> Decision:
    """Give tasks new attempts: those named, else every failed, killed or interrupted task of the job (and a
    planned job that ended without a plan plans again). The tasks skipped because one of them did not complete
    are pending again too, and an ended job reopens."""
    if job.status not in (*JOB_DONE, "running", "interrupted"):
        raise CommandRefused(f"job {job.id} is {job.status}: retry it once it runs or has ended", job=job.id)
    if job.kill_requested and job.status not in JOB_DONE:
        raise CommandRefused(f"job {job.id} is being killed: retry it once it has ended", job=job.id)
    tasks = [_named_task(job, task_id) for task_id in dict.fromkeys(named)]
    for task in tasks:
        if task.status not in _RETRYABLE:
            raise CommandRefused(
                f"task {task.id} of job {job.id} is {task.status}: only a failed, killed, skipped or interrupted "
                "task can be retried",
                job=job.id,
            )
    if not named:
        tasks = [task for task in job.tasks.values() if task.status in ("failed", "killed", "interrupted")]
    events: Decision = []
    if job.status in JOB_DONE:
        if job.planned and job.plan is None:
            return [(None, JobReopened(by=by))]  # no plan was ever validated: the planner is asked again
        if not tasks:
            raise CommandRefused(f"job {job.id} is {job.status} with no task to retry", job=job.id)
        events.append((None, JobReopened(by=by)))
    elif not tasks:
        raise CommandRefused(f"job {job.id} has no failed, killed or interrupted task to retry", job=job.id)
    retried = {task.id for task in tasks}
    for task in tasks:
        events += _release(job, task.id, "retried")
        events.append((task.id, TaskRetryRequested(by=by)))
        for dependent in _dependents(job, task.id):
            if dependent not in retried and job.tasks[dependent].status == "skipped":
                events.append(
                    (dependent, TaskRetryRequested(by=by, reason=f"{task.id}, which it depends on, is retried"))
                )
                retried.add(dependent)
    return events


def _skip(job: JobState, task: TaskState, by: str) -> Decision:
    """The task will not run, and the tasks that depend on it go on without it; an ended job reopens when that
    leaves tasks to run (those skipped only because this one did not complete)."""
    if task.status in ("running", "checking", "merging", "completed", "skipped"):
        hint = f"; 'numerusctl kill {job.id} {task.id}' first" if task.status == "running" else ""
        raise CommandRefused(f"task {task.id} of job {job.id} is {task.status}: it cannot be skipped{hint}", job=job.id)
    if job.kill_requested:
        raise CommandRefused(f"job {job.id} is being killed or was: nothing of it to skip", job=job.id)
    events: Decision = []
    reopened: list[str] = []
    if job.status in JOB_DONE:
        reopened = [dependent for dependent in _dependents(job, task.id) if job.tasks[dependent].status == "skipped"]
        if reopened:
            events.append((None, JobReopened(by=by)))
    events += _release(job, task.id, "skipped")
    events.append((task.id, TaskSkipped(reason=f"skipped by {by or 'a user'}", by=by)))
    for dependent in reopened:
        events.append((dependent, TaskRetryRequested(by=by, reason=f"{task.id}, which it depends on, was skipped")))
    if not reopened:
        user_skipped = msgspec.structs.replace(task, skipped_by=by or "a user")
        job = msgspec.structs.replace(job, tasks={**job.tasks, task.id: user_skipped})
        if job.status not in JOB_DONE:
            events += _job_outcome(job, {task.id: "skipped"})
    return events


def check_cleanable(job: JobState) -> None:
    """Refuse to clean a job that has not ended: its agents and merges still use its worktrees and branches."""
    if job.status not in JOB_DONE:
        raise CommandRefused(
            f"job {job.id} is {job.status}: its tasks still use their worktrees; wait for it to end, or "
            f"'numerusctl kill {job.id}' first. Nothing was removed",
            job=job.id,
        )


def _cleaned(job: JobState, cleaned: CleanedUp) -> Decision:
    """Record what `clean` removed: nothing when it removed nothing from a job already cleaned."""
    check_cleanable(job)
    if job.cleaned and not (cleaned.worktrees or cleaned.branches or cleaned.logs):
        return []
    fields = msgspec.structs.asdict(cleaned)
    return [(None, JobCleaned(**fields))]


def check_acceptable(job: JobState, *, partial: bool = False) -> None:
    """Refuse to accept a job whose result is not there to take: not ended, discarded, worked in place, with
    nothing merged, or (unless `partial`) one that did not complete."""
    why = None
    if job.discarded:
        why = "was discarded ('numerusctl discard'): its branches are gone"
    elif job.in_place:
        why = f"worked in place (--no-plan): its changes are in {job.repo} already, uncommitted"
    elif job.status not in JOB_DONE:
        why = f"is {job.status}: its result is taken once it has ended; wait for it, or 'numerusctl kill {job.id}'"
    elif job.integration is None or job.integration_tip in (None, job.base_sha):
        why = "merged no work: its integration branch is the commit it started from"
    elif job.status != "completed" and not partial:
        merged = [task.id for task in job.tasks.values() if task.merged_sha is not None]
        why = (
            f"is {job.status}: its integration branch holds the work of {', '.join(merged)} only; "
            f"'numerusctl accept {job.id} --partial' takes that"
        )
    if why is not None:
        raise CommandRefused(f"job {job.id} {why}. Nothing was changed", job=job.id)


def _discarded(job: JobState, discarded: Discarded) -> Decision:
    """Record what `discard` removed: nothing when it removed nothing from a job already discarded."""
    check_cleanable(job)
    if job.discarded and not (discarded.worktrees or discarded.branches):
        return []
    return [(None, JobDiscarded(**msgspec.structs.asdict(discarded)))]


def _interrupt(job: JobState, reason: str, then: str) -> Decision:
    """The daemon stopped while the job was under way: the tasks whose agents it stopped are `interrupted` (their
    attempts' outcomes are unknown: never completed), and so is the job, until it resumes (`then` says when).
    Every other task keeps its status: it goes on from its last recorded step. A job being killed is killed."""
    if job.status in JOB_DONE or job.status == "interrupted":
        return []
    unfinished = [task for task in job.tasks.values() if task.status not in TASK_DONE]
    if job.kill_requested:
        return [event for task in unfinished for event in _ended_with_job(job, task)] + [(None, JobKilled())]
    cut = [
        (task.id, TaskInterrupted(reason=reason, resumable=True, thread_id=task.thread_id))
        for task in unfinished
        if task.status == "running"
    ]
    return [*cut, (None, JobInterrupted(reason=reason, resumable=True, next=then))]


# --- the plan --------------------------------------------------------------------------------------------------


def _plan_answered(job: JobState, answer: PlanAnswered) -> Decision:
    """A valid plan is recorded with its tasks; anything else is rejected with its reasons (the last time, the
    planner's job fails). A kill that arrived meanwhile ends the job instead."""
    _expect_job(job, answer, ("planning", "replanning"))
    if job.kill_requested:
        return [(None, _stopped(job))]
    errors = list(answer.errors)
    if answer.plan is not None and answer.role == "queen":
        errors += replan_errors(job, answer.plan)
    if answer.plan is not None and not errors:
        return _plan_validated(job, answer.attempt, answer.plan, answer.plan_hash, answer) + _pause_deferred(job)
    if not errors:
        errors = ["the answer holds no plan"]
    events: Decision = [
        (
            None,
            PlanRejected(attempt=answer.attempt, errors=tuple(errors), answer=answer.answer[:8192], usage=answer.usage),
        )
    ]
    if answer.attempt >= answer.max_attempts:
        shown = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
        events.append((None, JobFailed(reason=f"no valid plan after {answer.attempt} attempts: {shown}")))
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


def _plan_validated(job: JobState, attempt: int, plan: Plan, plan_hash: str, answer: PlanAnswered) -> Decision:
    """A valid plan: recorded with its hash, then one TaskCreated per task to do, in the plan's order.

    For a revised plan (the queen's), completed tasks are left as they are, pending tasks it leaves out are
    dropped (skipped), and pending tasks it lists are created again with their new instructions and deps.
    """
    executor = job.roles.get("executor", job.agent)
    version = job.plan_version + 1
    validated = PlanValidated(version=version, attempt=attempt, hash=plan_hash, plan=plan, usage=answer.usage)
    events: Decision = [(None, validated)]
    listed = {task.id for task in plan.tasks}
    for task in job.tasks.values():
        if task.status == "pending" and task.id not in listed:
            events.append((task.id, TaskSkipped(reason=f"dropped by plan v{version}")))
    for task in plan.tasks:
        existing = job.tasks.get(task.id)
        if existing is not None and existing.status != "pending":
            continue  # completed, or under way: it stays as it is
        events.append((task.id, _task_created(task, executor)))
    if version == 1 and "plan" in job.approve:
        events.append((None, ApprovalRequested(gate="plan", reason=_plan_reason(plan, plan_hash, ""))))
    return events


def _task_created(task: PlannedTask, executor: str) -> TaskCreated:
    return TaskCreated(
        title=task.title,
        instructions=task.instructions,
        agent=executor,
        role=task.role,
        deps=task.deps,
        intents=task.intents,
    )


def _replan_failed(job: JobState, reason: str) -> Decision:
    """The queen gave no usable plan: the failed tasks' dependents are skipped, and the job may end."""
    events: Decision = [(None, ReplanFailed(reason=reason))]
    job = msgspec.structs.replace(job, status="running")
    changed: dict[str, TaskStatus] = {}
    for task in job.tasks.values():
        if task.status == "failed":
            for skipped in _dependents(job, task.id):
                if job.tasks[skipped].status == "pending" and skipped not in changed:
                    events.append((skipped, TaskSkipped(reason=f"depends on {task.id}, which failed")))
                    changed[skipped] = "skipped"
    outcome = _job_outcome(job, changed)
    if outcome and isinstance(outcome[0][1], JobFailed):
        outcome = [(None, JobFailed(reason=f"{outcome[0][1].reason}; {reason}"))]
    return events + (outcome or _pause_deferred(job))


# --- a task --------------------------------------------------------------------------------------------------


def _ready(job: JobState, task: TaskState) -> Decision:
    """The task's dependencies have ended: killed with the job, skipped if one did not complete, else nothing
    (the task goes on to its claim)."""
    if job.kill_requested:
        return _task_killed(job, task.id)
    unmet = sorted(dep for dep in task.deps if dep in job.tasks and not _done_well(job.tasks[dep]))
    if unmet:
        reason = f"depends on {', '.join(unmet)}, which did not complete"
        return [(task.id, TaskSkipped(reason=reason)), *_job_outcome(job, {task.id: "skipped"})]
    return []


def _claim_answered(job: JobState, task: TaskState, claim: ClaimAnswered) -> Decision:
    """A usable claim is recorded and arbitrated at once: GO or NO GO. An unusable one is rejected (the last
    time, the task fails). A kill that arrived meanwhile stops the task."""
    if job.kill_requested:
        return _task_killed(job, task.id)
    if task.kill_requested:
        return _task_killed(job, task.id, reason=f"killed by {task.kill_by or 'a user'}", dependents=True)
    if claim.errors:
        rejected = ClaimRejected(attempt=claim.attempt, errors=claim.errors, usage=claim.usage)
        events: Decision = [(task.id, rejected)]
        if claim.attempt >= claim.max_attempts:
            reason = f"no usable claim after {claim.attempt} answers: {'; '.join(claim.errors)}"
            events += _task_failed(job, task.id, reason)
        return events
    proposed = ClaimProposed(
        attempt=claim.attempt, paths=claim.paths, commands=claim.commands, usage=claim.usage, locks=claim.locks
    )
    decision = locks.arbitrate(lock_table(job), task.id, claim.locks)
    if isinstance(decision, locks.Granted):
        return [(task.id, proposed), (task.id, ClaimGranted(locks=decision.locks))]
    denied = ClaimDenied(locks=decision.locks, holders=decision.holders, conflicts=tuple(decision.conflicts))
    return [(task.id, proposed), (task.id, denied)]


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


def _attempt_failed(job: JobState, task: TaskState, reasons: tuple[str, ...], fresh: bool) -> Decision:
    """An attempt failed (before its agent started, or after): retry after the next backoff pause, or, with no
    attempt left, fail the task.

    Every failed attempt counts, so a task whose worktree cannot be made fails after `max_attempts` like any
    other. A task that fails for good while the job may still be replanned asks the queen (`ReplanRequested`)
    instead of failing the tasks that depend on it.
    """
    if job.kill_requested:
        return _task_killed(job, task.id)
    if task.kill_requested:
        return _task_killed(job, task.id, reason=f"killed by {task.kill_by or 'a user'}", dependents=True)
    failed = task.failed_attempts + 1
    if failed < job.max_attempts:
        pauses = job.backoff_s or (0.0,)
        delay = pauses[min(failed, len(pauses)) - 1]  # 1 s after the first, 2 s after the second…
        number = max(task.attempt, failed) + 1
        retry = TaskRetryScheduled(next_attempt=number, delay_s=delay, reasons=reasons, fresh_worktree=fresh)
        return [(task.id, retry)]
    if job.max_attempts == 1:
        reason = "; ".join(reasons)
    else:
        reason = f"failed after {failed} attempt{'s' if failed != 1 else ''}: {'; '.join(reasons)}"
    escalation = _escalation(job, task, failed, reasons, reason, fresh)
    if escalation is not None:
        return escalation
    if job.replans < job.max_replans and job.status == "running":
        failed_event = (task.id, TaskFailed(reason=reason[:4000]))
        replan = (None, ReplanRequested(task=task.id, reason=reason[:4000]))
        return [*_release(job, task.id, "failed"), failed_event, replan]
    return _task_failed(job, task.id, reason)


def _task_failed(job: JobState, task_id: str, reason: str) -> Decision:
    """The task fails for good: its locks go, the tasks that depend on it are skipped, maybe the job ends."""
    events: Decision = [*_release(job, task_id, "failed"), (task_id, TaskFailed(reason=reason[:4000]))]
    changed: dict[str, TaskStatus] = {task_id: "failed"}
    for skipped in _dependents(job, task_id):
        if job.tasks[skipped].status == "pending":
            events.append((skipped, TaskSkipped(reason=f"depends on {task_id}, which failed")))
            changed[skipped] = "skipped"
    return events + _job_outcome(job, changed)


def _task_killed(job: JobState, task_id: str, *, reason: str | None = None, dependents: bool = False) -> Decision:
    """The task stops where it is and gives its locks back: the job is being killed, or (`dependents`) the task
    alone, whose dependents are then skipped as after a failure."""
    killed = TaskKilled(reason=reason) if reason else TaskKilled()
    events: Decision = [*_release(job, task_id, "killed"), (task_id, killed)]
    changed: dict[str, TaskStatus] = {task_id: "killed"}
    if dependents:
        for skipped in _dependents(job, task_id):
            if job.tasks[skipped].status == "pending":
                events.append((skipped, TaskSkipped(reason=f"depends on {task_id}, which was killed")))
                changed[skipped] = "skipped"
    return events + _job_outcome(job, changed)


def _ended_with_job(job: JobState, task: TaskState, reason: str | None = None) -> Decision:
    """A task killed because its whole job ends: the locks it holds or waits for given back (no one is woken:
    every task of the job ends), so a `retry` of the job finds the table as free as its tasks left it."""
    table = lock_table(job)
    held = task.id in table.holders or table.queued_claim(task.id) is not None
    released: Decision = [(task.id, LocksReleased(reason="killed"))] if held else []
    return [*released, (task.id, TaskKilled(reason=reason) if reason else TaskKilled())]


def _merged(job: JobState, task_id: str, sha: str, created: bool) -> Decision:
    """The task's work is on the integration branch: it is done and gives its locks back."""
    events: Decision = [
        (task_id, TaskMerged(sha=sha, created=created, integration=job.integration or "")),
        *_release(job, task_id, "merged"),
        (task_id, TaskCompleted()),
    ]
    return events + _job_outcome(job, {task_id: "completed"})


# --- the job's end -------------------------------------------------------------------------------------------


def _job_failed(job: JobState, reason: str) -> Decision:
    """The daemon cannot go on with the job (an error of its own): every unfinished task and the job fail."""
    if job.status in JOB_DONE:
        return []
    events: Decision = [
        (task.id, TaskFailed(reason=reason)) for task in job.tasks.values() if task.status not in TASK_DONE
    ]
    return [*events, (None, JobFailed(reason=reason))]


def _done_well(task: TaskState) -> bool:
    """Whether the tasks that depend on `task` may run: it completed, or a user skipped it."""
    return task.status == "completed" or (task.status == "skipped" and task.skipped_by is not None)


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


def _job_outcome(job: JobState, changed: dict[str, TaskStatus]) -> Decision:
    """The job event that follows when `changed` task statuses leave no task pending or running.

    While the queen revises the plan, the job goes on. Of a planned job, the tasks that count are those of the
    current plan: a failed task the queen replaced does not fail the job.
    """
    if job.status in ("planning", "replanning") or (job.status == "awaiting_approval" and not job.kill_requested):
        return []
    statuses = {task.id: changed.get(task.id, task.status) for task in job.tasks.values()}
    if job.plan is not None:
        current = {task.id for task in job.plan.tasks}
        statuses = {task: status for task, status in statuses.items() if task in current or status == "completed"}
    if any(status not in TASK_DONE for status in statuses.values()):
        return []
    if job.kill_requested:
        return [(None, _stopped(job))]
    skipped_by_user = {
        task.id for task in job.tasks.values() if task.skipped_by and changed.get(task.id, "skipped") == "skipped"
    }
    failed = sorted(task for task, status in statuses.items() if status != "completed" and task not in skipped_by_user)
    if not failed and "merge" in job.approve:
        branch = job.integration or "the integration branch"
        return [(None, ApprovalRequested(gate="merge", reason=f"every task merged into {branch}"))]
    if not failed:
        return [(None, JobCompleted())]
    return [(None, JobFailed(reason=f"task {', '.join(failed)} {statuses[failed[0]]}"))]


# --- approvals, escalation and budgets -------------------------------------------------------------------------


def _given_plan(command: SubmitJob, plan: Plan) -> Decision:
    """The user's own plan (`run --plan FILE`), validated at submission: recorded as the planner's would be
    (attempt 0), with its tasks; the plan approval follows if the job asks for one."""
    executor = command.roles["executor"]
    events: Decision = [(None, PlanValidated(version=1, attempt=0, hash=command.given_plan_hash, plan=plan))]
    events += [(task.id, _task_created(task, executor)) for task in plan.tasks]
    if "plan" in command.approve:
        reason = _plan_reason(plan, command.given_plan_hash, command.by or "the user")
        events.append((None, ApprovalRequested(gate="plan", reason=reason)))
    return events


def _plan_reason(plan: Plan, plan_hash: str, given_by: str) -> str:
    """`2 tasks, hash 1a2b3c4d5e6f` (`, given by alice (operator)`): what a plan approval is asked for."""
    count = f"{len(plan.tasks)} task{'s' if len(plan.tasks) != 1 else ''}"
    return f"{count}, hash {plan_hash[:12]}" + (f", given by {given_by}" if given_by else "")


def _approve(job: JobState, approve: Approve) -> Decision:
    """A user approves: the task awaiting approval makes one more attempt, or the job goes on from its gate (a
    plan: its tasks start; a merge: it completes; a budget: the exceeded caps rise by `add_tokens`)."""
    if approve.task is not None:
        task = _awaiting_task(job, approve.task, "approve")
        if approve.add_tokens is not None:
            raise BadRequest("--add-tokens raises a token cap the job waits on; a task awaiting approval has none")
        return [(task.id, TaskApproved(by=approve.by))]
    gate = _awaiting_gate(job, "approve")
    if gate != "budget":
        if approve.add_tokens is not None:
            raise BadRequest(f"--add-tokens raises an exceeded token cap; job {job.id} waits for its {gate} approval")
        approved: Decision = [(None, JobApproved(gate=gate, by=approve.by))]
        return [*approved, (None, JobCompleted())] if gate == "merge" else approved
    over = [f"{scope_name(scope)} used {job.tokens_of(scope)} of {job.token_cap(scope)}" for scope in job.over_budget]
    if approve.add_tokens is None:
        raise BadRequest(
            f"job {job.id} is over its token budget ({'; '.join(over)}): approve with --add-tokens N to raise the cap"
        )
    for scope in job.over_budget:
        cap, used = job.token_cap(scope) or 0, job.tokens_of(scope)
        if cap + approve.add_tokens <= used:
            raise BadRequest(
                f"{scope_name(scope)} has used {used} tokens: --add-tokens {approve.add_tokens} leaves its cap "
                f"({cap + approve.add_tokens}) below that; add more than {used - cap}"
            )
    event = JobApproved(gate=gate, by=approve.by, added_tokens=approve.add_tokens, scopes=job.over_budget)
    going_on = msgspec.structs.replace(job, status=job.approved_from, approval=None)
    return [(None, event), *_job_outcome(going_on, {})]


def _reject(job: JobState, reject: Reject) -> Decision:
    """A user rejects: the task awaiting approval fails (its dependents are skipped), or the job fails at its gate
    (a merge's integration branch kept for a look; a budget's agents stopped as a kill stops them)."""
    reason = reject.reason.strip()[:4000]
    if reject.task is not None:
        task = _awaiting_task(job, reject.task, "reject")
        why = rejected_reason(f"task {task.id}", reject.by, reason)
        return [(task.id, TaskRejected(by=reject.by, reason=reason)), *_task_failed(job, task.id, why)]
    gate = _awaiting_gate(job, "reject")
    rejected: Decision = [(None, JobRejected(gate=gate, by=reject.by, reason=reason))]
    if gate == "budget":
        return rejected + _stop(job, rejected_reason("the token budget", reject.by, reason))
    if gate == "merge":
        kept = f"; its work stays on {job.integration}" if job.integration else ""
        return [*rejected, (None, JobFailed(reason=rejected_reason("the merge", reject.by, reason) + kept))]
    pending = [task.id for task in job.tasks.values() if task.status == "pending"]
    skipped: Decision = [(task_id, TaskSkipped(reason="the plan was rejected")) for task_id in pending]
    return [*rejected, *skipped, (None, JobFailed(reason=rejected_reason("the plan", reject.by, reason)))]


def _awaiting_task(job: JobState, task_id: str, verb: str) -> TaskState:
    """The task `task_id` names, refused in one line unless it waits for approval."""
    task = job.tasks.get(task_id)
    if task is None:
        raise CommandRefused(
            f"job {job.id} has no task {task_id!r}: 'numerusctl status {job.id}' lists its tasks", job=job.id
        )
    if task.status != "awaiting_approval":
        raise CommandRefused(
            f"task {task_id} of job {job.id} is {task.status}, not awaiting approval: nothing to {verb}", job=job.id
        )
    return task


def _awaiting_gate(job: JobState, verb: str) -> str:
    """What the job waits for; refused in one line when it waits for nothing (naming the tasks that do)."""
    if job.status == "awaiting_approval" and job.approval is not None:
        return job.approval
    tasks = [task.id for task in job.tasks.values() if task.status == "awaiting_approval"]
    hint = f"; task {', '.join(tasks)} awaits it: numerusctl {verb} {job.id} {tasks[0]}" if tasks else ""
    raise CommandRefused(f"job {job.id} is {job.status}, not awaiting approval: nothing to {verb}{hint}", job=job.id)


def _escalation(
    job: JobState, task: TaskState, failed: int, reasons: tuple[str, ...], reason: str, fresh: bool
) -> Decision | None:
    """Every attempt of the task failed: one more on its profile's `escalate` profile if it has one (and it has
    not been escalated yet); once escalated, the task waits for a user's approval. None: no escalation (the
    task fails as it always did)."""
    if task.escalated:
        held = f"awaiting approval: {reason}"
        return [(task.id, TaskApprovalRequested(reason=held[:4000], reasons=reasons))]
    stronger = job.escalate.get(task.agent)
    if stronger is None or not job.planned:
        return None
    retry = TaskRetryScheduled(next_attempt=failed + 1, delay_s=0.0, reasons=reasons, fresh_worktree=fresh)
    return [(task.id, TaskEscalated(agent=stronger, previous=task.agent)), (task.id, retry)]


def _budget(job: JobState, task: TaskState, reported: tuple[EventData, ...]) -> Decision:
    """The tokens an agent reported take the task or the job to its cap: BudgetExceeded, once per cap, then a
    pause for approval (unless the job waits already) or a stop."""
    added = sum(event.input_tokens + event.output_tokens for event in reported if isinstance(event, TokensUsed))
    if not added or job.status in JOB_DONE or job.kill_requested:
        return []
    exceeded: list[BudgetExceeded] = []
    for scope in (budget_scope("task", task.id), "job"):
        cap = job.token_cap(scope)
        if cap is None or scope in job.over_budget:
            continue
        used = job.tokens_of(scope)
        # Not `used < cap`: tokens of a planner, claimer or reviewer may have taken the scope over its cap since
        # the last report (they are counted, not checked): the next report of an agent says so.
        if cap <= used + added:
            kind, name = ("job", "") if scope == "job" else ("task", task.id)
            exceeded.append(BudgetExceeded(scope=kind, task=name, used=used + added, cap=cap, action=job.on_budget))
    events: Decision = [(None, event) for event in exceeded]
    if not exceeded:
        return []
    if job.on_budget == "stop":
        last = exceeded[-1]
        return events + _stop(job, budget_stop_reason(budget_scope(last.scope, last.task), last.used, last.cap))
    if job.status == "running":  # planning or replanning: the pause waits for the plan (_pause_deferred)
        why = "; ".join(
            f"{scope_name(budget_scope(e.scope, e.task))} used {e.used} tokens of its {e.cap}" for e in exceeded
        )
        events.append((None, ApprovalRequested(gate="budget", reason=why)))
    return events


def _pause_deferred(job: JobState) -> Decision:
    """A cap crossed while the queen revised the plan (her answer must find the job replanning) pauses the job
    once the revision is over."""
    # Only a deferred pause leaves scopes over budget without the job waiting: an approval clears them.
    if job.on_budget != "pause" or not job.over_budget or job.kill_requested or job.status == "awaiting_approval":
        return []
    over = ", ".join(scope_name(scope) for scope in job.over_budget)
    return [(None, ApprovalRequested(gate="budget", reason=f"{over} went over budget while the plan was revised"))]


def _stopped(job: JobState) -> EventData:
    """How a job being stopped ends once nothing of it runs: killed by a user, or failed for its budget."""
    return JobKilled() if job.stop_reason is None else JobFailed(reason=job.stop_reason)


def _stop(job: JobState, reason: str) -> Decision:
    """Stop the job as a kill does (tasks not running end now, running ones when their agent has) and fail it
    with `reason`, instead of ending it killed (the BudgetExceeded or JobRejected before it set the stop)."""
    events: Decision = []
    for task in job.tasks.values():
        if task.status in ("pending", "waiting", "awaiting_approval"):
            events += _ended_with_job(job, task, reason)
    busy = [task for task in job.tasks.values() if task.status in ACTIVE and task.status != "waiting"]
    if not busy and job.status not in ("planning", "replanning"):
        events.append((None, JobFailed(reason=reason)))
    return events
