"""Job and task state: what the fold of a job's events holds, and the lock table it implies.

States are frozen msgspec Structs, replaced (never mutated) by `numerusd.domain.evolve`. The lock table is kept
in a job as plain data (`lock_holds`, `lock_queue`) and built into a `locks.LockTable` on demand, cached by the
identity of those dicts.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Literal

import msgspec

from numerusd import locks
from numerusd.protocol.claims import ClaimedPath, Lock
from numerusd.protocol.commands import TASK_DONE, Acceptance, JobStatus, TaskStatus
from numerusd.protocol.events import EventData
from numerusd.protocol.ids import is_token
from numerusd.protocol.plan import FileIntent, Plan

__all__ = [
    "ACTIVE",
    "TASK_DONE",
    "ClaimSource",
    "Decision",
    "JobState",
    "TaskState",
    "budget_scope",
    "budget_stop_reason",
    "lock_table",
    "rejected_reason",
    "scope_name",
    "with_table",
]

#: Where a job's claims come from: each executor is asked (`agent`), the plan's file intents (`plan`), or none
#: are made (`none`: a job of one task, which nothing can trample).
ClaimSource = Literal["agent", "plan", "none"]

#: What `decide` returns: payloads with the task they belong to (None for job events).
Decision = list[tuple[str | None, EventData]]

#: Task statuses in which the daemon is doing something for the task (an agent, git, a check) or it holds or
#: waits for locks.
ACTIVE: frozenset[TaskStatus] = frozenset({"running", "waiting", "granted", "checking", "retrying", "merging"})


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    """One task as its events made it."""

    id: str
    title: str
    instructions: str
    agent: str
    role: str
    deps: tuple[str, ...]
    intents: tuple[FileIntent, ...] = ()
    status: TaskStatus = "pending"
    #: The attempt under way or last made (1 for the first); `failed_attempts` counts those that failed since the
    #: task was created or last retried, whether or not their agent had started (a worktree that could not be made
    #: fails an attempt too). An attempt cut by a daemon stop is not counted as failed.
    attempt: int = 0
    failed_attempts: int = 0
    #: A user asked to stop this task alone (`kill JOB TASK`; who in `kill_by`): it is killed once its agent ends.
    kill_requested: bool = False
    kill_by: str = ""
    #: Who skipped the task (`skip JOB TASK`): its dependents then run as if it had completed.
    skipped_by: str | None = None
    #: The checks that passed, and whether the reviewer passed the work, for the commit under the gate (a gate
    #: resumed after a restart does not run them again).
    passed_checks: tuple[str, ...] = ()
    review_passed: bool = False
    #: The tokens of the agent's thread in the attempt under way: where a resumed thread's totals start; how
    #: many times that attempt's thread was resumed.
    thread_tokens: tuple[int, int, int] = (0, 0, 0)
    resumed: int = 0
    #: The next attempt needs a new worktree from the integration tip (after a merge conflict or a git error).
    fresh_worktree: bool = False
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
    #: The claim the executor made (paths and commands), the locks they stand for as observed in its worktree
    #: (symlinks resolved), and, while it waits, who holds what it wants.
    claim: tuple[ClaimedPath, ...] | None = None
    commands: tuple[str, ...] = ()
    claimed_locks: tuple[Lock, ...] = ()
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
    #: Its attempts now run on its first profile's `escalate` profile (TaskEscalated): a failure waits for approval.
    escalated: bool = False
    #: Where the attempt under way runs when a remote worker runs it: the lease it was offered under (None: the
    #: daemon runs it, or it was not offered yet), the worker that took it and its host (None: not taken yet).
    lease: str | None = None
    worker: str | None = None
    host: str = ""

    @property
    def next_attempt(self) -> int:
        """The number of the attempt to make next: one more than the last made or failed (an attempt can fail
        before its agent starts)."""
        return max(self.attempt, self.failed_attempts) + 1

    @property
    def resumable_thread(self) -> str | None:
        """The agent thread an interrupted attempt can go on in, if its agent said one. The agent chose that id,
        and it goes on the command line (`codex exec resume <id>`): one that could be read as an option or is not
        one plain token is never resumed (the attempt is made again instead)."""
        if self.status != "interrupted" or self.thread_id is None or not is_token(self.thread_id):
            return None
        return self.thread_id


class JobState(msgspec.Struct, frozen=True, kw_only=True):
    """One job as its events made it; `tasks` keeps creation order."""

    id: str
    goal: str
    repo: str
    agent: str
    status: JobStatus = "running"
    reason: str | None = None
    #: While `interrupted`: the status it resumes in, and what will happen (it resumes at start, or when asked).
    resume_status: JobStatus | None = None
    next: str | None = None
    #: Roles whose agents run without Numerus's sandbox (their profile says `sandbox = "none"`).
    unsandboxed: tuple[str, ...] = ()
    kill_requested: bool = False
    created: datetime
    updated: datetime
    events: int = 1
    last_event_id: str = ""
    tasks: dict[str, TaskState] = {}
    #: The pipeline's settings, as submitted (see JobSubmitted). A job not `planned` (`--no-plan`) is a plan of one
    #: task that its agent works on in place, in the repository itself (see `in_place`).
    planned: bool = False
    roles: dict[str, str] = {}
    parallel: int = 1
    checks: tuple[str, ...] = ()
    review: bool = True
    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_replans: int = 0
    replans: int = 0
    claims: ClaimSource = "agent"
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
    #: The branch HEAD was on at submission (None: detached, or not recorded then).
    start_branch: str | None = None
    #: Where `numerusctl accept` last took the result; `discarded`: `numerusctl discard` removed its branches.
    accepted: Acceptance | None = None
    discarded: bool = False
    #: The lock table as plain data (holders and the FIFO queue of waiting claims); `lock_table()` builds it.
    lock_holds: dict[str, tuple[Lock, ...]] = {}
    lock_queue: dict[str, tuple[Lock, ...]] = {}
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    #: Secrets replaced before being stored, in all the job's agent output and recorded text (SecretRedacted).
    secrets_redacted: int = 0
    #: The daemon-wide queue (numerusd.domain.queueing): the job's priority; `queued` while its first agent waits
    #: for an agent slot of the daemon; when a user moved it to the front (counts while queued); who paused it.
    #: `status` shows `queued` or `paused` over `status`, which keeps the step the job is at, so that events of
    #: agents finishing their step while it is paused move it on as they would (`queueing.shown_status`).
    priority: int = 0
    queued: bool = False
    promoted: datetime | None = None
    paused_by: str | None = None
    #: Where it waits for approval (JobSubmitted `approve`), what it waits for now (`plan`, `merge`, `budget`) and
    #: why, and the status it goes back to when approved.
    approve: tuple[str, ...] = ()
    approval: str | None = None
    approval_reason: str | None = None
    approved_from: JobStatus = "running"
    #: Token caps (None: none) and what crossing one does; tokens approvals added, by scope (`job` or a task id);
    #: the scopes over their cap until an approval raises it.
    max_tokens: int | None = None
    task_max_tokens: int | None = None
    on_budget: str = "pause"
    tokens_added: dict[str, int] = {}
    over_budget: tuple[str, ...] = ()
    #: Why a job being stopped without a user's kill (a budget) fails, instead of ending `killed`.
    stop_reason: str | None = None
    #: Profile -> the profile that makes one more attempt when all of its attempts failed.
    escalate: dict[str, str] = {}
    #: The pool of remote workers that runs its executors ("": the daemon itself).
    pool: str = ""
    #: The W3C trace context of the command that submitted the job (its envelope's `traceparent`): the events
    #: its pipeline writes later carry it too ("" when none came).
    traceparent: str = ""

    def tokens(self) -> int:
        """Input + output tokens of the job's own calls and of all its tasks, as `status` counts them."""
        own = self.input_tokens + self.output_tokens
        return own + sum(task.input_tokens + task.output_tokens for task in self.tasks.values())

    def token_cap(self, scope: str) -> int | None:
        """The cap of `scope` (`job`, or `task:<id>`) with what approvals added; None: no cap."""
        cap = self.max_tokens if scope == "job" else self.task_max_tokens
        return None if cap is None else cap + self.tokens_added.get(scope, 0)

    def tokens_of(self, scope: str) -> int:
        """The tokens `scope` (`job`, or `task:<id>`) has used."""
        if scope == "job":
            return self.tokens()
        task = self.tasks[scope.removeprefix("task:")]
        return task.input_tokens + task.output_tokens

    @property
    def in_place(self) -> bool:
        """Whether the job's one task works in the repository itself: no worktree, no gate, no merge (`--no-plan`)."""
        return not self.planned


def budget_scope(scope: str, task: str) -> str:
    """The key of a BudgetExceeded's scope in `tokens_added` and `over_budget`: `job`, or `task:<id>` (a task may
    be called `job`)."""
    return f"task:{task}" if scope == "task" else "job"


def scope_name(scope: str) -> str:
    """`the job`, or `task t1`, for messages."""
    return "the job" if scope == "job" else f"task {scope.removeprefix('task:')}"


def budget_stop_reason(scope: str, used: int, cap: int) -> str:
    """Why a job stopped by a budget (`on_budget = "stop"`) failed."""
    return f"token budget exceeded: {scope_name(scope)} used {used} tokens of its {cap}"


def rejected_reason(what: str, by: str, reason: str) -> str:
    """Why a job (or task) a user rejected failed: `the plan was rejected by alice (operator): too broad`."""
    return f"{what} was rejected by {by}" + (f": {reason}" if reason else "")


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


def with_table(job: JobState, table: locks.LockTable) -> JobState:
    queue = {task: claim for task in table.waiting if (claim := table.queued_claim(task)) is not None}
    holds = dict(table.holders)
    _remember(holds, queue, table)
    return msgspec.structs.replace(job, lock_holds=holds, lock_queue=queue)
