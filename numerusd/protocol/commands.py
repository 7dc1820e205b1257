"""Commands and queries `numerusctl` sends on `numerus.cmd.<verb>`, and the replies the daemon sends back.

Each verb has one request type and one reply type; the same noun names the CLI command, the endpoint, the
handler and its test. An error reply carries the micro-service error headers and an `ErrorReply` body.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

#: The roles of a planned job; each is played by an agent profile (numerus.toml `[roles]`, `run --role`).
ROLES = ("planner", "queen", "claimer", "executor", "reviewer")


class Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every request; unknown fields are refused so a typo is an error, not silently ignored."""


#: The longest path a request may name (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096
#: The largest token cap, or tokens an approval adds, a request may give: far above any job's, and small enough
#: that caps added up stay within the 64-bit integers every JSON reader of the events takes.
MAX_TOKENS = 10**12

#: The longest goal `run` takes, in UTF-8 bytes: it goes into every agent's prompt and into `JobSubmitted`, which
#: must stay under the event cap whole (a goal is never cut). Longer instructions belong in a file in the repo.
MAX_GOAL_BYTES = 128 * 1024


class RunJob(Request, frozen=True, kw_only=True):
    """`numerusctl run`: submit a goal for a repository (at most MAX_GOAL_BYTES)."""

    goal: str
    repo: str
    #: The agent profile of every role (default: the configured roles, else default_agent).
    agent: str | None = None
    #: False: one executor task for the whole goal, no plan, claims or review (`--no-plan`).
    plan: bool = True
    #: Per-role profiles, e.g. {"planner": "strong"}; over `agent` and the configuration.
    roles: dict[str, str] = {}
    parallel: int | None = None
    #: Check commands added to the configured ones.
    checks: tuple[str, ...] = ()
    review: bool | None = None
    #: Where claims come from: `agent` (each executor is asked) or `plan` (the plan's file intents).
    claims: Literal["agent", "plan"] | None = None
    #: Its place in the daemon's queue of agent slots: higher first, from -MAX_PRIORITY to MAX_PRIORITY.
    priority: int = 0
    #: Where the job waits for approval (`plan`, `merge`); None: numerusd's `approve` setting.
    approve: tuple[Literal["plan", "merge"], ...] | None = None
    #: Token caps of the job and of each of its tasks; None: numerusd's `max_tokens`, `task_max_tokens`.
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    task_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    #: A plan written by the user (`run --plan FILE`: the JSON a planner answers, docs/plans.md): validated as a
    #: planner's is, and no planner is asked.
    plan_json: str | None = None
    #: The pool of remote workers that runs its executors (`run --pool`); None: numerusd's `default_pool` ("": the
    #: daemon runs them itself).
    pool: str | None = None


class ListWorkers(Request, frozen=True, kw_only=True):
    """`numerusctl workers`: the remote workers the daemon has heard from, and what each runs."""


class WorkerView(msgspec.Struct, frozen=True, kw_only=True):
    """One remote worker as its last heartbeat said, with the attempts it runs for this daemon."""

    name: str
    host: str
    pools: list[str]
    capacity: int
    #: The attempts it runs, as `JOB/TASK#ATTEMPT`.
    running: list[str] = []
    #: Seconds since its last heartbeat, and when that was.
    heard_s: float = 0.0
    heard_at: datetime | None = None
    #: It is shutting down (takes no new work), or it was not heard of for longer than `worker_lease_s` (lost).
    draining: bool = False
    lost: bool = False
    version: str = ""


class WorkersReply(msgspec.Struct, frozen=True, kw_only=True):
    """The workers heard from since the daemon started, by name; `pools`: every pool a worker serves or a job
    waits on, with how many attempts wait there for a worker."""

    workers: list[WorkerView]
    waiting: dict[str, int] = {}


#: The highest priority `run --priority` takes (and the lowest, negated).
MAX_PRIORITY = 1000


class ApproveJob(Request, frozen=True, kw_only=True):
    """`numerusctl approve JOB [TASK]`: the job goes on from where it waits for approval (its plan, its merge, a
    token cap: `add_tokens` raises the cap); with `task`, that task makes one more attempt."""

    job: str
    task: str | None = None
    add_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None


class RejectJob(Request, frozen=True, kw_only=True):
    """`numerusctl reject JOB [TASK] --reason TEXT`: the job that waits for approval fails (with `task`, that task
    fails and its dependents are skipped)."""

    job: str
    task: str | None = None
    reason: str = ""


class GetPlan(Request, frozen=True, kw_only=True):
    """`numerusctl plan`: a job's current plan, drawn as text, Graphviz dot or Mermaid."""

    job: str
    format: Literal["text", "dot", "mermaid"] = "text"


class GetStatus(Request, frozen=True, kw_only=True):
    """`numerusctl status`: one job with its tasks, or when `job` is None the newest `limit` jobs (every one when
    `limit` is None) without their tasks: a list stays small however long the daemon's history. A list comes in
    pages that fit a NATS message: ask again with `before` set to the reply's `next` for the jobs after it."""

    job: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: Only the jobs of this repository (its absolute path, as `run` recorded it), on every page. Left out unless
    #: asked for, as `before` is.
    repo: Annotated[str, msgspec.Meta(max_length=MAX_PATH_CHARS)] | msgspec.UnsetType = msgspec.UNSET
    #: Left out of the first request, so a daemon that does not page (and refuses unknown fields) still answers.
    before: str | msgspec.UnsetType = msgspec.UNSET


class KillJob(Request, frozen=True, kw_only=True):
    """`numerusctl kill JOB [TASK]`: stop a job's agents (TERM, then KILL) and record it; with `task`, that task's
    alone (its dependents are skipped; `retry` brings them back)."""

    job: str
    task: str | None = None


class ResumeJob(Request, frozen=True, kw_only=True):
    """`numerusctl resume JOB`: an interrupted job goes on where it was."""

    job: str


class RetryJob(Request, frozen=True, kw_only=True):
    """`numerusctl retry JOB [TASK...]`: the tasks named (none: every failed, killed or interrupted task) run
    again with new attempts; an ended job reopens."""

    job: str
    tasks: list[str] = []


class SkipTask(Request, frozen=True, kw_only=True):
    """`numerusctl skip JOB TASK`: the task will not run; the tasks that depend on it go on without it."""

    job: str
    task: str


class PauseJob(Request, frozen=True, kw_only=True):
    """`numerusctl pause`: the job takes no new agent slot; its running agents finish their step."""

    job: str


class StartJob(Request, frozen=True, kw_only=True):
    """`numerusctl start`: a paused job goes on; a queued job moves to the front of the queue."""

    job: str


class CleanJobs(Request, frozen=True, kw_only=True):
    """`numerusctl clean`: remove what ended jobs left on disk (their tasks' worktrees and branches, with `logs`
    their logs too): the jobs named, or with `ended` every ended job not cleaned yet."""

    jobs: list[str] = []
    ended: bool = False
    logs: bool = False


class GetDiff(Request, frozen=True, kw_only=True):
    """`numerusctl diff`: a job's result as a unified diff (its integration branch against the commit it started
    from), or one task's work (its merge's changes once merged, else its branch against its base); with `stat`,
    git's `--stat` summary `width` columns wide."""

    job: str
    task: str | None = None
    stat: bool = False
    width: Annotated[int, msgspec.Meta(ge=40, le=400)] = 80


class AcceptJob(Request, frozen=True, kw_only=True):
    """`numerusctl accept`: take an ended job's result into the user's repository: their current branch (or the
    one the job started from) fast-forwarded to it when it can be, else the branch `branch` (default
    `numerus/<job>.accepted`) created or moved forward to it; then, with `push`, that branch pushed to the
    repository's remote of that name. `partial`: a job that failed or was killed, with the tasks that merged."""

    job: str
    branch: str | None = None
    push: str | None = None
    partial: bool = False


class DiscardJob(Request, frozen=True, kw_only=True):
    """`numerusctl discard`: remove an ended job's branches (integration and tasks', in Numerus's mirror and in
    the user's repository) and worktrees; its history stays."""

    job: str


class GetLogs(Request, frozen=True, kw_only=True):
    """`numerusctl logs`: the terminal output of a job's tasks, the last `tail_bytes` of each."""

    job: str
    task: str | None = None
    tail_bytes: int = 256 * 1024
    #: The whole output of the task's failed checks (`<runs>/<job>/<task>/check-<attempt>-<n>.log`) instead of
    #: its terminal output; needs `task`.
    check: bool = False


class GetEvents(Request, frozen=True, kw_only=True):
    """`numerusctl events`: a page of events (all jobs when `job` is None) after stream sequence `after_seq`."""

    job: str | None = None
    after_seq: int = 0
    limit: int = 500


# --- replies ------------------------------------------------------------------------------------------------


class TaskView(msgspec.Struct, frozen=True, kw_only=True):
    """What `status` shows of one task."""

    id: str
    title: str
    agent: str
    status: TaskStatus
    role: str = "executor"
    deps: list[str] = []
    #: While the task waits (NO GO): the tasks holding what it claimed.
    holders: list[str] = []
    #: The paths it holds locks on (GO), until it releases them.
    locks: list[str] = []
    branch: str | None = None
    #: Why the last attempt failed, told to the next one.
    feedback: list[str] = []
    attempt: int = 0
    pid: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    thread_id: str | None = None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    log_path: str | None = None
    started: datetime | None = None
    ended: datetime | None = None
    #: What its tokens cost by numerusd's price table (None: no price for its model).
    cost: float | None = None
    #: Where its attempt runs when a remote worker runs it: the worker (None: not taken yet, or the daemon runs it)
    #: and its host; `pool` while it is offered to one.
    worker: str | None = None
    host: str = ""
    pool: str = ""


class Acceptance(msgspec.Struct, frozen=True, kw_only=True):
    """Where an accepted job's result was taken (see the event `JobAccepted`)."""

    branch: str
    sha: str
    how: str
    previous: str | None = None
    checkout: str | None = None
    reason: str = ""
    pushed: str = ""
    by: str = ""


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """What `status` shows of one job."""

    id: str
    goal: str
    repo: str
    agent: str
    status: JobStatus
    reason: str | None = None
    #: While interrupted: what happens next (it resumes when numerusd starts, or waits for `resume`).
    next: str | None = None
    created: datetime
    updated: datetime
    events: int
    #: Its tasks, in creation order: all of them for one job, none in a list of jobs.
    tasks: list[TaskView] = []
    #: How many tasks it has and how many completed; the tokens of its own agent calls and of all its tasks'.
    tasks_total: int = 0
    tasks_done: int = 0
    tokens: int = 0
    planned: bool = False
    plan_version: int = 0
    plan_hash: str | None = None
    #: The branch every passed task is merged into, and the commit it started from.
    integration: str | None = None
    base_sha: str | None = None
    parallel: int = 1
    #: Tokens of the job's own agent calls (planner, queen); each task counts its own.
    input_tokens: int = 0
    output_tokens: int = 0
    #: `numerusctl clean` removed its worktrees and task branches (with `logs_removed`, its logs too).
    cleaned: bool = False
    logs_removed: bool = False
    #: The tasks of an ended job whose worktrees and branches it keeps (those that did not merge).
    leftovers: list[str] = []
    #: Secrets replaced by `[REDACTED:<kind>]` before being stored (SecretRedacted events).
    secrets_redacted: int = 0
    #: Roles whose agents run without Numerus's sandbox.
    unsandboxed: list[str] = []
    #: Its place in the daemon's queue (`run --priority`); while `queued`, its position (1 is next) among
    #: `queue_length` queued jobs; who paused it, while it is `paused`.
    priority: int = 0
    queue_position: int | None = None
    queue_length: int = 0
    paused_by: str | None = None
    #: Where `numerusctl accept` last took its result; `discarded`: `numerusctl discard` removed its branches.
    accepted: Acceptance | None = None
    discarded: bool = False
    #: While `awaiting_approval`: what it waits for (`plan`, `merge`, `budget`), and why; the tasks awaiting one.
    approval: str | None = None
    approval_reason: str | None = None
    awaiting_tasks: list[str] = []
    #: Its token caps (None: none), and what its tokens cost by numerusd's price table (None: no price known).
    max_tokens: int | None = None
    task_max_tokens: int | None = None
    cost: float | None = None


class PlanReply(msgspec.Struct, frozen=True, kw_only=True):
    """A job's plan: its version and hash, the status of each task, and the drawing asked for."""

    job: str
    version: int
    hash: str
    summary: str
    statuses: dict[str, str]
    rendered: str
    #: The job's status, and while it is `awaiting_approval` what it waits for (`plan`, `merge`, `budget`).
    status: str = ""
    approval: str | None = None


class RunReply(msgspec.Struct, frozen=True, kw_only=True):
    """The job was accepted; its events are on `numerus.job.<job>.>`. `notes` are for the user to read: what the
    job will not do that they might expect (work from uncommitted changes)."""

    job: str
    subject: str
    notes: list[str] = []


class StatusReply(msgspec.Struct, frozen=True, kw_only=True):
    """The jobs asked for, newest first; `total`: how many jobs the daemon knows (a list may show fewer)."""

    jobs: list[JobView]
    total: int = 0
    #: How many ended jobs keep worktrees of tasks that did not merge (all jobs, not only those listed).
    cleanable: int = 0
    #: More jobs were asked for than fit in this page: ask again with `before` set to this (the last job listed).
    next: str | None = None
    #: The agent profiles numerusd knows (what `run --agent` takes), for shell completion.
    agents: list[str] = []
    #: How many jobs wait `queued` for an agent slot of the daemon (all jobs, not only those listed).
    queued: int = 0


class KillReply(msgspec.Struct, frozen=True, kw_only=True):
    """The kill was recorded; `tasks` lists the tasks whose agents are being stopped."""

    job: str
    tasks: list[str]


class ResumeReply(msgspec.Struct, frozen=True, kw_only=True):
    """The job goes on; `status` is where it resumed."""

    job: str
    status: JobStatus


class RetryReply(msgspec.Struct, frozen=True, kw_only=True):
    """The tasks that run again (those asked for, and the dependents skipped because of them); `status` is the
    job's now."""

    job: str
    tasks: list[str]
    status: JobStatus


class SkipReply(msgspec.Struct, frozen=True, kw_only=True):
    """The task was skipped; `tasks` are its dependents that run again because of it; `status` is the job's now."""

    job: str
    task: str
    tasks: list[str] = []
    status: JobStatus


class PauseReply(msgspec.Struct, frozen=True, kw_only=True):
    """The pause was recorded, with who asked."""

    job: str
    by: str


class StartReply(msgspec.Struct, frozen=True, kw_only=True):
    """The start was recorded, with who asked: the paused job goes on, or (`promoted`) the queued job moved to the
    front of the queue."""

    job: str
    by: str
    promoted: bool = False


class CleanedJob(msgspec.Struct, frozen=True, kw_only=True):
    """What cleaning one job removed; `kept` names its integration branch (its result), `problems` what could not
    be removed and why."""

    job: str
    worktrees: list[str] = []
    branches: list[str] = []
    logs: bool = False
    freed_bytes: int = 0
    kept: str | None = None
    problems: list[str] = []


class CleanReply(msgspec.Struct, frozen=True, kw_only=True):
    """The jobs cleaned, in the order asked (oldest first with `ended`)."""

    jobs: list[CleanedJob]


class DiffReply(msgspec.Struct, frozen=True, kw_only=True):
    """A diff from `base` to `head` (full shas), or its first `shown` bytes of `size` (cut at a line's end) when
    it does not fit a reply: `see_all` is the command that shows it whole in the user's repository."""

    job: str
    task: str | None = None
    base: str
    head: str
    text: str
    size: int
    shown: int
    see_all: str


class AcceptReply(msgspec.Struct, frozen=True, kw_only=True):
    """Where the result went: `branch` of `repo` is at `sha`. `how`: `fast-forward` (the user's branch moved
    forward to it; `checkout` names the worktree whose files were updated) or `branch` (the user's branch could
    not be, `reason` says why, so the result is on `branch`). `previous`: where `branch` was (None: created).
    `pushed`: the remote it was pushed to; `push_error`: why the push failed (the branch stays as taken)."""

    job: str
    repo: str
    branch: str
    sha: str
    how: str
    previous: str | None = None
    checkout: str | None = None
    reason: str = ""
    pushed: str | None = None
    push_error: str | None = None


class DiscardReply(msgspec.Struct, frozen=True, kw_only=True):
    """What discarding the job removed, and what it could not (`problems`, one line each)."""

    job: str
    worktrees: list[str] = []
    branches: list[str] = []
    freed_bytes: int = 0
    problems: list[str] = []


class TaskLog(msgspec.Struct, frozen=True, kw_only=True):
    """The tail of one task's terminal output; `truncated` says bytes before it were left out."""

    task: str
    path: str
    text: str
    truncated: bool = False
    #: For `logs --check`: the check command whose output this is, the attempt it checked and its exit code
    #: (None: it ran out of time).
    check: str | None = None
    attempt: int = 0
    exit_code: int | None = None


class LogsReply(msgspec.Struct, frozen=True, kw_only=True):
    """Terminal output of the job's tasks."""

    job: str
    logs: list[TaskLog]


class EventsReply(msgspec.Struct, frozen=True, kw_only=True):
    """A page of events as stored (`raw` is each event's exact JSON); `last_seq` is where the next page starts."""

    events: list[msgspec.Raw]
    last_seq: int
    more: bool
    #: The stream sequence of each event in `events`, in the same order.
    seqs: list[int] = []


class ApproveReply(msgspec.Struct, frozen=True, kw_only=True):
    """The approval was recorded: of the job's `gate` (`plan`, `merge`, `budget`), or of `task`'s next attempt."""

    job: str
    gate: str
    task: str | None = None
    added_tokens: int = 0


class RejectReply(msgspec.Struct, frozen=True, kw_only=True):
    """The rejection was recorded: of the job's `gate`, or of `task`."""

    job: str
    gate: str
    task: str | None = None


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """A refused or failed request: a stable `code` and one sentence saying what is wrong and what to do."""

    code: str
    message: str


#: Request type by verb: the endpoint is `numerus.cmd.<verb>`.
REQUESTS: dict[str, type[Request]] = {
    "run": RunJob,
    "status": GetStatus,
    "kill": KillJob,
    "logs": GetLogs,
    "events": GetEvents,
    "plan": GetPlan,
    "clean": CleanJobs,
    "resume": ResumeJob,
    "retry": RetryJob,
    "skip": SkipTask,
    "pause": PauseJob,
    "start": StartJob,
    "diff": GetDiff,
    "accept": AcceptJob,
    "discard": DiscardJob,
    "approve": ApproveJob,
    "reject": RejectJob,
    "workers": ListWorkers,
}

#: Reply type by verb.
REPLIES: dict[str, type[msgspec.Struct]] = {
    "run": RunReply,
    "status": StatusReply,
    "kill": KillReply,
    "logs": LogsReply,
    "events": EventsReply,
    "plan": PlanReply,
    "clean": CleanReply,
    "resume": ResumeReply,
    "retry": RetryReply,
    "skip": SkipReply,
    "pause": PauseReply,
    "start": StartReply,
    "diff": DiffReply,
    "accept": AcceptReply,
    "discard": DiscardReply,
    "approve": ApproveReply,
    "reject": RejectReply,
    "workers": WorkersReply,
}

#: Where the daemon keeps its state (and `connection.json`) when neither a flag nor NUMERUS_STATE_DIR says.
DEFAULT_STATE_DIR = "~/.local/state/numerus"

#: Where a job is: waiting for an agent slot of the daemon (queued), its planner is asked, it waits for an
#: approval, its tasks run, the queen revises its plan, held by the operator (paused), then how it ended.
#: `interrupted` (the daemon stopped under it) is not an end: the job resumes, at start or when asked.
JobStatus = Literal[
    "queued",
    "planning",
    "awaiting_approval",
    "running",
    "replanning",
    "paused",
    "completed",
    "failed",
    "killed",
    "interrupted",
]
#: Where a task is: pending, waiting (NO GO), granted (GO), running (its agent), checking (the gate), retrying,
#: merging, then how it ended.
TaskStatus = Literal[
    "pending",
    "waiting",
    "granted",
    "running",
    "checking",
    "retrying",
    "merging",
    "awaiting_approval",
    "completed",
    "failed",
    "killed",
    "interrupted",
    "skipped",
]

#: Terminal job statuses.
JOB_DONE: frozenset[JobStatus] = frozenset({"completed", "failed", "killed"})
#: Terminal task statuses (an interrupted task goes on when its job resumes; `retry` reopens ended ones).
TASK_DONE: frozenset[TaskStatus] = frozenset({"completed", "failed", "killed", "skipped"})


def command_subject(verb: str) -> str:
    """`numerus.cmd.<verb>`."""
    return f"numerus.cmd.{verb}"
