"""`run`: accept a goal for a repository as a new job: planned (the pipeline) or one task (`--no-plan`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from numerusd import git, plans
from numerusd.agents.base import AgentInvocation
from numerusd.agents.registry import adapter_for
from numerusd.config import Settings
from numerusd.domain.observations import SubmitJob
from numerusd.errors import BadRequest, ConfigError
from numerusd.handlers.context import Context
from numerusd.processes import inherited_environment
from numerusd.protocol import subjects
from numerusd.protocol.commands import MAX_GOAL_BYTES, MAX_PRIORITY, ROLES, RunJob, RunReply
from numerusd.protocol.ids import is_token, new_ulid
from numerusd.terminal import find_program

#: How long `run` waits for `git status` (a huge working tree can take seconds; numerusctl waits 5 s in all).
UNCOMMITTED_WAIT_S = 2.0


async def handle(context: Context, request: RunJob) -> RunReply:
    """Validate, record `JobSubmitted` (and, for `--no-plan`, its one task), then start the job."""
    settings = context.settings
    goal_bytes = len(request.goal.encode())
    if goal_bytes > MAX_GOAL_BYTES:
        raise BadRequest(
            f"the goal is {goal_bytes} bytes, over the limit of {MAX_GOAL_BYTES} bytes (128 KiB); "
            "put the details in a file in the repository and name it in the goal"
        )
    repo = Path(request.repo)
    if not repo.is_absolute():
        raise BadRequest(f"repo {request.repo!r} is not an absolute path; pass the repository's full path")
    if not repo.is_dir():
        raise BadRequest(f"repo {request.repo} is not a directory; pass --repo with an existing repository")
    if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
        raise BadRequest(
            f"priority {request.priority} is out of range; give --priority between {-MAX_PRIORITY} and {MAX_PRIORITY}"
        )
    unknown = sorted(set(request.roles) - set(ROLES))
    if unknown:
        raise BadRequest(f"unknown role {unknown[0]!r}; the roles are {', '.join(ROLES)}")
    roles = settings.role_agents(request.agent, request.roles)
    for role, agent in roles.items():
        if agent not in settings.agents:
            known = ", ".join(sorted(settings.agents))
            played = "" if agent == request.agent else f" (for the {role})"
            raise BadRequest(f"unknown agent {agent!r}{played}; configured agents: {known}")
    claims = request.claims or settings.claims
    review = settings.review if request.review is None else request.review
    _refuse_missing_programs(settings, roles, _roles_used(request.plan, claims, review), repo)
    job_id = new_ulid()
    notes: list[str] = []
    unsandboxed = tuple(role for role, agent in roles.items() if settings.agents[agent].sandbox == "none")
    max_tokens, task_max_tokens = _caps(settings, request)
    if not request.plan:
        if request.pool:
            raise BadRequest(
                "--no-plan works in the repository itself, on this machine: no worker can run it; "
                "leave out --pool, or plan the job"
            )
        if request.approve or request.plan_json is not None:
            raise BadRequest("--approve and --plan FILE need a planned job; --no-plan has no plan and no merge")
        _refuse_to_work_in(repo, settings.state_dir)
        submit = SubmitJob(
            goal=request.goal,
            repo=str(repo),
            roles=roles,
            plan=False,
            unsandboxed=unsandboxed,
            priority=request.priority,
            by=context.asker,
            max_tokens=max_tokens,
            task_max_tokens=task_max_tokens,
            on_budget=settings.on_budget,
        )
        uncommitted = await _uncommitted(repo)
        if uncommitted:
            notes.append(
                f"{_changes(repo, uncommitted)}: with --no-plan the agent works on them in place; commit them "
                "first to keep a copy"
            )
    else:
        if context.git_problem is not None:
            raise BadRequest(f"{context.git_problem}; install a newer git, or use --no-plan")
        try:
            base_sha = await git.resolve(repo, "HEAD")
        except git.GitError:
            raise BadRequest(
                f"repo {repo} is not a git repository with a commit; a planned job works on branches of it "
                "(git init && git commit), or use --no-plan"
            ) from None
        given = _given_plan(request.plan_json, repo)
        uncommitted = await _uncommitted(repo)
        parallel = request.parallel or settings.parallel
        if not 1 <= parallel <= 256:
            raise BadRequest(f"parallel {parallel} is out of range; give --parallel between 1 and 256")
        submit = SubmitJob(
            goal=request.goal,
            repo=str(repo),
            roles=roles,
            parallel=parallel,
            checks=settings.checks + request.checks,
            review=review,
            max_attempts=settings.max_attempts,
            backoff_s=settings.backoff_s,
            max_replans=settings.max_replans,
            claims=claims,
            base_sha=base_sha,
            uncommitted=None if uncommitted is None else tuple(uncommitted),
            unsandboxed=unsandboxed,
            priority=request.priority,
            branch=await git.current_branch(repo),
            by=context.asker,
            approve=settings.approvals(request.approve),
            max_tokens=max_tokens,
            task_max_tokens=task_max_tokens,
            on_budget=settings.on_budget,
            escalate=settings.escalations(),
            pool=_pool(request.pool, settings.default_pool),
            given_plan=None if given is None else given.plan,
            given_plan_hash="" if given is None else given.hash,
        )
        if uncommitted is None:
            notes.append(
                f"could not tell within {UNCOMMITTED_WAIT_S:g} s whether {repo} has uncommitted changes; the job "
                f"works from commit {base_sha[:12]} (HEAD), without any"
            )
        elif uncommitted:
            notes.append(uncommitted_note(repo, base_sha, uncommitted))
    await context.book.decide(job_id, submit)
    context.jobs.start(job_id)
    return RunReply(job=job_id, subject=subjects.job_events(job_id), notes=notes)


def _roles_used(plan: bool, claims: str, review: bool) -> tuple[str, ...]:
    """The roles a job may call an agent for: the executor alone with --no-plan; the claimer only when executors
    claim (`claims = "agent"`), the reviewer only when tasks are reviewed."""
    if not plan:
        return ("executor",)
    return (
        "planner",
        "queen",
        "executor",
        *(("claimer",) if claims == "agent" else ()),
        *(("reviewer",) if review else ()),
    )


def _refuse_missing_programs(settings: Settings, roles: dict[str, str], used: tuple[str, ...], repo: Path) -> None:
    """Refuse the job now, in one line, when the program of a role's agent cannot be found (on the PATH the agent
    would get, or as given), rather than after its retries: looked up as `numerusd.terminal.spawn` will."""
    for role in used:
        agent = roles[role]
        profile = settings.agents[agent]
        try:
            argv, env = adapter_for(profile).command(AgentInvocation(prompt="", repo=repo))
        except ConfigError as e:
            raise BadRequest(f"agent {agent!r} (the {role}) cannot run: {e.message}") from None
        if find_program(argv[0], {**inherited_environment(), **env}) is None:
            where = "does not exist or is not executable" if "/" in argv[0] else "is not on numerusd's PATH"
            raise BadRequest(
                f"agent {agent!r} (the {role}) cannot start: its program {argv[0]} {where}; install it, or set the "
                f"profile's binary in numerusd's configuration"
            )


def _pool(asked: str | None, default: str) -> str:
    """The pool of workers that runs the job's executors: `run --pool`, else `default_pool` ("": the daemon)."""
    pool = default if asked is None else asked
    if pool and not is_token(pool):
        raise BadRequest(
            f"pool {pool!r} is not a pool name; give --pool with letters, digits, '_' and '-' (not first), at most 64"
        )
    return pool


def _caps(settings: Settings, request: RunJob) -> tuple[int | None, int | None]:
    """The job's token caps, its own and each task's: `run --max-tokens`, `--task-max-tokens`, else the settings'."""
    return request.max_tokens or settings.max_tokens, request.task_max_tokens or settings.task_max_tokens


def _given_plan(plan_json: str | None, repo: Path) -> plans.ValidatedPlan | None:
    """The user's plan (`run --plan FILE`), validated as a planner's answer is (paths that leave the repository,
    symlinks out of it, cycles…); refused with every error before anything is recorded."""
    if plan_json is None:
        return None
    checked = plans.validate_plan(plan_json, repo=repo)
    if isinstance(checked, plans.ValidatedPlan):
        return checked
    # Every error, `; ` between them: a reply is one line (the service escapes newlines).
    errors = f"{len(checked)} error{'s' if len(checked) != 1 else ''}"
    raise BadRequest(f"the plan is not valid ({errors}), nothing was recorded: {'; '.join(map(str, checked))}")


def _refuse_to_work_in(repo: Path, state_dir: Path) -> None:
    """`--no-plan` puts the agent in the directory itself: never `/`, a home directory or the daemon's state."""
    where, state = repo.resolve(), state_dir.expanduser().resolve()
    if where == Path("/") or where == Path.home().resolve():
        raise BadRequest(
            f"repo {repo} is {'the root directory' if where == Path('/') else 'your home directory'}: with --no-plan "
            "the agent works in it in place; pass the repository to work on with --repo"
        )
    if where.is_relative_to(state) or state.is_relative_to(where):
        raise BadRequest(
            f"repo {repo} holds numerusd's state directory ({state}) or lies inside it: an agent must not work "
            "there; pass the repository to work on with --repo"
        )


async def _uncommitted(repo: Path) -> list[str] | None:
    """The repository's uncommitted paths; None when git cannot tell in time (or at all: the job goes on)."""
    try:
        return await asyncio.wait_for(git.uncommitted(repo), UNCOMMITTED_WAIT_S)
    except (TimeoutError, git.GitError):
        return None


def uncommitted_note(repo: Path, base_sha: str, paths: list[str]) -> str:
    """What the user is told when the job leaves out changes of their working tree."""
    return (
        f"{_changes(repo, paths)} left out: the job works from commit {base_sha[:12]} (HEAD), "
        "so its agents do not see them; to include them, commit them and submit the job again"
    )


def _changes(repo: Path, paths: list[str]) -> str:
    """`2 uncommitted changes in /repo (a.md, b.md)`: how many, and the first three."""
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    changes = "1 uncommitted change" if len(paths) == 1 else f"{len(paths)} uncommitted changes"
    return f"{changes} in {repo} ({shown})"
