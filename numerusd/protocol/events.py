"""Every event type: frozen msgspec Structs with past-tense names, grouped by aggregate.

An event is an `Envelope` (see `envelope.py`) whose `type` names one of the payload classes below and whose
`data` is that payload. Payloads evolve by msgspec's rules: a new field gets a default, a type never changes,
and a renamed event is a new event. `tests/data/events_v1.jsonl` holds events written by earlier versions.

Subjects (built by `subjects.job_event`): job events go to `numerus.job.<job>.<snake_name>`, task events (those
with `TASK_EVENT = True`) to `numerus.job.<job>.task.<task>.<snake_name>`.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from numerusd.protocol.claims import ClaimedPath, Conflict, Lock
from numerusd.protocol.plan import FileIntent, Plan


class Truncated(msgspec.Struct, frozen=True, kw_only=True):
    """A text field of an event cut to fit the event cap: where it was (`text`, `reasons[3]`), its size in UTF-8
    bytes and SHA-256 before the cut. The whole text stays where it came from (the agent's run log)."""

    field: str
    size: int
    sha256: str


class EventData(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of every event payload. `TASK_EVENT` says whether the event belongs to one task of the job.

    `truncated` lists the text fields cut to keep the event under the cap (see numerusd/event_caps.py); it is
    left out of an event that was not cut, so such events' bytes are what they always were.
    """

    TASK_EVENT: ClassVar[bool] = False

    truncated: tuple[Truncated, ...] | msgspec.UnsetType = msgspec.UNSET


# --- the job aggregate -------------------------------------------------------------------------------------

#: The uncommitted paths a JobSubmitted names; the others are only counted.
UNCOMMITTED_NAMED = 20


class JobSubmitted(EventData, frozen=True, kw_only=True):
    """A user asked for a goal to be worked on in a repository."""

    goal: str
    repo: str
    #: The executor's agent profile; with `plan`, `roles` names the profile of every role.
    agent: str
    #: False: the single-task path (one executor, no plan, claims or review); True: the whole pipeline.
    plan: bool = False
    roles: dict[str, str] = {}
    #: Most agents of the job running at once.
    parallel: int = 1
    #: Shell commands the quality gate runs in a task's worktree; each must exit 0.
    checks: tuple[str, ...] = ()
    #: Whether the reviewer is asked for a verdict on each task.
    review: bool = True
    #: Attempts per task (the first run and its retries) and the pauses between them, in seconds.
    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    #: Times the queen may revise the plan when a task fails for good.
    max_replans: int = 0
    #: Where claims come from: `agent` (each executor is asked) or `plan` (the plan's file intents).
    claims: str = "agent"
    #: The commit the job works from: the repository's HEAD when it was submitted (None before this was recorded:
    #: then HEAD when the integration branch was created).
    base_sha: str | None = None
    #: How many paths of the working tree held changes not in `base_sha` (staged, unstaged, untracked), which the
    #: agents do not see (None: not known, the repository too slow to tell); `uncommitted` names the first
    #: UNCOMMITTED_NAMED of them.
    uncommitted_count: int | None = 0
    uncommitted: tuple[str, ...] = ()
    #: The roles whose agent profile runs without Numerus's sandbox (`sandbox = "none"`): `status` warns of them.
    unsandboxed: tuple[str, ...] = ()
    #: Its place in the daemon's queue of agent slots (`run --priority`, -1000 to 1000): higher goes first.
    priority: int = 0
    #: The branch the repository's HEAD was on (None: detached, or not recorded): `accept` moves it when HEAD is
    #: detached at acceptance.
    branch: str | None = None
    #: Who submitted it (`alice (operator)`; "" before this was recorded).
    by: str = ""
    #: Where the job waits for a user's approval: `plan` (after its plan is validated, before any task starts),
    #: `merge` (when every task has merged, before it is final). See ApprovalRequested.
    approve: tuple[str, ...] = ()
    #: Token caps (input + output, as `status` counts them) of the whole job and of each task; None: no cap.
    #: Crossing one records BudgetExceeded, then `on_budget`: `pause` (wait for approval) or `stop` (fail the job).
    max_tokens: int | None = None
    task_max_tokens: int | None = None
    on_budget: str = "pause"
    #: The agent profile that makes one more attempt of a task whose profile's attempts all failed (profile ->
    #: its `escalate` profile, as configured when the job was submitted).
    escalate: dict[str, str] = {}
    #: The pool of remote workers that runs its executors (numerusd/protocol/work.py); "": the daemon itself.
    pool: str = ""


class ReplanRequested(EventData, frozen=True, kw_only=True):
    """A task failed for good; the queen is asked for a revised plan of the remaining work."""

    task: str
    reason: str


class ReplanFailed(EventData, frozen=True, kw_only=True):
    """The queen gave no usable revised plan; the job goes on (or ends) with the plan it has."""

    reason: str


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens one agent call used."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


class PlanRequested(EventData, frozen=True, kw_only=True):
    """The planner (or, for a replan, the queen) is being asked for a plan; recorded before it is spawned."""

    attempt: int
    agent: str
    role: str = "planner"
    log_path: str = ""


class PlanRejected(EventData, frozen=True, kw_only=True):
    """The answer was no valid plan; `errors` is every reason, and they are given to the next attempt."""

    attempt: int
    errors: tuple[str, ...]
    answer: str = ""
    usage: Usage = Usage()


class PlanValidated(EventData, frozen=True, kw_only=True):
    """A valid plan, canonical, with its stable hash; its tasks follow as TaskCreated events."""

    version: int
    attempt: int
    hash: str
    plan: Plan
    usage: Usage = Usage()


class IntegrationBranchCreated(EventData, frozen=True, kw_only=True):
    """The job's integration branch exists at `base_sha`; every passed task is merged into it."""

    branch: str
    base_sha: str


class KillRequested(EventData, frozen=True, kw_only=True):
    """A user asked to stop the job; its running agents are being stopped."""

    reason: str = "killed by user"
    #: Who asked (`alice (operator)`); empty in events recorded before it was.
    by: str = ""


class JobCompleted(EventData, frozen=True, kw_only=True):
    """Every task of the job completed."""


class JobFailed(EventData, frozen=True, kw_only=True):
    """The job cannot complete; `reason` says why."""

    reason: str


class JobKilled(EventData, frozen=True, kw_only=True):
    """The job was stopped at a user's request and all its agents have ended."""

    reason: str = "killed by user"


class JobInterrupted(EventData, frozen=True, kw_only=True):
    """The daemon stopped while the job was under way; the tasks whose agents it stopped are marked interrupted.

    A `resumable` interruption is not the job's end: `next` says what happens next (it resumes when numerusd
    starts, or on `numerusctl resume`), and `JobResumed` takes it back where it was. One recorded before jobs
    could resume (`resumable` false) ended the job: it is folded as failed.
    """

    reason: str
    resumable: bool = False
    next: str = ""


class JobResumed(EventData, frozen=True, kw_only=True):
    """An interrupted job goes on where it was: its unfinished tasks go on from their last recorded step."""

    by: str = ""


class JobReopened(EventData, frozen=True, kw_only=True):
    """An ended job runs again because tasks of it were retried or skipped at a user's request."""

    by: str = ""


class ApprovalRequested(EventData, frozen=True, kw_only=True):
    """The job waits (`awaiting_approval`) for `numerusctl approve` or `reject`: at its validated plan (`gate`
    `plan`), with every task merged before it is final (`merge`), or over a token cap (`budget`)."""

    gate: str
    reason: str = ""


class JobApproved(EventData, frozen=True, kw_only=True):
    """A user approved what the job waited for (`gate`); for a budget, the caps of `scopes` (`job`, or a task id)
    were raised by `added_tokens`."""

    gate: str
    by: str
    added_tokens: int = 0
    scopes: tuple[str, ...] = ()


class JobRejected(EventData, frozen=True, kw_only=True):
    """A user rejected what the job waited for (`gate`): the job fails with `reason` (a merge's branch is kept)."""

    gate: str
    by: str
    reason: str = ""


class BudgetExceeded(EventData, frozen=True, kw_only=True):
    """The tokens of the job (`scope` `job`) or of one task (`scope` `task`, `task` its id) reached their cap:
    `used` of `cap`. `action` is what follows: `pause` (ApprovalRequested, unless the job waits already) or
    `stop` (its agents stopped as a kill does, the job failed)."""

    scope: str
    task: str = ""
    used: int
    cap: int
    action: str


class JobCleaned(EventData, frozen=True, kw_only=True):
    """What an ended job left on disk was removed at a user's request (`numerusctl clean`): its tasks' worktrees
    and branches, and with `logs` its run directory (terminal logs, agents' answers). The integration branch,
    the job's result, is kept. Each list names what was there and is gone; `freed_bytes` is their size."""

    worktrees: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    logs: bool = False
    freed_bytes: int = 0


class JobAccepted(EventData, frozen=True, kw_only=True):
    """The job's result was taken into the user's repository at a user's request (`numerusctl accept`): `branch`
    is at `sha`, the integration branch's tip. `how`: `fast-forward` (the user's branch moved forward to it, and
    the files of `checkout`, the worktree that has it checked out, with it) or `branch` (the user's branch could
    not move, for `reason`: the result is on `branch`, created or moved forward). `previous`: where `branch` was
    (None: created), to undo it. `pushed`: the remote it was pushed to. `by`: who asked."""

    branch: str
    sha: str
    how: str
    previous: str | None = None
    checkout: str | None = None
    reason: str = ""
    pushed: str = ""
    by: str = ""


class JobDiscarded(EventData, frozen=True, kw_only=True):
    """An ended job's branches (its integration branch and its tasks', in Numerus's mirror and in the user's
    repository) and worktrees were removed at a user's request (`numerusctl discard`), each list naming what was
    there and is gone. Its history and logs stay. `by`: who asked."""

    worktrees: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    freed_bytes: int = 0
    by: str = ""


class SecretRedacted(EventData, frozen=True, kw_only=True):
    """Secrets were replaced by `[REDACTED:<kind>]` before being stored: `counts` by kind, never a secret. One per
    agent run that printed or answered a secret (at its exit), for `task` ("" for the planner's and the queen's
    calls), and one per other text that held one (a goal, a check's output) as it was recorded."""

    task: str = ""
    counts: dict[str, int]


# --- the daemon-wide queue of agent slots (max_agents) -------------------------------------------------------


class JobQueued(EventData, frozen=True, kw_only=True):
    """The job's first agent found no free agent slot of the daemon (`max_agents`): it waits its turn.

    Its place is not stored: `status` computes it from the queued jobs' promotions, priorities and submission
    order (docs/operations.md, "The queue")."""


class JobStarted(EventData, frozen=True, kw_only=True):
    """The queued job got its first agent slot and goes on (a job that never waited has no JobQueued nor this)."""


class JobPaused(EventData, frozen=True, kw_only=True):
    """A user paused the job (`numerusctl pause`): it takes no new agent slot; agents running finish their step."""

    by: str


class JobUnpaused(EventData, frozen=True, kw_only=True):
    """A user let the paused job go on (`numerusctl start`)."""

    by: str


class JobPromoted(EventData, frozen=True, kw_only=True):
    """A user moved the queued job to the front of the queue (`numerusctl start`): the latest moved goes first."""

    by: str


# --- the task aggregate (inside a job) ---------------------------------------------------------------------


class TaskEvent(EventData, frozen=True, kw_only=True):
    """Base of the events that belong to one task; the envelope's `task` names it."""

    TASK_EVENT: ClassVar[bool] = True


class TaskCreated(TaskEvent, frozen=True, kw_only=True):
    """A task was added to the job: what to do, with which agent, after which tasks."""

    title: str
    instructions: str
    agent: str
    role: str = "executor"
    deps: tuple[str, ...] = ()
    #: The files the plan expects the task to touch (the claim, asked of the executor, is what counts).
    intents: tuple[FileIntent, ...] = ()


class ClaimProposed(TaskEvent, frozen=True, kw_only=True):
    """The executor said what it will touch and run, before running (its answer as decoded)."""

    attempt: int
    paths: tuple[ClaimedPath, ...]
    commands: tuple[str, ...] = ()
    usage: Usage = Usage()
    #: The locks the paths stand for, normalised where the claim was read (symlinks in the worktree resolved):
    #: what the lock table arbitrates (empty in events written before this was recorded).
    locks: tuple[Lock, ...] = ()


class ClaimRejected(TaskEvent, frozen=True, kw_only=True):
    """The claim could not be used (bad JSON, a path leaving the worktree); the executor is asked again."""

    attempt: int
    errors: tuple[str, ...]
    usage: Usage = Usage()


class ClaimGranted(TaskEvent, frozen=True, kw_only=True):
    """GO: the task holds these locks until it releases them."""

    locks: tuple[Lock, ...]


class ClaimDenied(TaskEvent, frozen=True, kw_only=True):
    """NO GO: the claim overlaps locks of `holders`; the task waits with `locks` and is re-arbitrated on release."""

    locks: tuple[Lock, ...]
    holders: tuple[str, ...]
    conflicts: tuple[Conflict, ...]


class LocksReleased(TaskEvent, frozen=True, kw_only=True):
    """The task released its locks and left the queue: `merged`, `failed`, `killed`, `interrupted`."""

    reason: str = ""


class WorktreeCreated(TaskEvent, frozen=True, kw_only=True):
    """The task's branch is checked out at `path`, started from `base_sha` (the integration branch's tip)."""

    path: str
    branch: str
    base_sha: str


class TaskWorkCommitted(TaskEvent, frozen=True, kw_only=True):
    """Everything the agent left in its worktree was committed on the task's branch; `changes` lists it."""

    commit: str
    changes: tuple[str, ...] = ()


class ClaimViolated(TaskEvent, frozen=True, kw_only=True):
    """The gate found the task's work outside what it may do, one reason per path (or command): paths its claim
    does not cover, and escapes no claim allows (a path absolute or leaving the tree, anything under a `.git`, a
    symlink out of the repository, a gitlink, a file the agent reported writing outside its worktree, and with
    the profile's `commands = "claimed"` a command the claim did not list). The task does not merge."""

    violations: tuple[str, ...]


class CheckCompleted(TaskEvent, frozen=True, kw_only=True):
    """One configured check command ran in the task's worktree; `output` is the end of what it printed."""

    command: str
    exit_code: int | None
    duration_s: float
    output: str = ""


class ReviewCompleted(TaskEvent, frozen=True, kw_only=True):
    """The reviewer's verdict on the task's work: `pass` or `fail`, with its reasons."""

    verdict: str
    reasons: tuple[str, ...] = ()
    usage: Usage = Usage()


class GatePassed(TaskEvent, frozen=True, kw_only=True):
    """The work matches the claim, every check passed and the reviewer agreed: the task may merge."""


class GateFailed(TaskEvent, frozen=True, kw_only=True):
    """The work did not pass the quality gate; `reasons` go to the next attempt."""

    reasons: tuple[str, ...]


class TaskRetryScheduled(TaskEvent, frozen=True, kw_only=True):
    """The attempt failed and another follows after `delay_s`, told `reasons`."""

    next_attempt: int
    delay_s: float
    reasons: tuple[str, ...]
    #: The next attempt starts from a new worktree at the integration tip (the last one failed in git).
    fresh_worktree: bool = False


class MergeStarted(TaskEvent, frozen=True, kw_only=True):
    """About to merge `task_sha` into `integration` at `parent` (recorded first, so a crash is repaired, not redone)."""

    integration: str
    parent: str
    task_sha: str


class MergeBlocked(TaskEvent, frozen=True, kw_only=True):
    """The merge cannot land for now (`reason`: the integration branch is checked out in a worktree); nothing was
    changed, the task's work is kept, and the merge is tried again every `retry_s` seconds."""

    reason: str
    retry_s: float


class TaskMerged(TaskEvent, frozen=True, kw_only=True):
    """The task's work is on the integration branch, whose tip is now `sha`."""

    sha: str
    created: bool = True
    integration: str = ""


class MergeConflicted(TaskEvent, frozen=True, kw_only=True):
    """The merge would conflict; nothing was changed. The task is retried on the new tip."""

    paths: tuple[str, ...]
    messages: tuple[str, ...] = ()


class TaskStarted(TaskEvent, frozen=True, kw_only=True):
    """The daemon is about to spawn the task's agent (recorded before the side effect)."""

    attempt: int
    agent: str
    argv: tuple[str, ...]
    workdir: str
    log_path: str
    #: The agent's thread this run resumes (its attempt goes on after an interruption), if any.
    resumes: str | None = None


class AgentSpawned(TaskEvent, frozen=True, kw_only=True):
    """The agent process runs in its own PTY and session; `start_ticks` tells a reused pid apart."""

    pid: int
    start_ticks: int = 0


class AgentSpawnFailed(TaskEvent, frozen=True, kw_only=True):
    """The agent could not be started at all (missing binary, bad working directory)."""

    reason: str


class TaskOffered(TaskEvent, frozen=True, kw_only=True):
    """The attempt's agent runs on a remote worker of `pool`: offered on `numerus.work.<pool>` under `lease`, the
    token each of the attempt's reports must name (numerusd/protocol/work.py)."""

    pool: str
    lease: str


class TaskTaken(TaskEvent, frozen=True, kw_only=True):
    """The worker `worker` took the offered attempt and runs its agent on `host`."""

    worker: str
    lease: str
    host: str = ""


class TaskLost(TaskEvent, frozen=True, kw_only=True):
    """The attempt's worker went away (it stopped heart-beating, or handed the attempt back): the task runs again
    as a new attempt, not counted as failed; a late report under `lease` is refused."""

    worker: str
    lease: str
    reason: str


class AgentThreadStarted(TaskEvent, frozen=True, kw_only=True):
    """The agent opened a conversation thread that a later attempt may resume."""

    thread_id: str


class AgentMessageReceived(TaskEvent, frozen=True, kw_only=True):
    """The agent said something to the user."""

    text: str


class AgentCommandExecuted(TaskEvent, frozen=True, kw_only=True):
    """The agent ran a shell command."""

    command: str
    exit_code: int | None = None
    status: str = "completed"


class AgentFileChanged(TaskEvent, frozen=True, kw_only=True):
    """The agent reported a change to a file: `kind` is add, update or delete."""

    path: str
    kind: str


class AgentErrorReported(TaskEvent, frozen=True, kw_only=True):
    """The agent reported an error (a failed turn, a stream error)."""

    message: str


class AgentInputSent(TaskEvent, frozen=True, kw_only=True):
    """Someone typed into the running agent's terminal (`numerusctl attach`): how many bytes, and their HMAC-SHA256
    under the daemon's current signing key (`mac`), never the bytes themselves (they may be a secret, and a plain
    hash of a few keystrokes is undone by trying them all); `by` is who (`alice (operator)`). Whoever holds the keys
    can check what was typed; a reader of the events cannot learn it."""

    size: int
    mac: str
    by: str


class TokensUsed(TaskEvent, frozen=True, kw_only=True):
    """Tokens one turn of the agent used; the `thread_*` totals are the agent's cumulative counters."""

    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    thread_input_tokens: int = 0
    thread_cached_input_tokens: int = 0
    thread_output_tokens: int = 0


class TaskExited(TaskEvent, frozen=True, kw_only=True):
    """The agent process ended; its whole terminal output is the file at `log_path` with that hash."""

    exit_code: int | None
    signal: int | None = None
    log_path: str
    log_sha256: str
    log_bytes: int
    duration_s: float


class TaskCompleted(TaskEvent, frozen=True, kw_only=True):
    """The task's work is done."""


class TaskFailed(TaskEvent, frozen=True, kw_only=True):
    """The task's attempt failed; `reason` says why."""

    reason: str


class TaskKilled(TaskEvent, frozen=True, kw_only=True):
    """The task's agent was stopped at a user's request."""

    reason: str = "killed by user"


class TaskKillRequested(TaskEvent, frozen=True, kw_only=True):
    """A user asked to stop this one task (`numerusctl kill JOB TASK`); it is killed once its agent has ended."""

    by: str = ""


class TaskSkipped(TaskEvent, frozen=True, kw_only=True):
    """The task will never run: a task it depends on failed or was dropped, or a user skipped it (`by`): then
    the tasks that depend on it run as if it had completed."""

    reason: str
    by: str = ""


class TaskRetryRequested(TaskEvent, frozen=True, kw_only=True):
    """A user asked for the task to run again (`numerusctl retry`), or a task it depends on is retried: it is
    pending again, with `max_attempts` new attempts from the integration branch's tip."""

    by: str = ""
    reason: str = ""


class TaskEscalated(TaskEvent, frozen=True, kw_only=True):
    """Every attempt on the task's profile failed: one more runs on `agent`, the profile's `escalate` profile."""

    agent: str
    previous: str


class TaskApprovalRequested(TaskEvent, frozen=True, kw_only=True):
    """The task's escalated attempt failed too: it waits (`awaiting_approval`, its locks kept) for `approve JOB
    TASK` (one more attempt) or `reject JOB TASK` (it fails). `reasons` go to the next attempt."""

    reason: str
    reasons: tuple[str, ...] = ()


class TaskApproved(TaskEvent, frozen=True, kw_only=True):
    """A user approved one more attempt of the task."""

    by: str


class TaskRejected(TaskEvent, frozen=True, kw_only=True):
    """A user rejected the task that waited for approval: it fails, and the tasks depending on it are skipped."""

    by: str
    reason: str = ""


class TaskInterrupted(TaskEvent, frozen=True, kw_only=True):
    """The daemon stopped while the task's agent ran, so that attempt's outcome is unknown; never read as completed.

    `resumable`: the task goes on when its job resumes, resuming the agent's thread `thread_id` when it has one
    (else with a new attempt, not counted as failed). One recorded before jobs could resume ended the task (failed).
    """

    reason: str
    resumable: bool = False
    thread_id: str | None = None


#: Every payload class, by the name that stands in an envelope's `type`.
EVENT_TYPES: dict[str, type[EventData]] = {
    cls.__name__: cls
    for cls in (
        JobSubmitted,
        KillRequested,
        JobCompleted,
        JobFailed,
        JobKilled,
        JobInterrupted,
        JobResumed,
        JobReopened,
        JobCleaned,
        JobAccepted,
        JobDiscarded,
        SecretRedacted,
        ApprovalRequested,
        JobApproved,
        JobRejected,
        BudgetExceeded,
        ReplanRequested,
        ReplanFailed,
        PlanRequested,
        PlanRejected,
        PlanValidated,
        IntegrationBranchCreated,
        TaskCreated,
        ClaimProposed,
        ClaimRejected,
        ClaimGranted,
        ClaimDenied,
        LocksReleased,
        WorktreeCreated,
        TaskStarted,
        AgentSpawned,
        AgentSpawnFailed,
        TaskOffered,
        TaskTaken,
        TaskLost,
        AgentThreadStarted,
        AgentMessageReceived,
        AgentCommandExecuted,
        AgentFileChanged,
        AgentErrorReported,
        AgentInputSent,
        TokensUsed,
        TaskExited,
        TaskWorkCommitted,
        ClaimViolated,
        CheckCompleted,
        ReviewCompleted,
        GatePassed,
        GateFailed,
        TaskRetryScheduled,
        MergeStarted,
        MergeBlocked,
        TaskMerged,
        MergeConflicted,
        TaskCompleted,
        TaskFailed,
        TaskKilled,
        TaskKillRequested,
        TaskSkipped,
        TaskRetryRequested,
        TaskInterrupted,
        JobQueued,
        JobStarted,
        JobPaused,
        JobUnpaused,
        JobPromoted,
        TaskEscalated,
        TaskApprovalRequested,
        TaskApproved,
        TaskRejected,
    )
}
