"""What the daemon reads from a job's state without changing it: what `status` shows, what a restart must stop."""

from __future__ import annotations

from numerusd.domain.queueing import shown_status
from numerusd.domain.state import JobState, TaskState
from numerusd.protocol.commands import JOB_DONE, JobView, TaskView

__all__ = ["job_view", "leftovers", "running_tasks"]


def running_tasks(job: JobState) -> list[TaskState]:
    """Tasks whose agent has been started and has not ended."""
    return [task for task in job.tasks.values() if task.status == "running"]


def leftovers(job: JobState) -> list[str]:
    """The tasks of an ended job whose worktrees it keeps (those that did not merge), until `numerusctl clean`."""
    if job.status not in JOB_DONE or job.cleaned:
        return []
    return [task.id for task in job.tasks.values() if task.worktree is not None and task.status != "completed"]


def job_view(job: JobState, *, tasks: bool = True) -> JobView:
    """What `status` shows of a job: with `tasks`, each of its tasks too (else only how many there are)."""
    return JobView(
        id=job.id,
        goal=job.goal,
        repo=job.repo,
        agent=job.agent,
        status=shown_status(job),
        reason=job.reason,
        next=job.next,
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
        secrets_redacted=job.secrets_redacted,
        unsandboxed=list(job.unsandboxed),
        priority=job.priority,
        paused_by=job.paused_by if job.status not in JOB_DONE else None,
        accepted=job.accepted,
        discarded=job.discarded,
        tasks_total=len(job.tasks),
        tasks_done=sum(task.status == "completed" for task in job.tasks.values()),
        tokens=job.tokens(),
        approval=job.approval,
        approval_reason=job.approval_reason,
        awaiting_tasks=[task.id for task in job.tasks.values() if task.status == "awaiting_approval"],
        max_tokens=job.max_tokens,
        task_max_tokens=job.task_max_tokens,
        tasks=[
            TaskView(
                id=task.id,
                title=task.title,
                agent=task.agent,
                status=task.status,
                role=task.role,
                deps=list(task.deps),
                holders=list(task.holders),
                locks=[lock.path for lock in job.lock_holds.get(task.id, ())],
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
                worker=task.worker,
                host=task.host,
                pool=job.pool if task.lease is not None else "",
            )
            for task in (job.tasks.values() if tasks else ())
        ],
    )
