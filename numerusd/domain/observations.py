"""What `numerusd.domain.decide` decides on: commands from users, and what side effects observed.

A command asks for a change (`SubmitJob`, `Kill`, `Resume`, `Retry`, `Skip`, `CleanedUp`); an observation reports
what a side effect found or did (a worktree is ready, an agent exited, a check ran, a merge landed). Neither is
stored: `decide` turns each into the events it implies in the job's current state, or refuses it. Observations are
plain frozen values, made by the code that performed the side effect, with everything the decision needs in them
(facts read from disk, such as the locks a claim stands for with symlinks resolved, are observed once, here, and end
up in the events), so that a decision depends on the job's events and the observation alone.
"""

from __future__ import annotations

import msgspec

from numerusd.protocol.claims import ClaimedPath, Lock
from numerusd.protocol.events import EventData, Usage
from numerusd.protocol.plan import Plan

# --- commands --------------------------------------------------------------------------------------------------


class SubmitJob(msgspec.Struct, frozen=True, kw_only=True):
    """A goal for a repository, with the settings the job runs with (the `run` request, its defaults filled in).

    `plan=False` (`--no-plan`) is a plan of one task, worked on in place by the executor, with no claims, checks,
    review or retry.
    """

    goal: str
    repo: str
    roles: dict[str, str]
    plan: bool = True
    parallel: int = 1
    checks: tuple[str, ...] = ()
    review: bool = True
    max_attempts: int = 3
    backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_replans: int = 0
    claims: str = "agent"
    base_sha: str | None = None
    #: The repository's uncommitted paths the job leaves out (None: git could not tell in time).
    uncommitted: tuple[str, ...] | None = ()
    #: The roles whose agent profile runs without Numerus's sandbox.
    unsandboxed: tuple[str, ...] = ()
    #: Its place in the daemon's queue of agent slots: higher first (numerusd.domain.queueing).
    priority: int = 0
    #: The branch the repository's HEAD was on (None: detached).
    branch: str | None = None
    #: Who submitted it; where it waits for approval; its token caps and what crossing one does; the profile that
    #: makes one more attempt after a profile's all failed (see JobSubmitted).
    by: str = ""
    approve: tuple[str, ...] = ()
    max_tokens: int | None = None
    task_max_tokens: int | None = None
    on_budget: str = "pause"
    escalate: dict[str, str] = {}
    #: The pool of remote workers that runs its executors ("": the daemon itself).
    pool: str = ""
    #: A plan the user wrote (`run --plan FILE`), validated already, with its hash: no planner is asked.
    given_plan: Plan | None = None
    given_plan_hash: str = ""


class Kill(msgspec.Struct, frozen=True, kw_only=True):
    """`kill JOB` (`task` None) or `kill JOB TASK`, asked `by` someone."""

    by: str = ""
    task: str | None = None


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """`resume JOB`: an interrupted job goes on (asked by a user, or by numerusd at start with `resume = "auto"`)."""

    by: str = ""


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """`retry JOB [TASK...]`: the tasks named (none: every failed, killed or interrupted one) run again."""

    by: str = ""
    tasks: tuple[str, ...] = ()


class Skip(msgspec.Struct, frozen=True, kw_only=True):
    """`skip JOB TASK`: the task will not run; the tasks that depend on it go on without it."""

    by: str = ""
    task: str


class Approve(msgspec.Struct, frozen=True, kw_only=True):
    """`approve`: the job goes on from its approval (`add_tokens` raises an exceeded cap), or with `task`, that task
    makes one more attempt; `by` is who asked."""

    by: str
    task: str | None = None
    add_tokens: int | None = None


class Reject(msgspec.Struct, frozen=True, kw_only=True):
    """`reject`: the job waiting for approval fails, or with `task`, that task does; `by` is who asked."""

    by: str
    task: str | None = None
    reason: str = ""


class CleanedUp(msgspec.Struct, frozen=True, kw_only=True):
    """`clean` removed what an ended job left on disk (see `numerusd.clean`)."""

    worktrees: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    logs: bool = False
    freed_bytes: int = 0


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """`numerusctl pause`: the job takes no new agent slot; `by` is who asked (numerusd.domain.queueing)."""

    by: str


class Start(msgspec.Struct, frozen=True, kw_only=True):
    """`numerusctl start`: a paused job goes on, a queued one moves to the front of the queue; `by` is who asked."""

    by: str


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """`accept` took the job's result into the user's repository (see `JobAccepted`); `partial`: the user took
    the result of a job that did not complete."""

    branch: str
    sha: str
    how: str
    previous: str | None = None
    checkout: str | None = None
    reason: str = ""
    pushed: str = ""
    by: str = ""
    partial: bool = False


class Discarded(msgspec.Struct, frozen=True, kw_only=True):
    """`discard` removed an ended job's branches and worktrees (see `numerusd.clean`, `JobDiscarded`)."""

    worktrees: tuple[str, ...] = ()
    branches: tuple[str, ...] = ()
    freed_bytes: int = 0
    by: str = ""


# --- observations of the job ---------------------------------------------------------------------------------


class PlanAsked(msgspec.Struct, frozen=True, kw_only=True):
    """The planner (or, for a revised plan, the queen) is about to be asked, for the `attempt`-th time."""

    role: str
    attempt: int
    agent: str
    log_path: str


class PlanAnswered(msgspec.Struct, frozen=True, kw_only=True):
    """The planner or the queen answered: a plan that passed validation (`plan`, `plan_hash`), or `errors`.

    After `max_attempts` rejected answers the planner's job fails; a queen's answer must also keep what is done.
    """

    role: str
    attempt: int
    plan: Plan | None = None
    plan_hash: str = ""
    errors: tuple[str, ...] = ()
    answer: str = ""
    usage: Usage = Usage()
    max_attempts: int = 1


class IntegrationReady(msgspec.Struct, frozen=True, kw_only=True):
    """The job's integration branch exists at `base_sha`."""

    branch: str
    base_sha: str


class Stalled(msgspec.Struct, frozen=True, kw_only=True):
    """No task of the job has completed for `idle_s` seconds."""

    idle_s: float


class ReplanGaveUp(msgspec.Struct, frozen=True, kw_only=True):
    """The queen gave no usable revised plan."""

    reason: str


class PipelineFailed(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon cannot go on with the job (an error of its own, or its integration branch moved under it)."""

    reason: str


class Settled(msgspec.Struct, frozen=True, kw_only=True):
    """Every task of the job has ended and no revised plan is on its way."""


class Redacted(msgspec.Struct, frozen=True, kw_only=True):
    """Secrets were replaced in what an agent printed or answered, or in a text about to be recorded (by kind).

    `task` is the task whose agent (or text) it was; "" for the job's own (the planner, the queen, its goal).
    """

    counts: dict[str, int]
    task: str = ""


class AgentSlotAwaited(msgspec.Struct, frozen=True, kw_only=True):
    """The job's first agent found no free agent slot of the daemon (`max_agents`), or the job is paused."""


class AgentSlotTaken(msgspec.Struct, frozen=True, kw_only=True):
    """One of the job's agents got an agent slot of the daemon."""


class Interrupted(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon stopped (or was found to have stopped) while the job was under way; `next` says what happens
    next (it resumes when numerusd starts, or when asked)."""

    reason: str
    next: str = ""


# --- observations of a task ----------------------------------------------------------------------------------


class TaskObservation(msgspec.Struct, frozen=True, kw_only=True):
    """Base of the observations about one task of the job."""

    task: str


class TaskReady(TaskObservation, frozen=True, kw_only=True):
    """Every task this one depends on has ended: it may go on (or is skipped, or killed)."""


class ClaimAnswered(TaskObservation, frozen=True, kw_only=True):
    """The task's claim, as answered by its executor (`attempt` 0: taken from the plan's file intents).

    Usable: its `paths` and `commands`, and the `locks` they stand for as normalised in the worktree. Not
    usable: `errors`; after `max_attempts` such answers the task fails.
    """

    attempt: int
    paths: tuple[ClaimedPath, ...] = ()
    commands: tuple[str, ...] = ()
    locks: tuple[Lock, ...] = ()
    errors: tuple[str, ...] = ()
    usage: Usage = Usage()
    max_attempts: int = 1


class WorktreeReady(TaskObservation, frozen=True, kw_only=True):
    """A new worktree for the task is checked out at `path` on `branch`, from `base_sha`."""

    path: str
    branch: str
    base_sha: str


class AgentStarting(TaskObservation, frozen=True, kw_only=True):
    """The task's agent is about to be spawned with `argv` (recorded first, so a crash after it is seen)."""

    argv: tuple[str, ...]
    workdir: str
    log_path: str
    #: The interrupted attempt's agent thread this run goes on in (`codex exec resume`), if any.
    resumes: str | None = None


class AgentStarted(TaskObservation, frozen=True, kw_only=True):
    """The task's agent runs as `pid`."""

    pid: int
    start_ticks: int


class AgentFailedToStart(TaskObservation, frozen=True, kw_only=True):
    """The task's agent could not be spawned."""

    reason: str


class Offered(TaskObservation, frozen=True, kw_only=True):
    """The task's agent is offered to the remote workers of `pool` under `lease` (before the offer is sent)."""

    pool: str
    lease: str


class Taken(TaskObservation, frozen=True, kw_only=True):
    """The worker `worker` asks to run the attempt offered under `lease` (before it is told to go)."""

    lease: str
    worker: str
    host: str = ""


class Lost(TaskObservation, frozen=True, kw_only=True):
    """The worker running the attempt under `lease` went away or handed it back, for `reason`."""

    lease: str
    worker: str
    reason: str


class AgentReported(TaskObservation, frozen=True, kw_only=True):
    """What the agent's output parser read: messages, commands, file changes, tokens, its thread."""

    events: tuple[EventData, ...]


class InputSent(TaskObservation, frozen=True, kw_only=True):
    """`size` bytes with this keyed hash (`mac`, see AgentInputSent) arrived for the task's running agent's terminal
    from `by`; they are written to it once recorded. Refused (`CommandRefused`) unless the task runs."""

    size: int
    mac: str
    by: str


class AgentExited(TaskObservation, frozen=True, kw_only=True):
    """The task's agent ended, and its whole output is in the log at `log_path`."""

    exit_code: int | None
    signal: int | None
    log_path: str
    log_sha256: str
    log_bytes: int
    duration_s: float


class WorkCommitted(TaskObservation, frozen=True, kw_only=True):
    """What the agent left in its worktree is committed on the task's branch."""

    commit: str
    changes: tuple[str, ...] = ()


class ClaimCompared(TaskObservation, frozen=True, kw_only=True):
    """The task's diff was compared with its claim: the paths it changed outside it."""

    violations: tuple[str, ...] = ()


class CheckRan(TaskObservation, frozen=True, kw_only=True):
    """One check command ran in the task's worktree (`exit_code` None: it timed out)."""

    command: str
    exit_code: int | None
    duration_s: float
    output: str = ""


class Reviewed(TaskObservation, frozen=True, kw_only=True):
    """The reviewer's verdict on the task's work."""

    verdict: str
    reasons: tuple[str, ...] = ()
    usage: Usage = Usage()


class GateDone(TaskObservation, frozen=True, kw_only=True):
    """The quality gate is through: the reasons it failed, none when it passed."""

    reasons: tuple[str, ...] = ()


class MergeBegun(TaskObservation, frozen=True, kw_only=True):
    """The task's commit is about to be merged into the integration branch at `parent`."""

    integration: str
    parent: str
    task_sha: str


class MergeWaiting(TaskObservation, frozen=True, kw_only=True):
    """The merge cannot land for now (the integration branch is checked out); tried again every `retry_s`."""

    reason: str
    retry_s: float


class MergeConflict(TaskObservation, frozen=True, kw_only=True):
    """Merging the task's work would conflict; nothing was changed."""

    paths: tuple[str, ...]
    messages: tuple[str, ...] = ()


class Merged(TaskObservation, frozen=True, kw_only=True):
    """The task's work is on the integration branch at `sha` (`created`: a merge commit was made for it)."""

    sha: str
    created: bool


class FinishedInPlace(TaskObservation, frozen=True, kw_only=True):
    """The agent of a job worked in place (`--no-plan`) ended well: there is nothing to check or merge."""


class AttemptFailed(TaskObservation, frozen=True, kw_only=True):
    """The attempt failed, for `reasons` (told to the next one); `fresh_worktree`: git failed, start anew."""

    reasons: tuple[str, ...]
    fresh_worktree: bool = False


class StoppedForKill(TaskObservation, frozen=True, kw_only=True):
    """The task's flow reached a point where the job's kill stops it."""


#: Everything `decide` takes.
Command = SubmitJob | Kill | Resume | Retry | Skip | CleanedUp | Pause | Start | Accepted | Discarded | Approve | Reject
Observation = (
    PlanAsked
    | AgentSlotAwaited
    | AgentSlotTaken
    | PlanAnswered
    | IntegrationReady
    | Stalled
    | ReplanGaveUp
    | PipelineFailed
    | Settled
    | Interrupted
    | TaskReady
    | ClaimAnswered
    | WorktreeReady
    | AgentStarting
    | AgentStarted
    | AgentFailedToStart
    | Offered
    | Taken
    | Lost
    | AgentReported
    | InputSent
    | AgentExited
    | WorkCommitted
    | ClaimCompared
    | CheckRan
    | Reviewed
    | GateDone
    | MergeBegun
    | MergeWaiting
    | MergeConflict
    | Merged
    | FinishedInPlace
    | AttemptFailed
    | StoppedForKill
)
