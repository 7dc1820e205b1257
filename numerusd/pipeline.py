"""The pipeline of a planned job: plan, claim, GO / NO GO, worktree, execute, quality gate, merge.

One `JobPipeline` per running planned job drives it from `JobSubmitted` to `JobCompleted` (or failed, killed):

    plan()          the planner answers a plan (read-only); validated, or asked again with every error
    task_flow(t)    one coroutine per task, all started at once:
        wait        until every task it depends on is merged (or one failed: then it is skipped)
        claim()     its executor says what it will touch (read-only); normalised into locks
        arbitrate   GO (ClaimGranted) or NO GO (ClaimDenied naming the holder), then wait to be woken
        attempt()   worktree from the integration tip, executor in its PTY, then the gate: diff against the
                    claim, check commands, reviewer; then the merge into the integration branch, one at a time
        retry       a failed attempt is retried after 1, 2, 4 s with its reasons, up to `max_attempts`

A job run with `--no-plan` is a plan of one task that its agent works on in place, in the repository itself:
no integration branch, claim, worktree, gate or merge; its task ends when its agent does.

This module only sequences the steps and does the I/O (agents, git, checks): what each step observed goes to
`JobBook.decide`, which decides it in the job's state (and may refuse it) and appends the events before the
next step acts. A decision that releases a task's locks also grants the tasks waiting for them, in the same
append. At most `parallel` agents of the job work at once, and claims are asked for at most `parallel` tasks
ahead of them (see `numerusd.slots`), each agent also holding a slot of the daemon's (`numerusd.agent_pool`).
A daemon that stops leaves the job to be recorded `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from numerusd import domain, failpoints, git, locks, logs, prompts, sandbox, tracing
from numerusd.agent_pool import Seat, Withdrawn
from numerusd.agents.base import AgentInvocation
from numerusd.agents.registry import adapter_for
from numerusd.book import JobBook
from numerusd.checkouts import CHECKOUTS_SUFFIX, Checkouts
from numerusd.checks import CheckLog, run_check
from numerusd.claims import escapes, outside_claim, reported_outside, unclaimed_commands
from numerusd.config import Settings
from numerusd.dispatch import Dispatcher, RemoteAttempt, WorkLost
from numerusd.domain.observations import (
    AttemptFailed,
    CheckRan,
    ClaimAnswered,
    ClaimCompared,
    FinishedInPlace,
    GateDone,
    IntegrationReady,
    Lost,
    MergeBegun,
    MergeConflict,
    Merged,
    MergeWaiting,
    Observation,
    PipelineFailed,
    PlanAnswered,
    PlanAsked,
    Redacted,
    ReplanGaveUp,
    Reviewed,
    Settled,
    Stalled,
    StoppedForKill,
    TaskReady,
    WorkCommitted,
    WorktreeReady,
)
from numerusd.errors import InvalidTransition, NumerusError
from numerusd.plans import ValidatedPlan, validate_plan
from numerusd.protocol import subjects
from numerusd.protocol.claims import Claim, ClaimedPath, decode_claim
from numerusd.protocol.commands import JOB_DONE
from numerusd.protocol.events import (
    BudgetExceeded,
    EventData,
    PlanRejected,
    PlanValidated,
    TaskCompleted,
    TaskRetryScheduled,
    Usage,
)
from numerusd.protocol.plan import FileIntent
from numerusd.protocol.review import decode_verdict
from numerusd.protocol.work import CheckResult
from numerusd.slots import Slots
from numerusd.supervisor import AgentCall, AgentProcess, Agents, CallResult, TaskRun

log = logging.getLogger(__name__)

#: Who commits an agent's work on its task branch.
AUTHOR = ("Numerus agent", "agent@numerus.invalid")
#: Seconds between tries of a merge blocked by a checkout of the integration branch.
MERGE_RETRY_S = 2.0
#: How much of a failing check's output is kept in its event and told to the next attempt.
CHECK_OUTPUT_CHARS = 2000


class _Stopped(Exception):
    """The daemon is stopping: leave the job as it is; shutdown records it interrupted."""


class _Killed(Exception):
    """A kill arrived while the planner or the queen was asked; the job's end is recorded."""


class JobPipeline:
    """Drives one job; `run()` returns when the job has ended or the daemon stops.

    It sees the daemon through narrow seams: the job `book` (state, and `decide` to change it), the `settings`,
    the `agents` it runs (through which a kill or a shutdown stops them), and the daemon's `stopping` flag.
    """

    def __init__(
        self,
        job_id: str,
        *,
        book: JobBook,
        settings: Settings,
        agents: Agents,
        stopping: asyncio.Event,
        seat: Seat | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.book = book
        #: Offers the executors of a job with a pool to remote workers (numerusd.dispatch).
        self.dispatcher = dispatcher
        self.settings = settings
        self.agents = agents
        self.stopping = stopping
        self.job_id = job_id
        job = self.job
        self.repo = Path(job.repo)
        #: Where the job's git work happens: Numerus's own mirror of `repo` (in place: `repo` itself).
        self.git_repo = self.repo if job.in_place else git.mirror_path(settings.repos_dir, job.repo)
        self.changed = asyncio.Condition()
        #: Executors, reviews, the planner and the queen: at most `parallel` at once, each in a slot of `seat`.
        self.slots = Slots(max(1, job.parallel), seat)
        #: Tasks being asked their claim or holding GO without an executor yet: at most `parallel` ahead of `slots`.
        self.ahead = Slots(max(1, job.parallel), seat)
        self.merging = asyncio.Lock()
        self.flows: dict[str, asyncio.Task[None]] = {}
        #: When a task last completed (or a plan was accepted): a job without progress for too long is stalled.
        self.progress_at = time.monotonic()
        self.replanning = asyncio.Lock()
        #: What the planner, the queen and the claimers read (see numerusd.checkouts).
        self.checkouts = Checkouts(self.git_repo, self.settings.worktrees_dir / f"{job_id}{CHECKOUTS_SUFFIX}")
        #: Each task's last agent run: what it reported running and writing, for the gate.
        self.runs: dict[str, TaskRun] = {}
        #: Whether the job's tasks may run: set once `run` has its plan approved and its integration branch.
        self.flowing = False
        #: The checks a remote worker ran on each task's last commit, for its gate.
        self.remote_checks: dict[str, tuple[CheckResult, ...]] = {}
        #: The job's agents being stopped because a token budget was exceeded (`on_budget = "stop"`).
        self._stopping_agents: asyncio.Task[None] | None = None

    @property
    def hidden(self) -> tuple[Path, ...]:
        """What no agent of the job may see: the daemon's state directory, its key file and the user's repository
        (its agents get their own checkouts and worktrees, bound back into the sandbox)."""
        settings = self.settings
        keys = settings.keys_path  # a key file kept outside the state directory is hidden on its own
        return (settings.state_dir, self.repo, *(() if keys.is_relative_to(settings.state_dir) else (keys,)))

    def git_dirs(self, workdir: Path) -> tuple[Path, ...] | None:
        """A task worktree's git metadata, as the daemon made it: its `.git` file and the mirror it points into
        (None in place: the repository's own `.git`, which the agent cannot write, is read there)."""
        return None if self.job.in_place else (workdir / ".git", self.git_repo)

    @property
    def job(self) -> domain.JobState:
        """The job as its events made it, now."""
        return self.book.jobs[self.job_id]

    # --- the job ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Plan if needed, then run every task to its end."""
        logs.enter(job=self.job_id, traceparent=self.job.traceparent)  # its lines and events: the job's trace
        in_place = self.job.in_place
        try:
            if not in_place:
                try:
                    await git.prepare_mirror(self.repo, self.git_repo, self.job.base_sha or "HEAD")
                except git.GitError as e:
                    await self._fail(f"cannot bring {self.repo} into Numerus's mirror {self.git_repo}: {e.message}")
                    return
                await self.checkouts.clear()  # left by a daemon that stopped in the middle
            if self.job.status == "planning" and not await self.plan():
                return
            await self.approved()  # a plan approval: no task starts before it
            if self.job.status in JOB_DONE:
                return
            if not in_place:
                await self.integration_branch()
            if self.job.status == "replanning":
                await self.replan()  # asked before the daemon stopped, not answered yet
            self.flowing = True
            self.start_flows()
            watch = asyncio.create_task(self._watch_progress(), name=f"{self.job_id} progress")
            self.flows["-progress"] = watch  # cancelled with the flows; never ends on its own
            # Until every task has ended and no revised plan is on its way (the queen may add tasks).
            while len(self.flows) > 1 or self.job.status == "replanning":
                done, _ = await asyncio.wait(self.flows.values(), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for flow in done:
                    self.flows = {task: f for task, f in self.flows.items() if f is not flow}
                    flow.result()  # an error in a flow (or the watch) is the pipeline's
            if not in_place:
                await self.publish(self.job.integration)  # in case a publication after a merge was refused
            await self.observe(Settled())
            while self.job.status == "awaiting_approval":  # a merge (or budget) approval holds the job's end
                await self.approved()
                await self.observe(Settled())
        except (_Stopped, Withdrawn):  # the daemon stops, or the job ended while it waited for an agent slot
            return
        except git.RefMoved as e:
            await self._fail(
                f"{e.message}. Numerus alone moves {self.job.integration}: the job stops rather than merge onto "
                "work its gate did not check"
            )
        except Exception as e:
            if self.stopping.is_set():
                return
            log.exception("pipeline of job %s failed", self.job_id)
            await self._fail(f"internal error in the pipeline: {e}")
        finally:
            for flow in self.flows.values():
                flow.cancel()
            await asyncio.gather(*self.flows.values(), return_exceptions=True)
            if self.job.pool and self.job.status in JOB_DONE and self.dispatcher is not None:
                await asyncio.shield(self.dispatcher.remove_job(self.job_id))  # its bundles: nothing reads them now
            if not in_place:
                try:
                    await asyncio.shield(self.checkouts.clear())
                except git.GitError as e:
                    log.warning("job %s: cannot remove its read-only checkouts: %s", self.job_id, e)

    async def _fail(self, reason: str) -> None:
        """End the job as failed, then stop its running agents (their flows are cancelled next): recorded first,
        so that an agent ending of the stop is an exit of a failed task, never a failed attempt to retry."""
        await self.observe(PipelineFailed(reason=reason))
        await self.agents.terminate(self.job_id)

    def start_flows(self) -> None:
        """A flow for every unfinished task that has none: the plan's tasks, those a revised plan adds, those
        retried, and, when a job resumes, each from its last recorded step. Nothing before the job's tasks may
        run (its plan approved, its integration branch made): `run` starts them then."""
        if not self.flowing:
            return
        for task in self.job.tasks.values():
            if task.status not in domain.TASK_DONE and task.id not in self.flows:
                self.flows[task.id] = asyncio.create_task(self.task_flow(task.id), name=f"{self.job_id}/{task.id}")

    async def poke(self) -> None:
        """Wake every step waiting for the job to change (a kill, a release)."""
        async with self.changed:
            self.changed.notify_all()

    async def observe(self, observation: Observation) -> list[EventData]:
        """Have the book decide what was observed, wake the steps waiting for the job to change; the payloads
        appended."""
        sealed = await self.book.decide(self.job_id, observation)
        if any(isinstance(event.envelope.data, (TaskCompleted, PlanValidated)) for event in sealed):
            self.progress_at = time.monotonic()
        if any(isinstance(event.envelope.data, BudgetExceeded) for event in sealed) and self.job.kill_requested:
            # A budget with `on_budget = "stop"`: its agents stop as a kill stops them (not awaited: this may be
            # the reading loop of one of them).
            self._stopping_agents = asyncio.create_task(self.agents.terminate(self.job_id))
        await self.poke()
        return [event.envelope.data for event in sealed]

    async def until(self, predicate: Callable[[domain.JobState], bool]) -> None:
        """Wait until the job's state satisfies `predicate`."""
        async with self.changed:
            await self.changed.wait_for(lambda: predicate(self.job) or self.stopping.is_set())
        self._check_stopping()

    async def approved(self) -> None:
        """Wait while the job awaits a user's approval (its plan, its merge, a token cap): no agent starts meanwhile."""
        await self.until(lambda job: job.status != "awaiting_approval")

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise _Stopped

    # --- plan ---------------------------------------------------------------------------------------------

    async def plan(self) -> bool:
        """Ask the planner until it answers a valid plan; False when the job ended instead."""
        while True:
            attempt = self.job.plan_attempts + 1
            call_dir = self.settings.runs_dir / self.job_id / "plan" / str(attempt)
            prompt = prompts.planner(self.job_id, self.job.goal, attempt, self.job.plan_errors)
            try:
                errors = await self.ask_for_plan("planner", attempt, call_dir, prompt, self.settings.plan_attempts)
            except _Killed:
                return False
            if errors is None:
                return True
            if self.job.status in JOB_DONE:
                return False

    async def replan(self) -> None:
        """Ask the queen for a revised plan (the job is `replanning`); start the tasks it adds."""
        async with self.replanning:
            if self.job.status != "replanning":
                return  # another flow's request was answered meanwhile
            failed, reason = self.job.replan_for or ("", "a task failed")
            errors: list[str] = []
            for attempt in range(1, self.settings.plan_attempts + 1):
                job = self.job
                assert job.plan is not None
                call_dir = self.settings.runs_dir / self.job_id / f"replan-{job.replans}" / str(attempt)
                statuses = {task.id: task.status for task in job.tasks.values()}
                plan_json = msgspec.json.encode(job.plan).decode()
                prompt = prompts.queen(
                    self.job_id, job.goal, plan_json, statuses, failed, reason, attempt, tuple(errors)
                )
                try:
                    # Never the job's end: a queen without a usable answer leaves the plan as it is (below).
                    found = await self.ask_for_plan("queen", attempt, call_dir, prompt, self.settings.plan_attempts + 1)
                except _Killed:
                    return
                if found is None:
                    self.start_flows()
                    return
                errors = found
            why = f"the queen gave no valid revised plan in {self.settings.plan_attempts} answers: {'; '.join(errors)}"
            await self.observe(ReplanGaveUp(reason=why))

    async def _watch_progress(self) -> None:
        """Ask the queen for a revised plan when no task has completed for `stall_timeout_s`."""
        stall = self.settings.stall_timeout_s
        while True:
            await asyncio.sleep(min(5.0, stall / 4))
            if time.monotonic() - self.progress_at < stall:
                continue
            self.progress_at = time.monotonic()
            await self.observe(Stalled(idle_s=stall))
            if self.job.status == "replanning":
                await self.replan()

    async def ask_for_plan(
        self, role: str, attempt: int, call_dir: Path, prompt: str, max_attempts: int
    ) -> list[str] | None:
        """One question to the planner or the queen: None when its plan was accepted, else why not (recorded).

        The answer is validated here (it may read the repository's symlinks), and the domain decides on the
        result (a queen's plan must also keep what is done). Raises _Killed when a kill arrived meanwhile (the
        job's end is recorded).
        """
        profile_name = self.job.roles.get(role, self.job.agent)
        log_path = str(call_dir / "stdout.log")
        await self.observe(PlanAsked(role=role, attempt=attempt, agent=profile_name, log_path=log_path))
        # The planner reads the commit the job works from; the queen, the work merged so far.
        result = await self.call(role, None, f"{role}-{attempt}", call_dir, prompt, "plan")
        self._check_stopping()
        failure = result.failure()
        checked = [failure] if failure else validate_plan(result.answer or "", repo=self.repo)
        answer = PlanAnswered(
            role=role, attempt=attempt, answer=result.answer or "", usage=result.usage, max_attempts=max_attempts
        )
        if isinstance(checked, ValidatedPlan):
            answer = msgspec.structs.replace(answer, plan=checked.plan, plan_hash=checked.hash)
        else:
            answer = msgspec.structs.replace(answer, errors=tuple(str(error) for error in checked))
        decided = await self.observe(answer)
        if self.job.kill_requested:
            raise _Killed
        rejected = next((event for event in decided if isinstance(event, PlanRejected)), None)
        return None if rejected is None else list(rejected.errors)

    async def tip(self) -> str:
        """The commit the job's work stands at: the integration branch's tip, else the commit the job started from."""
        job = self.job
        return job.integration_tip or job.base_sha or await git.resolve(self.repo, "HEAD")

    async def integration_branch(self) -> None:
        """Create the job's integration branch at the commit the job works from, once.

        That commit was recorded at submission: commits the user makes while the planner works do not move it,
        and after a crash the branch is made (or found) at the same place. A job recorded before the commit
        was takes the repository's HEAD now.
        """
        if self.job.integration is not None:
            return
        branch = await git.create_integration_branch(self.git_repo, self.job_id, self.job.base_sha or "HEAD")
        await self.observe(IntegrationReady(branch=branch.name, base_sha=branch.sha))
        await self.publish(branch.name)

    async def publish(self, *branches: str | None) -> None:
        """Fetch the job's `branches` from its mirror into the user's repository (delete those the mirror lost).

        Best effort: a refusal (the user moved or checked out a branch) is logged and the next publication tries
        again; the gate's and merge's own checks (`git.check_published`) are what stop the job.
        """
        try:
            await git.publish(self.git_repo, self.repo, *(branch for branch in branches if branch))
        except git.GitError as e:
            log.warning("job %s: cannot update its branches in %s: %s", self.job_id, self.repo, e.message)

    # --- one task -----------------------------------------------------------------------------------------

    async def task_flow(self, task_id: str) -> None:
        """Take one task from pending to merged (or failed, skipped, killed).

        A user's command (`skip`, `kill JOB TASK`) can end the task between two steps of its flow, while a claim
        or a worktree is being made: what that step observed is then refused by the domain, and the flow stops
        there; the refusal of a step of a task that has not ended is the daemon's error, as always."""
        logs.enter(task=task_id)
        try:
            await self._task_flow(task_id)
        except InvalidTransition:
            if self.job.tasks[task_id].status not in domain.TASK_DONE:
                raise
            log.info(
                "job %s: task %s ended by a user's command during a step; that step is dropped", self.job_id, task_id
            )
        finally:
            self.ahead.give_back(task_id)  # kept by a claim whose executor will not run (failed, killed)

    async def _task_flow(self, task_id: str) -> None:
        """From the task's status: a pending task waits for its dependencies and claims, a waiting one for its
        GO; then attempts until one merges. A task whose attempt a daemon stop cut goes on from its last recorded
        step: its gate or merge (`finish_attempt`), else a new attempt (resuming its agent's thread if it can)."""
        status = self.job.tasks[task_id].status
        if status == "pending":
            await self.until(lambda job: job.status in JOB_DONE or _settled(job, task_id))
            if self.job.tasks[task_id].status != "pending":
                return  # skipped, dropped or killed meanwhile
            await self.observe(TaskReady(task=task_id))  # killed, or skipped for a dependency that did not complete
            if self.job.tasks[task_id].status != "pending":
                return
            if self.job.claims != "none" and not await self.claim(task_id):
                return
            failpoints.hit("after-claim")  # tests: a crash with a claim arbitrated, no worktree yet
        if self.job.claims != "none" and self.job.tasks[task_id].status in ("pending", "waiting"):
            if task_id not in self.job.lock_holds:
                self.ahead.give_back(task_id)  # NO GO: it waits for the holder without keeping others from asking
            await self.until(
                lambda job: (
                    task_id in job.lock_holds
                    or job.tasks[task_id].status in domain.TASK_DONE
                    or job.kill_requested
                    or job.tasks[task_id].kill_requested
                )
            )
        if status == "awaiting_approval":  # escalated and failed before a daemon stop: it still waits for a user
            await self.until(lambda job: job.tasks[task_id].status != "awaiting_approval" or job.kill_requested)
        finishing = status in ("checking", "merging")
        while True:
            task = self.job.tasks[task_id]
            if task.status in domain.TASK_DONE:
                return  # skipped or killed by a user meanwhile
            if self.job.kill_requested or task.kill_requested:
                await self.observe(StoppedForKill(task=task_id))
                return
            fresh = False
            try:
                reasons = await (self.finish_attempt(task_id) if finishing else self.attempt(task_id))
                finishing = False
            except git.RefMoved:
                raise  # the integration branch moved under the job: no attempt of any task can merge now
            except git.GitError as e:  # one task's git trouble is that task's failed attempt, not the job's end
                log.warning("task %s/%s: %s", self.job_id, task_id, e.message)
                reasons, fresh = [f"git failed: {e.message}"], True
            except WorkLost as e:  # its worker went away: made again, not counted as failed
                self._check_stopping()
                await self.observe(Lost(task=task_id, lease=e.lease, worker=e.worker, reason=e.reason))
                continue
            if reasons is None:
                return
            decided = await self.observe(AttemptFailed(task=task_id, reasons=tuple(reasons), fresh_worktree=fresh))
            if self.job.status == "replanning":
                await self.replan()
                return
            retry = next((event for event in decided if isinstance(event, TaskRetryScheduled)), None)
            if retry is None and self.job.tasks[task_id].status == "awaiting_approval":
                # Escalated and failed again: one more attempt once a user approves it (a rejection fails it).
                await self.until(lambda job: job.tasks[task_id].status != "awaiting_approval")
                if self.job.tasks[task_id].status == "retrying":
                    continue
            if retry is None:
                return
            await self._pause(retry.delay_s)

    async def _pause(self, seconds: float) -> None:
        """Sleep before a retry; a kill or a stop ends the pause early."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.until(lambda job: job.kill_requested), timeout=seconds)

    async def claim(self, task_id: str) -> bool:
        """Ask the task's executor what it will touch until it answers a usable claim, arbitrated at once (GO or
        NO GO); False when the task ended instead (no usable claim, or killed).

        With `claims = "plan"` the plan's file intents are the claim, and no agent is asked (unless they cannot
        be locked, which validation makes unlikely).
        """
        if self.job.claims == "plan":
            claimed = intents_claim(self.job.tasks[task_id].intents)
            wanted = locks.claim_locks(claimed, self.repo)
            if not isinstance(wanted, locks.BadClaim):
                await self.observe(ClaimAnswered(task=task_id, attempt=0, paths=claimed.paths, locks=wanted))
                return True
        errors: tuple[str, ...] = ()
        attempts = self.settings.claim_attempts
        for attempt in range(1, attempts + 1):
            task = self.job.tasks[task_id]
            prompt = prompts.claim(self.job_id, task_id, task.title, task.instructions, attempt, errors)
            call_dir = self.settings.runs_dir / self.job_id / task_id / f"claim-{attempt}"
            # Asked ahead of the executors' slots, and still counted ahead until its executor gets one. It reads
            # the work merged so far, which its worktree will start from (its dependencies' work included).
            turn = self.ahead.taken(task=task_id, hand_on=True)
            result = await self.call("claimer", task_id, f"{task_id}.claim", call_dir, prompt, "claim", turn=turn)
            self._check_stopping()
            answer = ClaimAnswered(task=task_id, attempt=attempt, usage=result.usage, max_attempts=attempts)
            claimed = result.decoded(decode_claim, "the claim")
            if isinstance(claimed, str):
                errors = (claimed,)
            else:
                # Where the claim's paths really lead is read from the worktree's files once, here, and recorded.
                wanted = locks.claim_locks(claimed, self.repo)
                if not isinstance(wanted, locks.BadClaim):
                    paths, commands = claimed.paths, claimed.commands
                    await self.observe(msgspec.structs.replace(answer, paths=paths, commands=commands, locks=wanted))
                    return self.job.tasks[task_id].status not in domain.TASK_DONE
                errors = tuple(str(error) for error in wanted.errors)
            await self.observe(msgspec.structs.replace(answer, errors=errors))
            if self.job.tasks[task_id].status in domain.TASK_DONE:
                return False  # its last answer, or killed meanwhile
        return False

    async def attempt(self, task_id: str) -> list[str] | None:
        """One attempt with GO in hand: run, gate, merge (in place: run). None when done; else why it failed.

        An attempt a daemon stop cut goes on in its agent's thread when the agent said one (`codex exec resume`),
        with the same prompt's header and a word that it was interrupted; else it is a new attempt."""
        job, task = self.job, self.job.tasks[task_id]
        remote = bool(job.pool) and not job.in_place and self.dispatcher is not None
        thread = task.resumable_thread if not remote else None  # a worker's agent thread stays on its machine
        number = task.attempt if thread else task.next_attempt
        if job.in_place:
            prompt = prompts.resumed(task.instructions) if thread else task.instructions
            why = await self.execute(task_id, self.repo, prompt, number, resume=thread)
            self._check_stopping()
            if self._killing(task_id):
                return ["killed"]  # even if the agent ended well meanwhile: the task stops, as in a worktree
            if why is not None:
                return [why]
            await self.observe(FinishedInPlace(task=task_id))
            return None
        worktree = await self.worktree(task_id)
        prompt = prompts.executor(
            self.job_id, task_id, task.title, task.instructions, number, task.claim, task.feedback
        )
        if thread:
            prompt = prompts.resumed(prompt)
        message = f"{task_id}: {task.title}\n\nNumerus job {self.job_id}"
        offered = await self._offer(task_id, worktree, prompt, number, message) if remote else None
        try:
            why = await self.execute(task_id, worktree.path, prompt, number, resume=thread, remote=offered)
            self._check_stopping()
            if self._killing(task_id):
                return ["killed"]
            if why is None and offered is not None:
                why = await self._bring_back(task_id, worktree, offered)
            if why is not None:
                return [why]
        finally:
            if offered is not None:  # whatever became of it, its lease is refused from now on
                offered.dispatcher.forget(offered)
        work = await git.commit_work(worktree, message, author=AUTHOR)
        listed = tuple(f"{change.kind} {change.path}" for change in work.changes)
        await self.observe(WorkCommitted(task=task_id, commit=work.commit, changes=listed))
        return await self._gate_and_merge(task_id, worktree, work)

    async def _gate_and_merge(self, task_id: str, worktree: git.Worktree, work: git.Work) -> list[str] | None:
        reasons = await self.gate(task_id, worktree, work.changes)
        await self.observe(GateDone(task=task_id, reasons=tuple(reasons)))
        if reasons:
            return reasons
        return await self.merge(task_id, worktree, work.commit)

    async def finish_attempt(self, task_id: str) -> list[str] | None:
        """Go on with an attempt whose work was committed before a daemon stop: its gate (the checks that passed
        and a passing review are not run again), or its merge. None when merged; else why it failed."""
        task = self.job.tasks[task_id]
        if task.worktree is None or task.branch is None or task.base_sha is None or task.commit is None:
            return ["the daemon stopped during the gate and the attempt's work was not recorded"]
        worktree = git.Worktree(Path(task.worktree), task.branch, task.base_sha)
        if not worktree.path.is_dir():
            return [f"the daemon stopped during the gate and the worktree {worktree.path} is gone"]
        if task.status == "merging":
            return await self.merge(task_id, worktree, task.commit)
        if self.settings.agents[task.agent].commands == "claimed":
            # What the agent ran was observed as it ran, and not kept across the stop: it cannot be checked now.
            return ["the daemon stopped during the gate, and the commands the agent ran cannot be checked now"]
        work = await git.commit_work(worktree, f"{task_id}: {task.title}", author=AUTHOR)  # nothing new: its tip
        if work.commit != task.commit:
            return [f"the worktree changed after its work was committed ({task.commit[:12]} -> {work.commit[:12]})"]
        return await self._gate_and_merge(task_id, worktree, work)

    def _killing(self, task_id: str) -> bool:
        return self.job.kill_requested or self.job.tasks[task_id].kill_requested

    async def worktree(self, task_id: str) -> git.Worktree:
        """The task's worktree: the one it has, or a new one from the integration branch's tip (the first time,
        or when the last attempt ended in a conflict or a git error)."""
        task = self.job.tasks[task_id]
        integration = self.job.integration
        assert integration is not None
        path = self.settings.worktrees_dir / self.job_id / task_id
        if task.worktree is not None and task.base_sha is not None and not task.fresh_worktree:
            return await git.create_worktree(self.git_repo, self.job_id, task_id, task.base_sha, path)
        if task.fresh_worktree and task.worktree is not None and task.branch is not None:
            old = git.Worktree(Path(task.worktree), task.branch, task.base_sha or "")
            await git.remove_worktree(self.git_repo, old, delete_branch=True)
            await git.publish(self.git_repo, self.repo, old.branch)  # gone from the user's too: it starts again
        base = self.job.integration_tip or await git.resolve(self.git_repo, integration)
        created = await git.create_worktree(self.git_repo, self.job_id, task_id, base, path)
        # The task's branch appears in the user's repository as it always did: one of theirs in the way fails it.
        await git.publish(self.git_repo, self.repo, created.branch)
        await self.observe(
            WorktreeReady(task=task_id, path=str(created.path), branch=created.branch, base_sha=created.base_sha)
        )
        failpoints.hit("after-worktree")  # tests: a crash with a worktree made, no agent started
        return created

    async def _offer(
        self, task_id: str, worktree: git.Worktree, prompt: str, number: int, message: str
    ) -> RemoteAttempt:
        """The attempt as offered to the job's pool: its base's bundles uploaded, the offer not sent yet."""
        assert self.dispatcher is not None
        job, task = self.job, self.job.tasks[task_id]
        return await self.dispatcher.attempt(
            job=self.job_id,
            task=task_id,
            attempt=number,
            pool=job.pool,
            agent=task.agent,
            prompt=prompt,
            mirror=self.git_repo,
            root=job.base_sha or worktree.base_sha,
            base=worktree.base_sha,
            branch=worktree.branch,
            commit_message=message,
            checks=job.checks,
            check_timeout_s=self.settings.check_timeout_s,
            observe=self.observe,
        )

    async def _bring_back(self, task_id: str, worktree: git.Worktree, offered: RemoteAttempt) -> str | None:
        """The commit a worker made of the attempt, into the mirror and the task's worktree (checked on the way:
        one commit on top of the base, see numerusd.bundles); why it cannot be, or None. The gate then runs on it
        as on a local attempt's work, with the checks the worker ran."""
        assert self.dispatcher is not None
        finished = await offered.result()
        if finished.error is not None:
            return f"the worker {offered.worker} could not finish the attempt: {finished.error}"
        self.remote_checks[task_id] = finished.checks
        if finished.commit is None:
            return None  # nothing changed: the worktree is at its base already
        try:
            await self.dispatcher.receive(offered, self.git_repo, finished)
        except NumerusError as e:
            return f"the work the worker {offered.worker} sent back was refused: {e.message}"
        await git.move_worktree(worktree, finished.commit)
        return None

    async def execute(
        self,
        task_id: str,
        workdir: Path,
        prompt: str,
        attempt: int,
        *,
        resume: str | None = None,
        remote: RemoteAttempt | None = None,
    ) -> str | None:
        """Run the executor in `workdir` (going on in the agent thread `resume`; on a worker of the job's pool for
        `remote`); why the run failed, or None when it exited 0."""
        await self.approved()  # over a token budget: the agents running go on, no new one starts
        if self.job.kill_requested:
            return "killed"
        task = self.job.tasks[task_id]
        profile = self.settings.agents[task.agent]
        adapter = adapter_for(profile)
        run_dir = self.settings.runs_dir / self.job_id / task_id
        log_name = f"attempt-{attempt}.log" if resume is None else f"attempt-{attempt}-resumed-{task.resumed + 1}.log"
        process = self.agents.process(
            adapter=adapter,
            invocation=AgentInvocation(
                prompt=prompt,
                repo=workdir,
                resume_thread=resume,
                usage_baseline=task.thread_tokens if resume else (0, 0, 0),
            ),
            extra_env=dict(profile.env),
            cwd=run_dir,
            log_path=run_dir / log_name,
            subject=subjects.task_log(self.job_id, task_id),
            # Its work directory writable (in place: the repository itself), its git metadata read-only.
            sandbox=sandbox.for_agent(
                profile, adapter, workdir=workdir, writable=True, hidden=self.hidden, git_dirs=self.git_dirs(workdir)
            ),
            launcher=remote,
        )
        run = TaskRun(task_id=task_id, process=process, observe=self.observe)
        self.runs[task_id] = run
        async with self.slots.taken(local=remote is None):
            self.ahead.give_back(task_id)  # running now: the next task may be asked its claim
            self._check_stopping()
            watch = asyncio.create_task(self._watch(run.process))
            try:
                with self.agents.running(self.job_id, task_id, run), tracing.span("numerus.task", attempt=attempt):
                    outcome = await run.run()
            finally:
                watch.cancel()
        if outcome is None:
            return f"the agent did not start: {run.spawn_error}"
        if run.process.stopped_because is not None:
            return run.process.stopped_because
        if outcome.exit_code != 0:
            return f"the agent ended with {outcome.describe()}"
        return None

    async def _watch(self, process: AgentProcess) -> None:
        """Stop an agent that runs longer than `task_timeout_s` or prints nothing for `idle_timeout_s`."""
        total, idle = self.settings.task_timeout_s, self.settings.idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, idle / 4, total / 4))
            if process.terminal is None:
                continue
            now = time.monotonic()
            if now - process.started > total:
                reason = f"timed out: still running after {total:g} s"
            elif now - process.last_output > idle:
                reason = f"timed out: printed nothing for {idle:g} s"
            else:
                continue
            await process.terminate(self.settings.kill_grace_s, because=reason)
            return

    async def gate(self, task_id: str, worktree: git.Worktree, changes: Sequence[git.Change]) -> list[str]:
        """The quality gate: the diff within the claim, every check passing, the reviewer agreeing."""
        task = self.job.tasks[task_id]
        # Escapes first: a path that leaves the repository is also outside the claim, and the escape says more.
        violations = escapes(changes)
        run = self.runs.get(task_id)
        if run is not None:
            violations += reported_outside(run.files)
            if self.settings.agents[task.agent].commands == "claimed":
                violations += unclaimed_commands(run.commands, task.commands)
        escaped = len(violations)
        violations += outside_claim(changes, task.claim or ())
        named: dict[str, str] = {}
        for number, violation in enumerate(violations):
            what = "not allowed" if number < escaped else "changed outside the claim"
            named.setdefault(violation.path, f"{what}: {violation.path}: {violation.reason}")
        reasons = tuple(reason.split(": ", 1)[1] for reason in named.values())
        await self.observe(ClaimCompared(task=task_id, violations=reasons))
        if not escaped:
            # The work, for a look in the user's repository even if it fails later; an escape never goes there.
            await self.publish(worktree.branch)
        if reasons:
            return list(named.values())
        passed: list[str] = []
        # The checks run the code the executor wrote: in its sandbox.
        jail = sandbox.for_check(
            self.settings.agents[task.agent],
            workdir=worktree.path,
            hidden=self.hidden,
            git_dirs=self.git_dirs(worktree.path) or (),
        )
        # The checks a worker ran on this work (the daemon runs those it did not).
        ran_remotely = {result.command: result for result in self.remote_checks.pop(task_id, ())}
        for command in self.job.checks:
            if command in task.passed_checks:  # passed on this commit before a daemon stop
                passed.append(command)
                continue
            if (result := ran_remotely.get(command)) is not None:
                exit_code, duration = result.exit_code, result.duration_s
                output = self.book.redactor.redact_text(result.output)
            else:
                # With the daemon's environment without its secrets, as agents have it; None on a timeout.
                exit_code, output, duration = await run_check(
                    worktree.path,
                    command,
                    timeout=self.settings.check_timeout_s,
                    sandbox=jail,
                    log=CheckLog(self.settings.runs_dir / self.job_id / task_id, task.attempt, self.book.redactor),
                )
            tail = output[-CHECK_OUTPUT_CHARS:]
            await self.observe(
                CheckRan(task=task_id, command=command, exit_code=exit_code, duration_s=duration, output=tail)
            )
            failpoints.hit("after-check")  # tests: a crash in the middle of the gate
            if exit_code != 0:
                how = f"exit code {exit_code}" if exit_code is not None else "a timeout"
                return [f"the check `{command}` failed with {how}:\n{tail}"]
            passed.append(command)
        if not self.job.review or self.job.tasks[task_id].review_passed:
            return []
        listed = tuple(f"{change.kind} {change.path}" for change in changes)
        return await self.review(task_id, worktree, listed, tuple(passed))

    async def review(
        self, task_id: str, worktree: git.Worktree, changes: tuple[str, ...], checks: tuple[str, ...]
    ) -> list[str]:
        """Ask the reviewer for a verdict (twice if its first answer is not one); the reasons to fail, if any."""
        task = self.job.tasks[task_id]
        attempt = task.attempt
        problem = ""
        for call_number in (1, 2):
            prompt = prompts.reviewer(
                self.job_id, task_id, task.title, task.instructions, attempt, worktree.base_sha, changes, checks
            )
            call_dir = self.settings.runs_dir / self.job_id / task_id / f"review-{attempt}-{call_number}"
            name = f"{task_id}.review"
            result = await self.call("reviewer", task_id, name, call_dir, prompt, "review", cwd=worktree.path)
            self._check_stopping()
            verdict = result.decoded(decode_verdict, "the verdict")
            if isinstance(verdict, str):
                problem = verdict
                continue
            await self.observe(
                Reviewed(task=task_id, verdict=verdict.verdict, reasons=verdict.reasons, usage=result.usage)
            )
            if verdict.verdict == "pass":
                return []
            return [f"the reviewer failed the work: {reason}" for reason in verdict.reasons] or [
                "the reviewer failed the work without saying why"
            ]
        return [f"the reviewer gave no verdict: {problem}"]

    async def merge(self, task_id: str, worktree: git.Worktree, commit: str) -> list[str] | None:
        """Merge the task's commit into the integration branch, one task at a time; None when merged."""
        integration = self.job.integration
        assert integration is not None
        if commit == worktree.base_sha:
            # No change: nothing to merge, and the integration branch only moves forward from the base.
            tip = self.job.integration_tip or await git.resolve(self.git_repo, integration)
            await self.observe(Merged(task=task_id, sha=tip, created=False))
            await remove_merged(self.git_repo, self.repo, worktree)
            return None
        async with self.merging:
            # Numerus alone moves the branch: its tip is the last merge recorded (merge_task checks it still is).
            parent = self.job.integration_tip or await git.resolve(self.git_repo, integration)
            await self.observe(MergeBegun(task=task_id, integration=integration, parent=parent, task_sha=commit))
            task = self.job.tasks[task_id]
            message = f"Merge {task_id}: {task.title}\n\nNumerus job {self.job_id}, plan {self.job.plan_hash}"
            result = await self._merge_unblocked(task_id, integration, worktree.branch, message, parent, commit)
            if result is None:
                return ["killed"]
            if isinstance(result, git.Merged):
                await self.publish(integration)
            failpoints.hit("after-merge")  # tests: a crash between the merge and its record
            if isinstance(result, git.Conflict):
                await self.observe(MergeConflict(task=task_id, paths=result.paths, messages=result.messages))
                return [f"merging into {integration} conflicts on {', '.join(result.paths)}; start again from its tip"]
            await self.observe(Merged(task=task_id, sha=result.sha, created=result.created))
        await remove_merged(self.git_repo, self.repo, worktree)
        return None

    async def _merge_unblocked(
        self, task_id: str, integration: str, branch: str, message: str, parent: str, commit: str
    ) -> git.MergeResult | None:
        """`git.merge_task`, tried again every MERGE_RETRY_S while a worktree has the integration branch checked
        out (a user looking at the job's progress there), said once as MergeBlocked: the task's work is kept and
        its agent not run again. None when a kill arrives meanwhile. Waiting on the user is no stall of the job: a
        revised plan could not move their checkout."""
        told = False
        while True:
            try:
                # The user's copy of the branch is checked first: Numerus alone moves it, and not under a checkout.
                await git.check_published(self.repo, self.git_repo, integration, parent)
                return await git.merge_task(
                    self.git_repo, integration, branch, message, expected_integration=parent, task_sha=commit
                )
            except git.BranchCheckedOut as e:
                if not told:
                    await self.observe(MergeWaiting(task=task_id, reason=e.message, retry_s=MERGE_RETRY_S))
                    told = True
            self.progress_at = time.monotonic()
            await self._pause(MERGE_RETRY_S)
            self._check_stopping()
            if self.job.kill_requested:
                return None

    # --- agent calls --------------------------------------------------------------------------------------

    async def call(
        self,
        role: str,
        task_id: str | None,
        name: str,
        call_dir: Path,
        prompt: str,
        schema: str,
        *,
        cwd: Path | None = None,
        turn: contextlib.AbstractAsyncContextManager[None] | None = None,
    ) -> CallResult:
        """Ask the agent playing `role` one question, read-only, answered as JSON following `schema`.

        The agent runs once `turn` is entered (by default when one of the job's `slots` is free), in `cwd`, by
        default a checkout of the work the job has merged so far (its base commit before the first merge),
        taken then.
        """
        job = self.job
        profile_name = job.roles.get(role) or job.agent
        configured = self.settings.agents[profile_name]
        profile = msgspec.structs.replace(configured, agent_sandbox=configured.own_sandbox(read_only=True))
        adapter = adapter_for(profile)
        await self.approved()
        if self.job.kill_requested:  # stopped while it waited (a rejected budget): no agent for a stopped job
            return CallResult(outcome=None, answer=None, usage=Usage(), errors=["the job is being stopped"])
        async with turn or self.slots.taken():
            self._check_stopping()
            place = contextlib.nullcontext(cwd) if cwd is not None else self.checkouts.at(await self.tip())
            async with place as where:
                invocation = AgentInvocation(
                    prompt=prompt,
                    repo=where,
                    output_schema=self.settings.schemas_dir / f"{schema}.schema.json",
                    output_file=call_dir / "answer.json",
                )
                # Read-only roles: what they read is bound read-only, only their answer directory is writable.
                jail = sandbox.for_agent(
                    profile,
                    adapter,
                    workdir=where,
                    writable=False,
                    hidden=self.hidden,
                    answer_dir=call_dir,
                    schemas_dir=self.settings.schemas_dir,
                )
                process = self.agents.process(
                    adapter=adapter,
                    invocation=invocation,
                    extra_env=dict(profile.env),
                    cwd=call_dir,
                    log_path=call_dir / "stdout.log",
                    subject=subjects.task_log(self.job_id, task_id or "plan"),
                    sandbox=jail,
                )
                call = AgentCall(process, call_dir / "answer.json")
                with self.agents.running(self.job_id, name, call):
                    result = await call.run()
        if result.redacted:
            await self.observe(Redacted(task=task_id or "", counts=result.redacted))
        return result


async def remove_merged(mirror: Path, repo: Path, worktree: git.Worktree) -> None:
    """A merged task's worktree and branch go, from the job's `mirror` and from the user's `repo`: its work is on
    the integration branch (the merge's second parent), and the user's `git branch` need not list every task of
    every job. A task that failed keeps both, until `numerusctl clean`. Best effort: what is left `clean` removes
    too, and it changes nothing the job recorded."""
    with contextlib.suppress(NumerusError, OSError):
        await git.remove_worktree(mirror, worktree, delete_branch=True)
        await git.publish(mirror, repo, worktree.branch)


def _settled(job: domain.JobState, task_id: str) -> bool:
    """Whether every task `task_id` depends on has ended, and no revised plan is on its way."""
    if job.status == "replanning":
        return False
    return all(job.tasks[dep].status in domain.TASK_DONE for dep in job.tasks[task_id].deps if dep in job.tasks)


def intents_claim(intents: tuple[FileIntent, ...]) -> Claim:
    """The claim a task's plan intents stand for: a path as a file (a directory when it ends with '/'), a glob as
    the directory above its first wildcard (the whole worktree for `*.md`)."""
    paths = []
    for intent in intents:
        parts = intent.path.split("/")
        wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        if wild is not None:
            paths.append(ClaimedPath("/".join(parts[:wild]) or ".", "dir", intent.mode))
        elif intent.path.endswith("/"):
            paths.append(ClaimedPath(intent.path, "dir", intent.mode))
        else:
            paths.append(ClaimedPath(intent.path, "file", intent.mode))
    return Claim(paths=tuple(paths), commands=())
