"""`numerusctl`: the thin client. Each command sends one request to `numerus.cmd.<verb>` and prints the reply.

    numerusctl run GOAL [--repo PATH] [--agent NAME] [--role ROLE=PROFILE]... [--parallel N] [--check CMD]...
                   [--no-review] [--no-plan | --plan FILE] [--approve plan|merge|all]... [--max-tokens N]
                   [--task-max-tokens N] [--wait]
    numerusctl plan JOB [--format text|dot|mermaid]
    numerusctl status [JOB] [--limit N | --all] [--repo PATH]
    numerusctl logs JOB [TASK] [-f] [--raw] [--check]
    numerusctl events [JOB] [-f]
    numerusctl kill JOB [TASK]
    numerusctl resume JOB
    numerusctl retry JOB [TASK]...
    numerusctl skip JOB TASK
    numerusctl diff JOB [TASK] [--stat] [--color always|never|auto]
    numerusctl accept JOB [--branch NAME] [--push REMOTE] [--partial]
    numerusctl discard JOB
    numerusctl attach JOB TASK [--read-only]
    numerusctl top
    numerusctl approve JOB [TASK] [--add-tokens N]
    numerusctl reject JOB [TASK] [--reason TEXT]
    numerusctl audit verify [JOB] [--key-file F] [--expect-head DIGEST] [--finished]
    numerusctl ping
    numerusctl completion bash|zsh|fish

A JOB is its id, `last`, or 4+ characters of its start or end; the commands that subscribe to a job's subjects
themselves resolve it first with one `status` request (`_job_id`). Shell completion asks numerusd for job ids,
tasks and agent profiles (docs/operations.md, "Everyday handling").

`run` plans the goal into tasks (planner), lets each claim its files (GO / NO GO), runs them in worktrees
(executor), passes each through the quality gate (checks, reviewer) and merges it into the job's integration
branch `numerus/<job>.integration`; `--no-plan` runs one supervised agent on the goal instead.

`--json` (before or after the command) prints replies and events as JSON instead of text. Following (`run
--wait`, `logs -f`, `events -f`) and `audit verify` read the JetStream streams directly with ordered consumers
(`feed.py`); `audit verify` trusts nothing the daemon says (but which job a reference names) and checks every
event with the key. Under `--json` an error is one JSON line on stderr, `{"error": {"code", "message", "exit"}}`.

Each command imports what it alone needs inside its own body (the stream reader, the event renderer, the
auditor), so a one-request command such as `status` starts no faster or slower for the others
(`bench/bench_cli.py` measures it against a bare nats-py request).

`--role operator|viewer` (default operator) picks the login from the connection file: a viewer may only read
(status, plan, logs, events, diff, audit, top; attach only read-only); see `numerusd/bus_roles.py`.

Exit codes (`numerusd.protocol.exit_codes.CtlExit`): 0 ok; 1 refused or failed (an error reply, a failed job
under `--wait`, a problem found by the audit); 2 usage; 3 numerusd cannot be reached; 4 numerusd runs but its
bus does not answer. No
failure prints a traceback (set `NUMERUSCTL_DEBUG=1` to see one for an unexpected error).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import msgspec
from nats.aio.client import Client

from numerusctl import render
from numerusctl.connection import (
    EXIT_NAMES,
    CtlError,
    connected,
    decode_reply,
    request,
    resolve_target,
    state_dir_or_default,
)
from numerusd.protocol import subjects
from numerusd.protocol.commands import (
    MAX_PRIORITY,
    MAX_TOKENS,
    ROLES,
    AcceptJob,
    AcceptReply,
    ApproveJob,
    CleanJobs,
    CleanReply,
    DiffReply,
    DiscardJob,
    DiscardReply,
    EventsReply,
    GetDiff,
    GetEvents,
    GetLogs,
    GetPlan,
    GetStatus,
    KillJob,
    LogsReply,
    PauseJob,
    PlanReply,
    RejectJob,
    Request,
    ResumeJob,
    RetryJob,
    RunJob,
    RunReply,
    SkipTask,
    StartJob,
    StatusReply,
)
from numerusd.protocol.connection import CLIENT_ROLES
from numerusd.protocol.exit_codes import CtlExit
from numerusd.protocol.ids import is_token, is_whole_id

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

    from numerusctl.feed import Stored, StreamFeed

#: Jobs `status` lists by default, newest first.
STATUS_LIMIT = 20
#: How long `clean` waits for its answer (or --timeout, if longer): removing many worktrees takes a while.
CLEAN_WAIT_S = 600.0
#: How long `diff`, `accept` and `discard` wait (or --timeout, if longer): git on a large repository, a push.
RESULT_WAIT_S = 120.0

# Replies are decoded by their protocol type in `connection.decode_reply`; an event's payload, as plain JSON.
_any_json = msgspec.json.Decoder()

#: The job events after which `run --wait` and `logs -f` stop, and what `run --wait` then exits with.
_JOB_END = {
    "JobCompleted": CtlExit.OK,
    "JobFailed": CtlExit.FAILED,
    "JobKilled": CtlExit.FAILED,
    "JobInterrupted": CtlExit.FAILED,
}
_JOB_END_SUFFIXES = {subjects.snake_name(name) for name in _JOB_END}


T = TypeVar("T")


@dataclass
class Options:
    """The global options, as given (click has already read the environment variables into them)."""

    json: bool = False
    state_dir: Path | None = None
    nats_url: str | None = None
    nats_user: str | None = field(default=None, repr=False)
    nats_password: str | None = field(default=None, repr=False)
    creds: Path | None = None
    timeout: float = 5.0
    role: str = CLIENT_ROLES[0]


def _options(ctx: click.Context, as_json: bool = False) -> Options:
    opts: Options = ctx.find_object(Options) or Options()
    if as_json:
        opts.json = True
    return opts


def _run(coro: Coroutine[Any, Any, int | None]) -> None:
    """Run one command's coroutine: every failure becomes one line and an exit code, never a traceback."""
    try:
        code = asyncio.run(coro)
    except (click.ClickException, BrokenPipeError):
        raise
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as e:
        if os.environ.get("NUMERUSCTL_DEBUG"):
            raise
        raise CtlError(f"unexpected error: {type(e).__name__}: {e} (NUMERUSCTL_DEBUG=1 shows where)") from None
    if code:
        raise SystemExit(code)


async def _with_daemon(opts: Options, body: Callable[[Client], Awaitable[T]]) -> T:
    target = resolve_target(
        state_dir=opts.state_dir,
        nats_url=opts.nats_url,
        nats_user=opts.nats_user,
        nats_password=opts.nats_password,
        creds=opts.creds,
        role=opts.role,
    )
    async with connected(target, opts.timeout) as nc:
        return await body(nc)


def _out(data: bytes | str) -> None:
    """Write to stdout: bytes raw, text with a newline and its control characters escaped (`render.visible`:
    agents write much of it, and must not drive the operator's terminal)."""
    click.echo(render.visible(data) if isinstance(data, str) else data, nl=isinstance(data, str))


def _ask(opts: Options, verb: str, body: Request, text: Callable[[Any], str]) -> None:
    """Send one request and print its reply: as received under --json, else `text(reply)` of the decoded reply."""

    async def ask(nc: Client) -> int:
        data = await request(nc, verb, body, opts.timeout)
        _out(data.decode() if opts.json else text(decode_reply(verb, data)))
        return 0

    _run(_with_daemon(opts, ask))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _token(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Job and task ids go into NATS subjects: refuse anything that is not one token (`.`, `*`, `>`, spaces)."""
    if value is not None and not is_token(value):
        raise click.BadParameter(
            f"{value!r} is not an id (letters, digits, '_' and '-' only, not starting with '-')", param=param
        )
    return value


def _tokens(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        _token(ctx, param, value)
    return values


async def _job_id(nc: Client, ref: str, timeout: float) -> str:
    """The whole id of the job `ref` names (its id, `last`, or 4+ characters of its start or end), for the commands
    that subscribe to the job's subjects themselves: one `status` request, none for a whole id. An unknown or
    ambiguous reference is numerusd's one-line refusal (naming the candidates), exit 1."""
    if is_whole_id(ref):
        return ref
    reply: StatusReply = decode_reply("status", await request(nc, "status", GetStatus(job=ref), timeout))
    if len(reply.jobs) != 1 or not is_whole_id(reply.jobs[0].id):
        raise CtlError(f"numerusd named no single job for {ref!r}")
    return reply.jobs[0].id


# --- shell completion -------------------------------------------------------------------------------------------

#: Seconds a completion may wait for numerusd: a shell waits for it at every Tab.
COMPLETION_TIMEOUT_S = 0.5
#: The newest jobs offered for completion.
COMPLETION_JOBS = 200


def _ask_for_completion(ctx: click.Context, query: GetStatus) -> StatusReply | None:
    """numerusd's answer to `query`, asked with the connection options given so far; None on any failure (a
    completion says nothing: the shell simply offers nothing)."""
    given = ctx.find_root().params
    try:
        target = resolve_target(
            state_dir=given.get("state_dir"),
            nats_url=given.get("nats_url"),
            nats_user=given.get("nats_user"),
            nats_password=given.get("nats_password"),
            creds=given.get("creds"),
            role=given.get("bus_role") or CLIENT_ROLES[0],
        )

        async def ask() -> StatusReply:
            async with connected(target, COMPLETION_TIMEOUT_S) as nc:
                return decode_reply("status", await request(nc, "status", query, COMPLETION_TIMEOUT_S))

        return asyncio.run(asyncio.wait_for(ask(), 4 * COMPLETION_TIMEOUT_S))
    except Exception:
        return None


def _complete_jobs(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Job ids that start (or end) with what was typed, newest first, each with its goal; and `last`."""
    from click.shell_completion import CompletionItem

    reply = _ask_for_completion(ctx, GetStatus(limit=COMPLETION_JOBS))
    typed = incomplete.upper()
    items = [CompletionItem("last", help="the newest job")] if "last".startswith(incomplete) else []
    for job in reply.jobs if reply is not None else ():
        if job.id.startswith(typed) or (len(typed) >= 4 and job.id.endswith(typed)):
            items.append(CompletionItem(job.id, help=render.visible(render.first_line(job.goal, 60))))
    return items


def _complete_tasks(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The task ids of the job already typed that start with what was typed."""
    from click.shell_completion import CompletionItem

    job = ctx.params.get("job")
    reply = _ask_for_completion(ctx, GetStatus(job=job)) if job else None
    tasks = reply.jobs[0].tasks if reply is not None and reply.jobs else []
    return [
        CompletionItem(task.id, help=render.visible(render.first_line(task.title, 60)))
        for task in tasks
        if task.id.startswith(incomplete)
    ]


def _complete_agents(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The agent profiles numerusd knows that start with what was typed."""
    from click.shell_completion import CompletionItem

    reply = _ask_for_completion(ctx, GetStatus(limit=1))
    return [CompletionItem(name) for name in (reply.agents if reply else ()) if name.startswith(incomplete)]


class _Numerusctl(click.Group):
    """The command group, with every error on one line like every other error (usage: exit 2); under `--json`
    that line is `{"error": {"code": ..., "message": ..., "exit": N}}` on stderr, with the same exit code."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the CLI; exits with the command's code. `standalone_mode=False` behaves as click's own."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = list(kwargs.get("args") or (args[0] if args else None) or sys.argv[1:])
        # Known before click parses anything, so that a usage error too comes as JSON.
        as_json = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # no command at all: the help is the answer
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            _fail(f"{e.format_message()}{hint}", e.exit_code, "usage", as_json)
        except CtlError as e:
            _fail(e.message, e.exit_code, e.code, as_json)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code, EXIT_NAMES.get(e.exit_code, "failed"), as_json)
        except click.Abort:
            _fail("aborted", 130, "interrupted", as_json)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, exit_code: int, code: str, as_json: bool) -> NoReturn:
    """Say what went wrong on stderr, in one line of text or of JSON, and exit with `exit_code`."""
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message, "exit": exit_code}}), err=True)
    else:
        click.echo(f"numerusctl: {render.visible(message)}", err=True)  # it may quote the daemon or an agent
    sys.exit(exit_code)


@click.group(cls=_Numerusctl, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="numerus", prog_name="numerusctl", message="%(prog)s %(version)s")
@click.option("--json", "as_json", is_flag=True, help="Print replies and events as JSON.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="NUMERUS_STATE_DIR",
    help="numerusd's state directory, where its connection.json is [~/.local/state/numerus].",
)
@click.option("--nats-url", envvar="NUMERUS_NATS_URL", help="Talk to numerusd through this NATS server.")
@click.option("--nats-user", envvar="NUMERUS_NATS_USER", help="User for --nats-url.")
@click.option("--nats-password", envvar="NUMERUS_NATS_PASSWORD", help="Password for --nats-url.")
@click.option(
    "--creds",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="NUMERUS_NATS_CREDS",
    help="NATS credentials file for --nats-url.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    envvar="NUMERUS_TIMEOUT",
    help="Seconds to wait to connect and for each reply.",
)
@click.option(
    "--role",
    "bus_role",
    type=click.Choice(CLIENT_ROLES),
    default=CLIENT_ROLES[0],
    show_default=True,
    envvar="NUMERUS_ROLE",
    help="Log in to the bus as: operator (commands and reads) or viewer (status, plan, logs, events, audit).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    as_json: bool,
    state_dir: Path | None,
    nats_url: str | None,
    nats_user: str | None,
    nats_password: str | None,
    creds: Path | None,
    timeout: float,
    bus_role: str,
) -> None:
    """Control numerusd: submit goals, watch jobs and their agents, stop them, audit the record."""
    ctx.obj = Options(as_json, state_dir, nats_url, nats_user, nats_password, creds, timeout, bus_role)


# --- run ------------------------------------------------------------------------------------------------------


def _roles(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """`--role planner=strong --role reviewer=careful` -> {"planner": "strong", "reviewer": "careful"}."""
    roles: dict[str, str] = {}
    for value in values:
        role, eq, profile = value.partition("=")
        role, profile = role.strip(), profile.strip()
        if not eq or not profile:
            raise click.BadParameter(f"{value!r} is not ROLE=PROFILE (e.g. planner=strong)", param=param)
        if role not in ROLES:
            raise click.BadParameter(f"unknown role {role!r}; the roles are {', '.join(ROLES)}", param=param)
        if roles.get(role, profile) != profile:
            raise click.BadParameter(f"the {role} is given twice ({roles[role]} and {profile})", param=param)
        roles[role] = profile
    return roles


def _checks(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    if any(not value.strip() for value in values):
        raise click.BadParameter("a check is a shell command; this one is empty", param=param)
    return values


def _approvals(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...] | None:
    """`--approve plan --approve merge`, `--approve plan,merge`, `--approve all` -> ("plan", "merge"); None when
    not given (numerusd's `approve` setting applies)."""
    if not values:
        return None
    gates: list[str] = []
    for value in values:
        for gate in (part.strip() for part in value.split(",")):
            if gate not in ("plan", "merge", "all"):
                raise click.BadParameter(f"{gate!r} is not plan, merge or all", param=param)
            gates += ["plan", "merge"] if gate == "all" else [gate]
    return tuple(gate for gate in ("plan", "merge") if gate in gates)


@cli.command()
@click.argument("goal")
@click.option(
    "--repo",
    type=click.Path(exists=True, file_okay=False, dir_okay=True, resolve_path=True, path_type=Path),
    help="The repository to work in: for a planned job, a git repository with a commit (any directory in it names "
    "it) [the repository of the current directory].",
)
@click.option(
    "--agent",
    shell_complete=_complete_agents,
    help="Agent profile of every role [numerusd's configured roles, else its default_agent].",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    metavar="ROLE=PROFILE",
    callback=_roles,
    help=f"Agent profile of one role ({', '.join(ROLES)}), over --agent; repeatable.",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 256),
    metavar="N",
    help="Most agents of the job working at once, claims asked ahead aside [numerusd's parallel].",
)
@click.option(
    "--check",
    "checks",
    multiple=True,
    metavar="CMD",
    callback=_checks,
    help="A shell command each task's work must pass (exit 0) before it merges, after the configured ones; repeatable.",
)
@click.option(
    "--review/--no-review",
    default=None,
    help="Whether the reviewer must agree before a task merges [numerusd's review].",
)
@click.option(
    "--claims",
    type=click.Choice(["agent", "plan"]),
    help="Where each task's claim on files comes from: its executor, asked first (agent), or the plan's intents "
    "(plan, one agent call fewer per task) [numerusd's claims].",
)
@click.option(
    "--no-plan",
    "no_plan",
    is_flag=True,
    help="One supervised agent works on the whole goal, with no plan, claims, checks or review.",
)
@click.option(
    "--priority",
    type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY),
    default=0,
    metavar="N",
    help=f"The job's place in numerusd's queue of agent slots (max_agents): higher first, {-MAX_PRIORITY} to "
    f"{MAX_PRIORITY} [0].",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Your own plan (the JSON a planner answers, docs/plans.md), validated as a planner's is: no planner is asked.",
)
@click.option(
    "--approve",
    "approvals",
    multiple=True,
    metavar="plan|merge|all",
    callback=_approvals,
    help="Wait for 'numerusctl approve' at the validated plan, before the job is final (merge), or both (all); "
    "repeatable or comma-separated [numerusd's approve].",
)
@click.option(
    "--pool",
    metavar="NAME",
    help="The pool of remote workers ('numerusd worker --pool NAME') that runs the job's executors; '' for "
    "numerusd itself [numerusd's default_pool].",
)
@click.option("--max-tokens", type=click.IntRange(1, MAX_TOKENS), metavar="N", help="Token cap of the whole job.")
@click.option("--task-max-tokens", type=click.IntRange(1, MAX_TOKENS), metavar="N", help="Token cap of each task.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 1 unless it completed.")
@json_option
@click.pass_context
def run(
    ctx: click.Context,
    goal: str,
    repo: Path | None,
    agent: str | None,
    roles: dict[str, str],
    parallel: int | None,
    checks: tuple[str, ...],
    review: bool | None,
    claims: str | None,
    no_plan: bool,
    plan_file: Path | None,
    approvals: tuple[str, ...] | None,
    max_tokens: int | None,
    task_max_tokens: int | None,
    priority: int,
    pool: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Submit GOAL for the repository and print the job id.

    numerusd plans the goal into tasks, runs each in its own worktree once its claim on files is granted, checks
    and reviews its work, and merges it into the branch numerus/<job>.integration; your branches are left as
    they are.
    """
    opts = _options(ctx, as_json)  # the goal itself is numerusd's to judge: one place says what a good one is
    plan = not no_plan
    if not plan:
        _refuse_with_no_plan(roles, parallel, checks, review, claims, plan_file, approvals)
    job = RunJob(
        goal=goal,
        repo=str(_repository(repo, plan)),
        agent=agent,
        plan=plan,
        roles=roles,
        parallel=parallel,
        checks=checks,
        review=review,
        claims=claims,
        priority=priority,
        approve=approvals,
        max_tokens=max_tokens,
        task_max_tokens=task_max_tokens,
        plan_json=None if plan_file is None else _read_plan(plan_file),
        pool=pool,
    )

    submitted: list[str] = []

    async def body(nc: Client) -> int:
        data = await request(nc, "run", job, opts.timeout)
        reply: RunReply = decode_reply("run", data)
        submitted.append(reply.job)
        _out(data.decode() if opts.json else reply.job)
        for note in [] if opts.json else reply.notes:  # --json has them in the reply
            click.echo(render.visible(f"numerusctl: note: {note}"), err=True)
        if not wait:
            return 0
        return await _follow_job(nc, reply.job, opts.json)

    try:
        _run(_with_daemon(opts, body))
    except SystemExit as e:
        if e.code == 130 and submitted:  # Ctrl-C while waiting: only the waiting stops
            click.echo(
                f"numerusctl: stopped waiting; job {submitted[0]} goes on (numerusctl kill {submitted[0]} stops it)",
                err=True,
            )
        raise


def _repository(given: Path | None, plan: bool) -> Path:
    """The repository a job works in: `--repo` (for a planned job, the top of the git working tree it is in, as
    git itself takes any directory in a repository for it), else the repository of the current directory.

    Outside a git working tree it is the directory itself: the single-task path needs none, and numerusd says
    what a planned job needs.
    """
    if given is not None and not plan:
        return given  # the agent works where it is told
    start = given or Path.cwd()
    try:
        found = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return start  # no git here: numerusd, which needs one for a planned job, says so
    top = found.stdout.strip()
    return Path(top) if found.returncode == 0 and top else start


#: The largest plan file `run --plan` reads; numerusd refuses a request over its own limit (max_request_bytes).
PLAN_FILE_BYTES = 4 * 1024 * 1024


def _read_plan(path: Path) -> str:
    """The text of a plan file, for numerusd to validate; a usage error when it cannot be read as UTF-8."""
    try:
        with path.open("rb") as file:
            data = file.read(PLAN_FILE_BYTES + 1)
    except OSError as e:
        raise CtlError(f"cannot read the plan {path}: {e.strerror}", CtlExit.USAGE) from None
    if len(data) > PLAN_FILE_BYTES:
        raise CtlError(f"the plan {path} is over {PLAN_FILE_BYTES // (1024 * 1024)} MiB; a plan is JSON of tasks")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CtlError(f"the plan {path} is not UTF-8 text; a plan is JSON (docs/plans.md)", CtlExit.USAGE) from None


def _refuse_with_no_plan(
    roles: dict[str, str],
    parallel: int | None,
    checks: tuple[str, ...],
    review: bool | None,
    claims: str | None,
    plan_file: Path | None = None,
    approvals: tuple[str, ...] | None = None,
) -> None:
    """A usage error for an option that the single-task path (`--no-plan`) would silently ignore."""
    ignored = [f"--role {role}=..." for role in roles if role != "executor"]
    if plan_file is not None:
        ignored.append("--plan")
    if approvals:
        ignored.append("--approve")
    if parallel is not None:
        ignored.append("--parallel")
    if checks:
        ignored.append("--check")
    if review is not None:
        ignored.append("--review" if review else "--no-review")
    if claims is not None:
        ignored.append("--claims")
    if ignored:
        raise click.UsageError(
            f"--no-plan runs one agent with no plan, claims, checks or review, so {', '.join(ignored)} cannot apply"
        )


async def _follow_job(nc: Client, job: str, as_json: bool) -> int:
    """Print the job's events as progress (or JSON lines) from its start until it ends; its exit code."""
    from numerusctl.feed import StreamFeed
    from numerusctl.render_events import progress_line
    from numerusd.protocol.envelope import InvalidEvent, decode_wire

    async with StreamFeed(nc, subjects.EVENTS, subjects.job_events(job)) as feed:
        async for batch in feed.forever():
            for stored in batch:
                try:
                    env = decode_wire(stored.data)
                    data = _any_json.decode(env.data)
                except (InvalidEvent, msgspec.DecodeError, UnicodeDecodeError):
                    continue  # not an event the daemon wrote; `audit verify` is the place to name it
                if as_json:
                    _out(stored.data)
                    _out("")
                else:
                    line = progress_line(job, env.type, env.task, data)
                    if line is not None:
                        _out(line)
                if env.type in _JOB_END and env.task is None:
                    return _JOB_END[env.type]
    return CtlExit.FAILED  # unreachable: forever() only ends by raising


# --- status ---------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", required=False, callback=_token, shell_complete=_complete_jobs)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=STATUS_LIMIT,
    show_default=True,
    metavar="N",
    help="Without JOB: list the newest N jobs.",
)
@click.option("--all", "every", is_flag=True, help="Without JOB: list every job.")
@click.option(
    "--repo",
    type=click.Path(file_okay=False, resolve_path=True, path_type=Path),
    help="Without JOB: only the jobs of this repository (any directory in it names it).",
)
@json_option
@click.pass_context
def status(ctx: click.Context, job: str | None, limit: int, every: bool, repo: Path | None, as_json: bool) -> None:
    """The newest jobs, one line each, or one JOB with its tasks."""
    opts = _options(ctx, as_json)
    if job is not None and repo is not None:
        raise click.UsageError("--repo picks jobs for a list; with JOB, leave it out")
    where = msgspec.UNSET if repo is None else str(_repository(repo, plan=True))

    async def body(nc: Client) -> int:
        query = GetStatus(job=job) if job is not None else GetStatus(limit=None if every else limit, repo=where)
        data = await request(nc, "status", query, opts.timeout)
        reply: StatusReply = decode_reply("status", data)
        while reply.next is not None:  # a long list comes in pages, each within a NATS message
            want = None if query.limit is None else query.limit - len(reply.jobs)
            page: StatusReply = decode_reply(
                "status",
                await request(nc, "status", GetStatus(limit=want, repo=where, before=reply.next), opts.timeout),
            )
            reply = msgspec.structs.replace(page, jobs=reply.jobs + page.jobs)
            data = msgspec.json.encode(reply)
        if opts.json:
            _out(data.decode())
        elif job is not None and len(reply.jobs) == 1:
            _out(render.job_detail(reply.jobs[0], datetime.now(UTC)))
        else:
            _out(render.jobs_table(reply.jobs, datetime.now(UTC), reply.total, reply.cleanable, reply.queued))
        return 0

    _run(_with_daemon(opts, body))


# --- plan -----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "dot", "mermaid"]),
    default="text",
    show_default=True,
    help="text for the terminal (with each task's status), Graphviz dot, or a Mermaid flowchart.",
)
@json_option
@click.pass_context
def plan(ctx: click.Context, job: str, fmt: str, as_json: bool) -> None:
    """The plan of JOB: its tasks in waves, what each depends on and the files it means to touch.

    dot and mermaid print the drawing alone, to pipe on (`numerusctl plan JOB --format dot | dot -Tsvg`).
    """
    opts = _options(ctx, as_json)

    async def body(nc: Client) -> int:
        data = await request(nc, "plan", GetPlan(job=job, format=fmt), opts.timeout)
        reply: PlanReply = decode_reply("plan", data)
        if opts.json:
            _out(data.decode())
        elif fmt == "text":
            _out(render.plan_text(reply))
        else:
            _out(reply.rendered.rstrip("\n"))
        return 0

    _run(_with_daemon(opts, body))


# --- logs -----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task_arg", metavar="[TASK]", required=False, callback=_token, shell_complete=_complete_tasks)
@click.option("--task", callback=_token, shell_complete=_complete_tasks, help="Only this task (as TASK).")
@click.option("-f", "--follow", is_flag=True, help="Stream the output live until the job ends.")
@click.option(
    "--raw",
    is_flag=True,
    help="The bytes as the agents wrote them: control sequences passed through, no task prefix on -f.",
)
@click.option("--check", "check", is_flag=True, help="The whole output of TASK's failed checks instead.")
@json_option
@click.pass_context
def logs(
    ctx: click.Context,
    job: str,
    task_arg: str | None,
    task: str | None,
    follow: bool,
    raw: bool,
    check: bool,
    as_json: bool,
) -> None:
    """The agents' terminal output of JOB (or of its TASK), control sequences shown escaped (`\\x1b[2J`) unless
    --raw; with -f, live, each line after its task (`t2 | ...`, coloured on a terminal).

    With --check, the whole output of TASK's failed checks (the gate's tests and linters), each from its log file.
    """
    opts = _options(ctx, as_json)
    if task_arg is not None and task is not None and task_arg != task:
        raise click.UsageError(f"two tasks named: {task_arg} and --task {task}")
    task = task or task_arg
    if check and (task is None or follow):
        raise click.UsageError("--check shows one task's failed checks after the fact: name the TASK, without -f")

    async def body(nc: Client) -> int:
        data = await request(nc, "logs", GetLogs(job=job, task=task, check=check), opts.timeout)
        reply: LogsReply = decode_reply("logs", data)
        if follow:
            return await _follow_logs(nc, reply.job, task, raw)
        if opts.json:
            _out(data.decode())
            return 0
        if check and not reply.logs:
            _out(f"no failed check of task {task} in job {reply.job}")
        for log in reply.logs:
            if log.check is not None:
                how = f"exit code {log.exit_code}" if log.exit_code is not None else "out of time"
                _out(f"==> {log.task} attempt {log.attempt}: {log.check} ({how}; {log.path}) <==")
            elif len(reply.logs) > 1 or task is None:
                _out(f"==> {log.task} ({log.path}) <==")
            if log.truncated:
                _out(f"[earlier output left out; all of it is in {log.path}]")
            _out(log.text.encode() if raw else render.visible(log.text).encode())
            if log.text and not log.text.endswith("\n"):
                _out("")
        return 0

    _run(_with_daemon(opts, body))


async def _follow_logs(nc: Client, job: str, task: str | None, raw: bool) -> int:
    """Copy `numerus.log.<job>.<task>` chunks to stdout as they come: line by line after their task's name
    (escaped, the name coloured on a terminal), or with `raw` as they are; stop once the job has ended and all
    output stored by then has been written."""
    from numerusctl.feed import StreamFeed

    subject = subjects.job_logs(job) if task is None else subjects.task_log(job, task)
    out = sys.stdout.buffer  # chunks are bytes from a terminal, escapes and all: with --raw, copied as they are
    lines = render.TaskLines(colour=_colour(sys.stdout))

    def write(stored: Stored) -> None:
        out.write(stored.data if raw else lines.feed(stored.subject.rpartition(".")[2], stored.data).encode())

    async with (
        StreamFeed(nc, subjects.LOGS, subject) as log_feed,
        StreamFeed(nc, subjects.EVENTS, subjects.job_level_events(job)) as job_feed,
    ):
        ended = asyncio.create_task(_job_end(job_feed))
        try:
            while not ended.done():
                next_chunks = asyncio.create_task(log_feed.next_batch())
                await asyncio.wait({next_chunks, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not next_chunks.done():
                    next_chunks.cancel()
                    break
                for stored in next_chunks.result():
                    write(stored)
                out.flush()
            ended.result()  # a lost connection surfaces here
            # The job's end is recorded after its agents' output was published: drain what is stored.
            async for batch in log_feed.drain():
                for stored in batch:
                    write(stored)
            if not raw:
                out.write(lines.close().encode())
            out.flush()
        finally:
            ended.cancel()
    return 0


def _colour(stream: Any) -> bool:
    """Whether to colour what goes to `stream`: a terminal, unless NO_COLOR is set (no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


async def _job_end(feed: StreamFeed) -> None:
    # Job-level events only (`numerus.job.<job>.*`), so task events do not have to be read through.
    async for batch in feed.forever():
        if any(subjects.event_suffix(stored.subject) in _JOB_END_SUFFIXES for stored in batch):
            return


# --- events ---------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", required=False, callback=_token, shell_complete=_complete_jobs)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they are stored.")
@json_option
@click.pass_context
def events(ctx: click.Context, job: str | None, follow: bool, as_json: bool) -> None:
    """The events of JOB (or of every job), as stored: `seq time type task summary`, or exact JSON lines."""
    from numerusctl.render_events import event_line

    opts = _options(ctx, as_json)

    def show(seq: int | None, wire: bytes) -> None:
        if opts.json:
            _out(wire)
            _out("")
        else:
            _out(event_line(seq, wire))

    async def body(nc: Client) -> int:
        job_id = None if job is None else await _job_id(nc, job, opts.timeout)
        after = 0
        while True:
            data = await request(nc, "events", GetEvents(job=job_id, after_seq=after), opts.timeout)
            page: EventsReply = decode_reply("events", data)
            seqs: list[int | None] = list(page.seqs) or [None] * len(page.events)  # an older daemon sends none
            for seq, raw in zip(seqs, page.events, strict=True):
                show(seq, bytes(raw))
            after = page.last_seq
            if not page.more:
                break
        if not follow:
            return 0
        from numerusctl.feed import StreamFeed

        async with StreamFeed(nc, subjects.EVENTS, subjects.job_events(job_id), start_seq=after + 1) as feed:
            async for batch in feed.forever():
                for stored in batch:
                    show(stored.seq, stored.data)
        return 0

    _run(_with_daemon(opts, body))


# --- kill -----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task", required=False, callback=_token, shell_complete=_complete_tasks)
@json_option
@click.pass_context
def kill(ctx: click.Context, job: str, task: str | None, as_json: bool) -> None:
    """Stop JOB: its agents get TERM, then KILL, and the job ends as killed.

    With TASK, that task alone: its agent is stopped, it ends killed, and the tasks that depend on it are skipped
    (`numerusctl retry JOB TASK` brings them all back).
    """
    _ask(_options(ctx, as_json), "kill", KillJob(job=job, task=task), lambda reply: render.kill_text(reply, task))


# --- approve, reject -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task", required=False, callback=_token, shell_complete=_complete_tasks)
@click.option(
    "--add-tokens",
    type=click.IntRange(1, MAX_TOKENS),
    metavar="N",
    help="For a job over its token budget: raise the exceeded cap by N tokens.",
)
@json_option
@click.pass_context
def approve(ctx: click.Context, job: str, task: str | None, add_tokens: int | None, as_json: bool) -> None:
    """Let JOB go on from where it waits for approval (its plan, its merge, a token cap), or give TASK, which
    waits after its escalated attempt failed, one more attempt."""
    _ask(_options(ctx, as_json), "approve", ApproveJob(job=job, task=task, add_tokens=add_tokens), render.approve_text)


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task", required=False, callback=_token, shell_complete=_complete_tasks)
@click.option("--reason", default="", help="Why, recorded with the rejection.")
@json_option
@click.pass_context
def reject(ctx: click.Context, job: str, task: str | None, reason: str, as_json: bool) -> None:
    """End JOB as failed where it waits for approval (a merge keeps its branch), or fail TASK, which waits for
    approval (the tasks depending on it are skipped)."""
    _ask(_options(ctx, as_json), "reject", RejectJob(job=job, task=task, reason=reason), render.reject_text)


# --- resume, retry, skip -------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@json_option
@click.pass_context
def resume(ctx: click.Context, job: str, as_json: bool) -> None:
    """Go on with JOB, interrupted by a daemon stop: each task from its last recorded step.

    numerusd resumes interrupted jobs itself when it starts, unless its config says `resume = "manual"`.
    """
    _ask(_options(ctx, as_json), "resume", ResumeJob(job=job), render.resume_text)


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("tasks", metavar="[TASK]...", nargs=-1, callback=_tokens, shell_complete=_complete_tasks)
@json_option
@click.pass_context
def retry(ctx: click.Context, job: str, tasks: tuple[str, ...], as_json: bool) -> None:
    """Run tasks of JOB again: those named, else every failed, killed or interrupted one.

    Each gets new attempts (as many as a new task) from the integration branch's tip, with what failed before told
    to its agent; the tasks skipped because of it run again too, and an ended job reopens.
    """
    _ask(_options(ctx, as_json), "retry", RetryJob(job=job, tasks=list(tasks)), render.retry_text)


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task", callback=_token, shell_complete=_complete_tasks)
@json_option
@click.pass_context
def skip(ctx: click.Context, job: str, task: str, as_json: bool) -> None:
    """Skip TASK of JOB: it will not run, and the tasks that depend on it run without it.

    A failed, killed or waiting task can be skipped; a running one is killed first (`numerusctl kill JOB TASK`).
    """

    _ask(_options(ctx, as_json), "skip", SkipTask(job=job, task=task), render.skip_text)


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@json_option
@click.pass_context
def pause(ctx: click.Context, job: str, as_json: bool) -> None:
    """Pause JOB: it starts no new agent; those running finish their step. 'numerusctl start JOB' goes on."""
    _ask(_options(ctx, as_json), "pause", PauseJob(job=job), render.pause_text)


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@json_option
@click.pass_context
def start(ctx: click.Context, job: str, as_json: bool) -> None:
    """Let a paused JOB go on, or move a queued JOB to the front of the queue."""
    _ask(_options(ctx, as_json), "start", StartJob(job=job), render.start_text)


# --- attach and top -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token, shell_complete=_complete_jobs)
@click.argument("task", callback=_token, shell_complete=_complete_tasks)
@click.option("--read-only", is_flag=True, help="Watch only: nothing typed is sent (always so for the viewer role).")
@click.pass_context
def attach(ctx: click.Context, job: str, task: str, read_only: bool) -> None:
    """Put the terminal of TASK's running agent in yours: its output live, your keys typed into it (each input
    recorded with its size and hash, never its bytes). Ctrl-] detaches; so does the agent's exit."""
    from numerusctl.attach import attach as attached

    opts = _options(ctx)
    read_only = read_only or opts.role == "viewer"
    _run(_with_daemon(opts, lambda nc: attached(nc, job, task, read_only=read_only, timeout=opts.timeout)))


@cli.command()
@click.pass_context
def top(ctx: click.Context) -> None:
    """A live view of the jobs and their tasks (state, attempt, elapsed, tokens, claims, what a task waits for) and
    the selected task's terminal, fed by the events; keys act on the selection (k kills its job). q quits."""
    from numerusctl.top import run_top  # textual is loaded by this command alone

    opts = _options(ctx)
    _run(_with_daemon(opts, lambda nc: run_top(nc, opts.timeout)))


# --- clean ----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("jobs", metavar="[JOB]...", nargs=-1, callback=_tokens, shell_complete=_complete_jobs)
@click.option("--ended", is_flag=True, help="Every ended job not cleaned yet.")
@click.option("--logs", is_flag=True, help="Their logs too (terminal output, agents' answers); events stay.")
@json_option
@click.pass_context
def clean(ctx: click.Context, jobs: tuple[str, ...], ended: bool, logs: bool, as_json: bool) -> None:
    """Remove what ended jobs left on disk: the worktrees and branches of their tasks that did not merge.

    Each job's integration branch, its result, stays; so does its history. A job still running is refused.
    """
    opts = _options(ctx, as_json)
    if bool(jobs) == ended:
        raise CtlError("name the jobs to clean, or clean every ended job with --ended (not both)", CtlExit.USAGE)

    async def body(nc: Client) -> int:
        query = CleanJobs(jobs=list(jobs), ended=ended, logs=logs)
        data = await request(nc, "clean", query, max(opts.timeout, CLEAN_WAIT_S))
        reply: CleanReply = decode_reply("clean", data)
        _out(data.decode() if opts.json else render.clean_text(reply))
        problems = [f"numerusctl: job {job.job}: {problem}" for job in reply.jobs for problem in job.problems]
        for line in problems:
            click.echo(render.visible(line), err=True)
        return CtlExit.FAILED if problems else CtlExit.OK

    _run(_with_daemon(opts, body))


# --- diff, accept, discard: the result ------------------------------------------------------------------------


@cli.command()
@click.argument("job", callback=_token)
@click.argument("task", required=False, callback=_token)
@click.option("--stat", is_flag=True, help="The summary (files changed, lines added and removed) instead.")
@click.option(
    "--color",
    type=click.Choice(["always", "never", "auto"]),
    default="auto",
    show_default=True,
    help="Colour the diff; auto: when stdout is a terminal (and NO_COLOR is not set).",
)
@click.option(
    "--raw", is_flag=True, help="The patch's own bytes, control characters and all (for a file or `git apply`)."
)
@json_option
@click.pass_context
def diff(ctx: click.Context, job: str, task: str | None, stat: bool, color: str, raw: bool, as_json: bool) -> None:
    """JOB's result as a unified diff: its integration branch against the commit it started from.

    With TASK, that task's work: its merge's changes once merged, else its branch against its base. A diff
    larger than a reply is cut, with a last line saying so and which git command shows it whole. What agents
    wrote is shown with its control characters escaped, unless --raw.
    """
    opts = _options(ctx, as_json)
    painted = color == "always" or (color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    width = max(40, min(400, shutil.get_terminal_size().columns))

    async def body(nc: Client) -> int:
        query = GetDiff(job=job, task=task, stat=stat, width=width)
        data = await request(nc, "diff", query, max(opts.timeout, RESULT_WAIT_S))
        reply: DiffReply = decode_reply("diff", data)
        if opts.json:
            _out(data.decode())
        else:
            text = render.diff_text(reply, color=painted and not raw, stat=stat, raw=raw)
            if text and raw:
                sys.stdout.write(text + "\n")  # not click.echo: it would strip what looks like a colour
            elif text:
                click.echo(text, color=painted)  # escaped by diff_text before its colours; click keeps them
        return 0

    _run(_with_daemon(opts, body))


@cli.command()
@click.argument("job", callback=_token)
@click.option(
    "--branch",
    metavar="NAME",
    help="Put the result on branch NAME (created, or moved forward) instead of your current branch.",
)
@click.option("--push", metavar="REMOTE", help="Then push the branch to REMOTE, a remote of the repository.")
@click.option("--partial", is_flag=True, help="Take the result of a job that failed or was killed: what merged.")
@json_option
@click.pass_context
def accept(ctx: click.Context, job: str, branch: str | None, push: str | None, partial: bool, as_json: bool) -> None:
    """Take JOB's result into its repository: your current branch fast-forwarded to it when it can be.

    When your branch moved or diverged since the job started, the result goes on a branch of its own,
    numerus/<job>.accepted (or --branch NAME), to merge yourself; nothing is merged in your checkout, and
    uncommitted work is never touched: if the files the result changes have some, nothing is done.
    """
    opts = _options(ctx, as_json)

    async def body(nc: Client) -> int:
        query = AcceptJob(job=job, branch=branch, push=push, partial=partial)
        data = await request(nc, "accept", query, max(opts.timeout, RESULT_WAIT_S))
        reply: AcceptReply = decode_reply("accept", data)
        _out(data.decode() if opts.json else render.accept_text(reply))
        if reply.push_error is not None:
            click.echo(render.visible(f"numerusctl: the push to {push} failed: {reply.push_error}"), err=True)
            return CtlExit.FAILED
        return CtlExit.OK

    _run(_with_daemon(opts, body))


@cli.command()
@click.argument("job", callback=_token)
@json_option
@click.pass_context
def discard(ctx: click.Context, job: str, as_json: bool) -> None:
    """Remove an ended JOB's branches (its integration branch and its tasks') and worktrees, in numerusd's copy of
    the repository and in yours. Its history and logs stay, and so does a branch 'accept' made or moved."""
    opts = _options(ctx, as_json)

    async def body(nc: Client) -> int:
        data = await request(nc, "discard", DiscardJob(job=job), max(opts.timeout, RESULT_WAIT_S))
        reply: DiscardReply = decode_reply("discard", data)
        _out(data.decode() if opts.json else render.discard_text(reply))
        for problem in reply.problems:
            click.echo(render.visible(f"numerusctl: job {reply.job}: {problem}"), err=True)
        return CtlExit.FAILED if reply.problems else CtlExit.OK

    _run(_with_daemon(opts, body))


# --- audit ----------------------------------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """Check the recorded history without trusting numerusd."""


def load_keys(path: Path) -> dict[str, bytes]:
    """`{"current": kid, "keys": {kid: hex}}` -> {kid: secret}; CtlError (exit 2) saying what is wrong."""
    try:
        raw = json.loads(path.read_bytes())
        keys = {str(kid): bytes.fromhex(secret) for kid, secret in raw["keys"].items()}
    except FileNotFoundError:
        raise CtlError(f"no key file at {path}; pass --key-file", CtlExit.USAGE) from None
    except OSError as e:
        raise CtlError(f"cannot read key file {path}: {e.strerror}", CtlExit.USAGE) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CtlError(
            f'key file {path} is not {{"current": KID, "keys": {{KID: HEX_SECRET}}}}', CtlExit.USAGE
        ) from None
    if not keys:
        raise CtlError(f"key file {path} holds no key", CtlExit.USAGE)
    return keys


@audit.command()
@click.argument("job", required=False, callback=_token, shell_complete=_complete_jobs)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The HMAC keys [<state-dir>/keys.json].",
)
@click.option(
    "--expect-head",
    metavar="DIGEST",
    help="The chain hash JOB's history must reach (from an earlier audit): catches a deleted tail.",
)
@click.option("--finished", is_flag=True, help="Every job is over: a chain not ending the job is truncated.")
@json_option
@click.pass_context
def verify(
    ctx: click.Context,
    job: str | None,
    key_file: Path | None,
    expect_head: str | None,
    finished: bool,
    as_json: bool,
) -> None:
    """Read NUMERUS_EVENTS (all of it, or JOB's events) and check every signature, subject and chain link.

    Prints one line per problem and exits 1 if there is any, 0 when everything holds.
    """
    from numerusctl.feed import StreamFeed
    from numerusd.protocol.audit import Auditor

    opts = _options(ctx, as_json)
    if expect_head and job is None:
        raise click.UsageError("--expect-head needs a JOB")
    keys = load_keys(key_file or state_dir_or_default(opts.state_dir) / "keys.json")

    async def body(nc: Client) -> int:
        # A reference is resolved by numerusd; the audit trusts it with nothing else (a whole id: not even that).
        job_id = None if job is None else await _job_id(nc, job, opts.timeout)
        auditor = Auditor(
            keys, expected_heads={job_id: expect_head} if job_id and expect_head else None, assume_finished=finished
        )
        async with StreamFeed(nc, subjects.EVENTS, subjects.job_events(job_id)) as feed:
            async for batch in feed.until_caught_up():
                for stored in batch:
                    auditor.feed(stored.seq, stored.subject, stored.data)
        report = auditor.report()
        if opts.json:
            _out(msgspec.json.encode(report).decode())
            return CtlExit.OK if report.ok else CtlExit.FAILED
        for problem in report.problems:
            _out(problem.line())
        open_jobs = [j for j in report.jobs if j.tail == "open"]
        if job_id is not None and not report.jobs and report.events == 0:
            _out(f"no events of job {job_id} in {subjects.EVENTS}")
            return CtlExit.FAILED
        jobs = f"{len(report.jobs)} job{'s' if len(report.jobs) != 1 else ''}"
        if open_jobs:
            jobs += f", {len(open_jobs)} open (running, or their last events are missing: see docs/audit.md)"
        if report.ok:
            head = f"; head {report.jobs[0].head}" if job_id is not None and report.jobs else ""
            _out(f"ok: {report.events} events in {jobs}: every signature and chain link holds{head}")
            return 0
        _out(f"FAILED: {len(report.problems)} problem(s) in {report.events} events ({jobs})")
        return CtlExit.FAILED

    _run(_with_daemon(opts, body))


# --- ping -----------------------------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_context
def ping(ctx: click.Context, as_json: bool) -> None:
    """Whether numerusd answers on its bus: its version, id and the round trip; exit 0, else one line and 3.

    The container image's HEALTHCHECK (`numerusctl --role viewer --timeout 3 ping`); a viewer may ask it.
    """
    from numerusctl.ping import ping as ping_daemon

    opts = _options(ctx, as_json)

    async def body(nc: Client) -> int:
        pong = await ping_daemon(nc, opts.timeout)
        _out(msgspec.json.encode(pong).decode() if opts.json else render.ping_text(pong))
        return 0

    _run(_with_daemon(opts, body))


# --- workers ----------------------------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_context
def workers(ctx: click.Context, as_json: bool) -> None:
    """The remote workers numerusd has heard from: pools, busy slots, state, last heartbeat, what each runs.

    Workers are `numerusd worker --pool NAME` processes on other machines (docs/operations.md, "Remote workers");
    a job run with `--pool NAME` has its executors run there.
    """
    from numerusd.protocol.commands import ListWorkers, WorkersReply

    opts = _options(ctx, as_json)

    async def body(nc: Client) -> int:
        data = await request(nc, "workers", ListWorkers(), opts.timeout)
        reply: WorkersReply = decode_reply("workers", data)
        _out(data.decode() if opts.json else render.workers_text(reply))
        return 0

    _run(_with_daemon(opts, body))


# --- completion -----------------------------------------------------------------------------------------------


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the script that makes SHELL complete numerusctl's commands, options, job ids, tasks and agents.

    \b
    bash: eval "$(numerusctl completion bash)"       (in ~/.bashrc)
    zsh:  eval "$(numerusctl completion zsh)"        (in ~/.zshrc)
    fish: numerusctl completion fish > ~/.config/fish/completions/numerusctl.fish
    """
    from click.shell_completion import get_completion_class

    script = get_completion_class(shell)
    assert script is not None  # the choice is click's own shells
    _out(script(cli, {}, "numerusctl", "_NUMERUSCTL_COMPLETE").source().rstrip("\n"))


def main() -> None:
    """The `numerusctl` console script."""
    try:
        cli.main(prog_name="numerusctl")
    except BrokenPipeError:
        # `numerusctl events | head`: the reader left; say nothing more, and let no flush at exit complain.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        raise SystemExit(CtlExit.FAILED) from None
