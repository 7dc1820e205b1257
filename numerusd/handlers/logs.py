"""`logs`: the tail of each task's terminal output, read from its `stdout.log`; with `check`, the whole output of
one task's failed checks, read from its check logs (`numerusd.checks`)."""

from __future__ import annotations

import os

from numerusd.checks import failed_check_logs
from numerusd.errors import BadRequest, NotFound
from numerusd.handlers.context import Context
from numerusd.protocol.commands import GetLogs, LogsReply, TaskLog


async def handle(context: Context, request: GetLogs) -> LogsReply:
    """Reads at most `tail_bytes` per file, so a huge log never makes a huge reply."""
    if not 0 < request.tail_bytes <= 4 * 1024 * 1024:
        raise BadRequest("tail_bytes must be between 1 and 4194304")
    job = context.book.job(request.job)
    if job.logs_removed:
        raise NotFound(f"the logs of job {job.id} were removed by 'numerusctl clean --logs'; its events remain")
    if request.task is not None and request.task not in job.tasks:
        raise NotFound(f"job {job.id} has no task {request.task!r}; tasks: {', '.join(job.tasks)}")
    if request.check:
        if request.task is None:
            raise BadRequest(
                "the output of failed checks is per task: name the task (numerusctl logs JOB TASK --check)"
            )
        # The task id is one of the job's (checked above): the path stays in the job's run directory.
        run_dir = context.settings.runs_dir / job.id / request.task
        logs = []
        for failed in failed_check_logs(run_dir):
            text, truncated = _tail(str(failed.path), request.tail_bytes)
            logs.append(
                TaskLog(
                    task=request.task,
                    path=str(failed.path),
                    text=text,
                    truncated=truncated,
                    check=failed.command,
                    attempt=failed.attempt,
                    exit_code=failed.exit_code,
                )
            )
        return LogsReply(job=job.id, logs=logs)
    logs = []
    for task in job.tasks.values():
        if request.task not in (None, task.id) or task.log_path is None:
            continue
        text, truncated = _tail(task.log_path, request.tail_bytes)
        logs.append(TaskLog(task=task.id, path=task.log_path, text=text, truncated=truncated))
    return LogsReply(job=job.id, logs=logs)


def _tail(path: str, limit: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - limit))
            return log.read().decode("utf-8", "replace"), size > limit
    except FileNotFoundError:
        return "", False
