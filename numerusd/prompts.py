"""What the daemon asks each agent of a planned job: the planner, the claimer, the executor and the reviewer.

Every prompt starts with one line naming the role, job, task and attempt:

    Numerus role: executor · job 01JX… · task t2 · attempt 2

It tells a person reading a log which call this was, and it lets a scripted agent answer per role, task and
attempt (docs/agents.md). The rest is plain instructions; the answer's shape is given to codex separately as an
`--output-schema` file, so the prompts only say what to put in it. Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from numerusd.protocol.claims import ClaimedPath


def header(role: str, job: str, task: str | None, attempt: int) -> str:
    """The first line of every prompt."""
    return f"Numerus role: {role} · job {job} · task {task or '-'} · attempt {attempt}"


def _bullets(items: Iterable[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _refused(what: str, errors: tuple[str, ...]) -> list[str]:
    """The lines telling an agent why its previous answer was refused, all reasons at once."""
    return ["", f"Your previous {what} was refused. Fix every one of these problems:", _bullets(errors)]


def planner(job: str, goal: str, attempt: int, errors: tuple[str, ...] = ()) -> str:
    """Ask for a plan: tasks with ids, dependencies and file intents, as JSON following the plan schema."""
    parts = [
        header("planner", job, None, attempt),
        "",
        "You plan work for a team of coding agents on this repository. Read what you need; change nothing.",
        "",
        "Goal:",
        goal.strip(),
        "",
        "Break the goal into tasks. Each task is done by one agent in its own git worktree, which sees only the "
        "task's instructions, so make them complete. Tasks run in parallel unless one depends on another: list "
        "in `deps` the ids of the tasks that must be merged first. For each task list in `intents` the files it "
        "will create, modify or delete (paths relative to the repository root, or globs). Keep tasks that touch "
        "the same files dependent or merged into one, and prefer few, meaningful tasks.",
        "",
        "Answer with the plan as JSON only, following the schema you were given.",
    ]
    if errors:
        parts += _refused("answer", errors)
    return "\n".join(parts) + "\n"


def claim(job: str, task: str, title: str, instructions: str, attempt: int, errors: tuple[str, ...] = ()) -> str:
    """Ask an executor, before it runs, for every path it will touch and every command it will run."""
    parts = [
        header("claimer", job, task, attempt),
        "",
        "You will do the task below in a copy of this repository. Before you start, say exactly what you will "
        "touch, so that agents working in parallel never edit the same files. Read what you need; change nothing.",
        "",
        f"Task {task}: {title}",
        instructions.strip(),
        "",
        "List every file or directory you will create, modify, delete or only read (paths relative to the "
        "repository root; a directory with kind 'dir' covers everything beneath it), and every shell command you "
        "expect to run. Claim no more than you need: what you claim, other agents wait for. Anything you change "
        "outside your claim fails your work.",
        "",
        "Answer with the claim as JSON only, following the schema you were given.",
    ]
    if errors:
        parts += _refused("claim", errors)
    return "\n".join(parts) + "\n"


def executor(
    job: str,
    task: str,
    title: str,
    instructions: str,
    attempt: int,
    claim_paths: tuple[ClaimedPath, ...] | None,
    feedback: tuple[str, ...] = (),
) -> str:
    """The task itself, with the claim it must stay within and why the previous attempt failed."""
    parts = [header("executor", job, task, attempt), "", f"Task {task}: {title}", instructions.strip()]
    if claim_paths is not None:
        allowed = [f"{path.mode} {path.path}{'/' if path.kind == 'dir' else ''}" for path in claim_paths]
        parts += [
            "",
            "You may change only these paths (your claim); any other change fails your work:",
            _bullets(allowed) if allowed else "- nothing: this task must not change any file",
        ]
    parts += ["", "Work in the current directory, a git worktree of the repository. Do not commit; Numerus does."]
    if feedback:
        parts += ["", "Your previous attempt was not accepted, for these reasons. Fix them:", _bullets(feedback)]
    return "\n".join(parts) + "\n"


def reviewer(
    job: str,
    task: str,
    title: str,
    instructions: str,
    attempt: int,
    base_sha: str,
    changes: tuple[str, ...],
    checks: tuple[str, ...],
) -> str:
    """Ask for a verdict on a task's work, which is in the current directory (its worktree)."""
    parts = [
        header("reviewer", job, task, attempt),
        "",
        "Review the work an agent did for the task below. It is in the current directory, a git worktree, "
        f"committed on top of commit {base_sha}: see all of it with `git diff {base_sha}`. Change nothing.",
        "",
        f"Task {task}: {title}",
        instructions.strip(),
        "",
        "Changed paths:",
        _bullets(changes) if changes else "- none",
    ]
    if checks:
        parts += ["", "Checks that passed:", _bullets(checks)]
    parts += [
        "",
        "Answer 'pass' if the work does what the task asked, correctly and completely, and nothing else; "
        "otherwise 'fail' with reasons the author can act on. Answer as JSON only, following the schema.",
    ]
    return "\n".join(parts) + "\n"


def queen(
    job: str,
    goal: str,
    plan_json: str,
    statuses: dict[str, str],
    failed: str,
    reason: str,
    attempt: int,
    errors: tuple[str, ...] = (),
) -> str:
    """Ask the queen for a revised plan after a task failed for good."""
    parts = [
        header("queen", job, failed, attempt),
        "",
        "You coordinate a team of coding agents on this repository. The plan is not working out (a task failed "
        "after all its attempts, or the job stopped making progress); decide how the goal can still be reached. "
        "Read what you need; change nothing.",
        "",
        "Goal:",
        goal.strip(),
        "",
        f"Task {failed} failed: {reason}" if failed else f"The job is stalled: {reason}.",
        "",
        "The current plan:",
        plan_json,
        "",
        "Where each task stands:",
        _bullets(f"{task}: {status}" for task, status in statuses.items()),
        "",
        "Answer a revised plan for the whole job, as JSON following the schema you were given. List completed "
        "tasks unchanged (others may depend on them). Keep, change, split or drop pending tasks, and add tasks "
        "as needed; a task that failed cannot come back under its id: give what replaces it a new id.",
    ]
    if errors:
        parts += _refused("answer", errors)
    return "\n".join(parts) + "\n"


def resumed(prompt: str) -> str:
    """The message that resumes an agent's thread after a daemon stop cut it: the prompt's first line (its role,
    job, task and attempt, as every prompt starts), then a word to go on; the thread holds the instructions."""
    first = prompt.split("\n", 1)[0]
    return (
        f"{first}\n\nResumed: you were stopped in the middle of this task (Numerus restarted). Your work so far is "
        "where you left it. Go on from there and finish the task as first asked.\n"
    )
