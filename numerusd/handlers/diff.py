"""`diff`: a job's result (or one task's work) as a unified diff, computed in Numerus's mirror of the repository."""

from __future__ import annotations

import msgspec

from numerusd import git
from numerusd.errors import NotFound
from numerusd.handlers.context import Context
from numerusd.protocol.commands import DiffReply, GetDiff

_encode = msgspec.json.encode


async def handle(context: Context, request: GetDiff) -> DiffReply:
    """The job's integration branch against the commit it started from; a task's merge (the merge commit against
    its first parent), or before it merged, its branch's last commit against the commit its worktree started
    from. A diff over what fits in a reply is cut at a line's end, and `see_all` says how to see it whole."""
    job = context.book.job(request.job)
    repo = job.repo
    if job.in_place:
        raise NotFound(f"job {job.id} worked in place (--no-plan): 'git -C {repo} diff' shows its changes")
    if job.discarded:
        raise NotFound(f"job {job.id} was discarded ('numerusctl discard'): its branches are gone")
    if request.task is None:
        if job.integration is None or job.base_sha is None or job.integration_tip is None:
            raise NotFound(f"job {job.id} has no integration branch yet ({job.status})")
        base, head, shown_head = job.base_sha, job.integration_tip, job.integration
    else:
        task = job.tasks.get(request.task)
        if task is None:
            raise NotFound(f"job {job.id} has no task {request.task!r}; tasks: {', '.join(job.tasks) or 'none yet'}")
        if task.merged_sha is not None and task.merge_parent is not None:
            base, head, shown_head = task.merge_parent, task.merged_sha, task.merged_sha[:12]
        elif task.commit is not None and task.base_sha is not None:
            base, head, shown_head = task.base_sha, task.commit, task.branch or task.commit[:12]
        else:
            raise NotFound(f"task {task.id} of job {job.id} has no work committed yet ({task.status})")
    mirror = git.mirror_path(context.settings.repos_dir, repo)
    if not mirror.is_dir():
        raise NotFound(f"Numerus's copy of {repo} is gone ({mirror}); 'git -C {repo} diff {base[:12]}..' shows it")
    scratch = context.settings.state_dir / "tmp"
    scratch.mkdir(exist_ok=True)
    budget = context.history.page_bytes()
    found = await git.diff(mirror, base, head, limit=budget, scratch=scratch, stat=request.stat, width=request.width)
    text = _fit(found.text, budget)
    return DiffReply(
        job=job.id,
        task=request.task,
        base=base,
        head=head,
        text=text,
        size=found.size,
        shown=found.shown if text is found.text else len(text.encode()),
        see_all=f"git -C {repo} diff{' --stat' if request.stat else ''} {base[:12]}..{shown_head}",
    )


def _fit(text: str, budget: int) -> str:
    """`text`, whole lines of it, whose JSON fits `budget` bytes (escapes make JSON longer than the text)."""
    while len(_encode(text)) > budget:
        keep = text[: len(text) * budget // len(_encode(text)) - 1]
        text = keep[: keep.rfind("\n") + 1]
    return text
