"""`evolve(state, event) -> state`: the only way a job's state changes.

The daemon, the projector, a restart and an auditor's replay all fold events with it, so none of them can drift
from the others. Events that do not apply (a forged order, a duplicate) leave the state unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TypeVar

import msgspec

from numerusd import locks
from numerusd.domain.queueing import evolve_queue
from numerusd.domain.state import (
    JobState,
    TaskState,
    budget_scope,
    budget_stop_reason,
    lock_table,
    rejected_reason,
    with_table,
)
from numerusd.protocol.commands import Acceptance
from numerusd.protocol.envelope import Envelope, WireEnvelope, typed
from numerusd.protocol.events import (
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
    JobPaused,
    JobPromoted,
    JobQueued,
    JobRejected,
    JobReopened,
    JobResumed,
    JobStarted,
    JobSubmitted,
    JobUnpaused,
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
    TaskRetryRequested,
    TaskRetryScheduled,
    TaskSkipped,
    TaskStarted,
    TaskTaken,
    TaskWorkCommitted,
    TokensUsed,
    Usage,
    WorktreeCreated,
)

__all__ = ["evolve", "evolve_untyped", "fold"]

#: A state that counts tokens: a job or a task.
_Counted = TypeVar("_Counted", JobState, TaskState)


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
            unsandboxed=data.unsandboxed,
            priority=data.priority,
            start_branch=data.branch,
            approve=data.approve,
            max_tokens=data.max_tokens,
            task_max_tokens=data.task_max_tokens,
            on_budget=data.on_budget,
            escalate=data.escalate,
            pool=data.pool,
            traceparent=event.traceparent,
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
        case JobInterrupted(reason=reason, resumable=resumable, next=then):
            if not resumable:  # recorded before jobs could resume: that stop ended the job
                return replace(job, status="failed", reason=f"interrupted: {reason}")
            return replace(job, status="interrupted", reason=reason, resume_status=job.status, next=then or None)
        case JobResumed():
            return replace(job, status=job.resume_status or "running", reason=None, resume_status=None, next=None)
        case JobReopened():
            status = "planning" if job.planned and job.plan is None else "running"
            return replace(job, status=status, reason=None, kill_requested=False, plan_attempts=0)
        case JobCleaned(logs=logs):
            return replace(job, cleaned=True, logs_removed=job.logs_removed or logs)
        case JobAccepted():
            accepted = Acceptance(
                branch=data.branch,
                sha=data.sha,
                how=data.how,
                previous=data.previous,
                checkout=data.checkout,
                reason=data.reason,
                pushed=data.pushed,
                by=data.by,
            )
            return replace(job, accepted=accepted)
        case JobDiscarded():
            return replace(job, cleaned=True, discarded=True)
        case SecretRedacted(counts=counts):
            return replace(job, secrets_redacted=job.secrets_redacted + sum(counts.values()))
        case JobQueued() | JobStarted() | JobPaused() | JobUnpaused() | JobPromoted():
            return evolve_queue(job, data, event.time)
        case ApprovalRequested() | JobApproved() | JobRejected() | BudgetExceeded():
            return _evolve_approval(job, data)
    return job


def _evolve_approval(job: JobState, data: EventData) -> JobState:
    """What approvals and budgets change: the job waits, goes on, or is being stopped."""
    replace = msgspec.structs.replace
    match data:
        case ApprovalRequested(gate=gate, reason=reason):
            if job.status == "awaiting_approval":
                return job
            return replace(
                job, status="awaiting_approval", approval=gate, approval_reason=reason, approved_from=job.status
            )
        case JobApproved(added_tokens=added, scopes=scopes):
            tokens_added = dict(job.tokens_added)
            for scope in scopes:
                tokens_added[scope] = tokens_added.get(scope, 0) + added
            left = tuple(scope for scope in job.over_budget if scope not in scopes)
            status = job.approved_from if job.status == "awaiting_approval" else job.status
            return replace(
                job,
                status=status,
                approval=None,
                approval_reason=None,
                tokens_added=tokens_added,
                over_budget=left,
            )
        case JobRejected(gate=gate, by=by, reason=reason):
            job = replace(job, approval=None, approval_reason=None)
            if gate == "budget":  # stopped as a kill stops it; it fails once its agents have ended
                stop_reason = rejected_reason("the token budget", by, reason)
                return replace(job, status=job.approved_from, kill_requested=True, stop_reason=stop_reason)
            return job
        case BudgetExceeded(scope=scope, task=task, used=used, cap=cap, action=action):
            key = budget_scope(scope, task)
            if key not in job.over_budget:
                job = replace(job, over_budget=(*job.over_budget, key))
            if action == "stop" and not job.kill_requested:
                return replace(job, kill_requested=True, stop_reason=budget_stop_reason(key, used, cap))
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
        thread = task.thread_tokens
        task = replace(
            task,
            input_tokens=task.input_tokens + data.input_tokens,
            cached_input_tokens=task.cached_input_tokens + data.cached_input_tokens,
            output_tokens=task.output_tokens + data.output_tokens,
            thread_tokens=(
                thread[0] + data.input_tokens,
                thread[1] + data.cached_input_tokens,
                thread[2] + data.output_tokens,
            ),
        )
        return replace(job, tasks={**job.tasks, task_id: task})
    match data:
        case ClaimProposed(attempt=attempt, paths=paths, commands=commands, usage=usage, locks=claimed):
            task = replace(task, claim=paths, commands=commands, claimed_locks=claimed, claim_attempts=attempt)
            task = _add_usage(task, usage)
        case ClaimRejected(attempt=attempt, errors=errors, usage=usage):
            task = _add_usage(replace(task, claim_attempts=attempt, feedback=errors), usage)
        case ClaimGranted(locks=granted):
            job = with_table(job, locks.apply_granted(lock_table(job), task_id, granted))
            if task_id in job.lock_holds:
                task = replace(task, status="granted", holders=())
        case ClaimDenied(locks=wanted, holders=holders):
            job = with_table(job, locks.apply_denied(lock_table(job), task_id, wanted))
            if task_id in job.lock_queue:
                task = replace(task, status="waiting", holders=holders)
        case LocksReleased():
            job = with_table(job, locks.release(lock_table(job), task_id))
        case WorktreeCreated(path=path, branch=branch, base_sha=base_sha):
            task = replace(task, worktree=path, branch=branch, base_sha=base_sha, fresh_worktree=False)
        case TaskWorkCommitted(commit=commit):
            task = replace(task, commit=commit, status="checking", passed_checks=(), review_passed=False)
        case ClaimViolated():
            return job  # the reasons reach the state through GateFailed
        case CheckCompleted(command=command, exit_code=exit_code):
            if exit_code != 0:
                return job  # the reasons reach the state through GateFailed
            task = replace(task, passed_checks=(*task.passed_checks, command))
        case ReviewCompleted(usage=usage, verdict=verdict):
            task = _add_usage(replace(task, review_passed=verdict == "pass"), usage)
        case GatePassed():
            task = replace(task, status="merging", feedback=())
        case GateFailed(reasons=reasons):
            task = replace(task, feedback=reasons)
        case TaskRetryScheduled(reasons=reasons, fresh_worktree=fresh):
            failed = task.failed_attempts + 1
            fresh = fresh or task.fresh_worktree
            task = replace(task, status="retrying", feedback=reasons, failed_attempts=failed, fresh_worktree=fresh)
        case MergeStarted(parent=parent):
            task = replace(task, status="merging", merge_parent=parent)
        case MergeBlocked(reason=reason):
            task = replace(task, reason=reason)  # it stays merging, and says what it waits for
        case TaskMerged(sha=sha):
            task = replace(task, merged_sha=sha, reason=None)
            job = replace(job, integration_tip=sha)
        case MergeConflicted(paths=paths):
            conflict = f"merging into the integration branch conflicts on {', '.join(paths)}"
            task = replace(task, feedback=(conflict,), fresh_worktree=True)
        case TaskSkipped(reason=reason, by=by):
            task = replace(task, status="skipped", reason=reason, ended=task.ended or time, skipped_by=by or None)
        case TaskStarted(attempt=attempt, log_path=log_path, workdir=workdir, resumes=resumes):
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
                # A new thread (unless this run resumes the attempt's thread) counts its tokens from zero.
                thread_id=task.thread_id if resumes else None,
                thread_tokens=task.thread_tokens if resumes else (0, 0, 0),
                resumed=task.resumed + 1 if resumes else 0,
                lease=None,
                worker=None,
                host="",
            )
        case TaskOffered(lease=lease):
            task = replace(task, lease=lease, worker=None, host="")
        case TaskTaken(worker=worker, host=host):
            task = replace(task, worker=worker, host=host)
        case TaskLost(reason=reason):
            # Made again as a new attempt, not counted as failed: the machine went away, not the agent's work.
            task = replace(task, status="retrying", reason=reason, pid=None, lease=None, worker=None, host="")
        case TaskKillRequested(by=by):
            task = replace(task, kill_requested=True, kill_by=by)
        case TaskRetryRequested(reason=reason):
            task = replace(
                task,
                status="pending",
                reason=reason or None,
                failed_attempts=0,
                fresh_worktree=task.worktree is not None,
                kill_requested=False,
                kill_by="",
                skipped_by=None,
                ended=None,
            )
        case AgentSpawned(pid=pid, start_ticks=start_ticks):
            task = replace(task, pid=pid, start_ticks=start_ticks)
        case AgentSpawnFailed(reason=reason):
            task = replace(task, reason=reason)
        case AgentThreadStarted(thread_id=thread_id):
            # The first thread an attempt's agent announced is the one it resumes: one printed later (an agent
            # naming another job's session in a shared CODEX_HOME) is recorded, never taken for it.
            task = replace(task, thread_id=task.thread_id or thread_id)
        case TaskExited(exit_code=exit_code):
            task = replace(task, exit_code=exit_code, ended=time)
        case TaskCompleted():
            task = replace(task, status="completed", ended=task.ended or time)
        case TaskFailed(reason=reason):
            task = replace(task, status="failed", reason=reason, ended=task.ended or time)
        case TaskKilled(reason=reason):
            task = replace(task, status="killed", reason=reason, ended=task.ended or time)
        case TaskInterrupted(reason=reason, resumable=resumable):
            if not resumable:  # recorded before jobs could resume: that stop ended the task
                task = replace(task, status="failed", reason=f"interrupted: {reason}", ended=task.ended or time)
            else:
                task = replace(task, status="interrupted", reason=reason, ended=task.ended or time)
        case TaskEscalated(agent=agent):
            task = replace(task, agent=agent, escalated=True)
        case TaskApprovalRequested(reason=reason, reasons=reasons):
            failed = task.failed_attempts + 1
            task = replace(task, status="awaiting_approval", reason=reason, feedback=reasons, failed_attempts=failed)
        case TaskApproved():
            task = replace(task, status="retrying", reason=None)
    return msgspec.structs.replace(job, tasks={**job.tasks, task_id: task})


#: Task events with no state of their own: recorded in the stream and the event index only.
_NO_TASK_STATE = frozenset(
    {AgentMessageReceived, AgentCommandExecuted, AgentFileChanged, AgentErrorReported, AgentInputSent}
)
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
