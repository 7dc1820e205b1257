"""One task attempt run by `numerusd worker`: its worktree, its agent, its reports, its commit and its checks.

An `Attempt` is made from a `WorkOffer` the daemon let this worker take (numerusd/protocol/work.py) and runs it
the way the daemon runs a local executor, with the bus in place of the daemon's own bookkeeping:

1. its worktree, `<dir>/work/<job>/<task>`, of the job's bare cache `<dir>/repos/<job>.git`: the offer's bundles
   fetched into the cache (`numerusd.bundles.fetch_base`), then `git worktree add` of `base_sha` on the offer's
   branch;
2. its agent, the worker's own profile the offer names, spawned as the daemon spawns one (`adapter_for`, the
   adapter's command line, the inherited environment with the profile's and the adapter's, its own PTY) inside
   `sandbox.for_agent`: the worktree writable, its git metadata read-only, and the worker's directory, its
   connection file (the bus password) and its configuration hidden;
3. what it does, reported in order (`Report`, `seq` from 1): `Started`, its terminal output as `Output` (redacted
   of the worker's secrets, batched up to OUTPUT_BYTES or OUTPUT_WAIT_S), `Exited`;
4. its work committed (nothing changed: no commit), sent back as the offer's `result_object`, the offer's checks
   run on it in order in the executor's sandbox (the first failure ends them), and `Finished`.

Every attempt the daemon still knows ends with `Finished` or `HandedBack`: a profile the worker lacks, an agent that
cannot start or a worktree that cannot be made is `SpawnFailed` then `Finished` with the same reason. Three ways
to stop one (`stop`): the daemon cancels it (its heartbeat reply or a report reply says so): the agent is stopped,
`Exited` then `Finished(commit=None, error="cancelled by the daemon")`; the worker shuts down: the agent is stopped
and the attempt `HandedBack` (no `Exited`: the daemon must not count the stop as the agent's failure); the daemon
no longer knows the lease (a reply `ok = False`, or none for REPORT_PATIENCE_S): the agent is stopped and nothing
more is reported. The worktree is removed when the attempt ends; the cache stays, for the job's next tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.object_store import ObjectStore

from numerusd import bundles, git, processes, sandbox
from numerusd.agents.base import AgentInvocation
from numerusd.agents.registry import adapter_for
from numerusd.checks import run_check
from numerusd.config import Settings
from numerusd.errors import AgentError, ConfigError, NumerusError, one_line
from numerusd.git.command import git as run_git
from numerusd.git.worktrees import admin_dir, worktree_lock
from numerusd.pipeline import AUTHOR, CHECK_OUTPUT_CHARS
from numerusd.protocol import work
from numerusd.protocol.ids import is_token
from numerusd.redaction import RedactingStream, Redactor
from numerusd.terminal import Terminal, spawn

log = logging.getLogger(__name__)

#: The most terminal output one `Output` report carries, and the longest output waits to be batched.
OUTPUT_BYTES = 64 * 1024
OUTPUT_WAIT_S = 0.05
#: Chunks read from the terminal and not yet reported: the agent waits on its terminal beyond that (back-pressure
#: from a slow daemon, rather than memory without bound).
OUTPUT_QUEUE = 16
#: How long one report waits for its reply, and how long a report goes on being sent again without one before
#: the attempt is given up (the daemon is away for longer than a restart takes).
REPORT_TIMEOUT_S = 5.0
REPORT_PATIENCE_S = 30.0

#: Why an attempt is stopped before its end (`Attempt.stop`).
StopReason = Literal["cancel", "hand back", "gone"]

T = TypeVar("T")
_reply = work.decoder(work.ReportReply)


class LeaseGone(Exception):
    """The daemon refused the attempt's lease, or never answered: nothing more is reported for it."""


class _Stopped(Exception):
    """The attempt was stopped (`Attempt.stop`) during a step that is not the agent's run."""


@dataclass(frozen=True)
class WorkerPlace:
    """What every attempt of one worker shares: the bus, the worker's name, directory and settings, the paths no
    agent may see, and the redactor that knows the worker's secrets."""

    nc: Client
    name: str
    dir: Path
    settings: Settings
    hidden: tuple[Path, ...]
    redactor: Redactor
    #: The bundle bucket, opened at an attempt's first need of it.
    store: Callable[[], Awaitable[ObjectStore]]

    def cache(self, job: str) -> Path:
        """The job's bare repository on this worker, kept from one task to the next."""
        return self.dir / "repos" / f"{job}.git"

    def worktree(self, job: str, task: str) -> Path:
        """Where a task's attempt works."""
        return self.dir / "work" / job / task

    @property
    def scratch(self) -> Path:
        """Where bundles are written on their way in and out (beside the caches rather than in a small /tmp)."""
        path = self.dir / "tmp"
        path.mkdir(exist_ok=True)
        return path


def offer_problem(offer: work.WorkOffer) -> str | None:
    """Why an offer cannot be run as it is (a job or task id that is not one path component, a branch name git
    would read as an option), or None."""
    if not is_token(offer.job) or not is_token(offer.task):
        return f"job {offer.job!r} and task {offer.task!r} must be tokens (letters, digits, '_', '-')"
    if not offer.branch or offer.branch.startswith("-"):
        return f"the branch {offer.branch!r} cannot be a branch name"
    return None


class Reporter:
    """Sends one attempt's reports to the daemon, one at a time and in order, `seq` counting from 1.

    A report without a reply (the daemon restarting, the bus down) is sent again, same `seq`, with a growing pause,
    until REPORT_PATIENCE_S passed since its first try (or at once when `hurry` was called): then LeaseGone. A reply
    `ok = False` (the lease is stale) is LeaseGone too.
    """

    def __init__(self, nc: Client, worker: str, lease: str) -> None:
        self._nc = nc
        self._subject = work.worker_subject(worker, "report")
        self._lease = lease
        self._seq = 0
        self._lock = asyncio.Lock()
        self._hurried = False

    def hurry(self) -> None:
        """From now on a report gets one try: the worker is being stopped at once."""
        self._hurried = True

    async def send(self, body: work.ReportBody) -> work.ReportReply:
        """Send `body`; the daemon's reply (`cancel` may ask the agent stopped). LeaseGone as said above."""
        async with self._lock:
            self._seq += 1
            payload = work.encoder.encode(work.Report(lease=self._lease, seq=self._seq, body=body))
            loop = asyncio.get_running_loop()
            give_up = loop.time() + REPORT_PATIENCE_S
            pause = 0.1
            while True:
                try:
                    answer = await self._nc.request(self._subject, payload, timeout=REPORT_TIMEOUT_S)
                    reply = _reply.decode(answer.data)
                except (NatsError, TimeoutError, msgspec.DecodeError) as e:
                    if self._hurried or loop.time() + pause > give_up:
                        raise LeaseGone(f"the daemon did not answer report {self._seq}: {e or type(e).__name__}") from e
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                if not reply.ok:
                    raise LeaseGone(f"the daemon refused report {self._seq}: {one_line(reply.reason)}")
                return reply


class Attempt:
    """One offer being run by this worker; `run()` runs it to its end, `stop()` ends it early."""

    def __init__(self, offer: work.WorkOffer, place: WorkerPlace) -> None:
        self.offer = offer
        self.place = place
        self.reporter = Reporter(place.nc, place.name, offer.lease)
        #: Why the attempt is being stopped, once it is.
        self.stopping: StopReason | None = None
        self._stop = asyncio.Event()
        self._terminal: Terminal | None = None
        self._ending: asyncio.Task[object] | None = None
        self._worktree: git.Worktree | None = None

    @property
    def lease(self) -> str:
        """The attempt's lease, which every report names."""
        return self.offer.lease

    def stop(self, reason: StopReason, *, now: bool = False) -> None:
        """End the attempt early: its agent stopped (SIGTERM to its process group, SIGKILL after the profile's
        grace, or at once with `now`), whatever step it is in interrupted, then reported as the reason says."""
        if now:
            self.reporter.hurry()
        if self.stopping is None or reason == "gone":
            self.stopping = reason
        self._stop.set()
        terminal = self._terminal
        if terminal is not None and terminal.returncode is None and (self._ending is None or now):
            grace = 0.0 if now else self.place.settings.kill_grace_s
            self._ending = asyncio.create_task(terminal.terminate(grace), name=f"stop {self.offer.lease}")

    async def run(self) -> None:
        """Run the attempt to its end (or its stop); never raises but for cancellation."""
        offer = self.offer
        try:
            await self._run()
        except _Stopped:
            await self._report_stop()
        except LeaseGone as e:
            log.warning("attempt %s/%s #%d given up: %s", offer.job, offer.task, offer.attempt, e)
        except Exception:  # a bug must cost one attempt, never the worker
            log.exception("attempt %s/%s #%d failed", offer.job, offer.task, offer.attempt)
            with contextlib.suppress(LeaseGone):
                await self.reporter.send(work.Finished(commit=None, error="internal error of the worker, see its log"))
        finally:
            await self._clean_up()

    # --- the steps ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        offer, place = self.offer, self.place
        profile = place.settings.agents.get(offer.agent)
        if profile is None:
            await self._not_started(f"worker {place.name} has no agent profile {offer.agent}")
            return
        try:
            adapter = adapter_for(profile)
            worktree = await self._interruptible(self._make_worktree())
        except (NumerusError, OSError) as e:
            why = e.message if isinstance(e, NumerusError) else f"{e.strerror or e}"
            await self._not_started(f"cannot prepare the attempt on worker {place.name}: {one_line(why)}")
            return
        invocation = AgentInvocation(prompt=offer.prompt, repo=worktree.path)
        argv, agent_env = adapter.command(invocation)
        git_dirs = self._git_dirs(worktree)
        jail = sandbox.for_agent(
            profile, adapter, workdir=worktree.path, writable=True, hidden=place.hidden, git_dirs=git_dirs
        )
        env = {**processes.inherited_environment(), **profile.env, **agent_env}
        if self._stop.is_set():
            raise _Stopped
        try:
            terminal = self._terminal = await spawn(argv, cwd=worktree.path, env=env, sandbox=jail)
        except AgentError as e:
            await self._not_started(e.message)
            return
        if self._stop.is_set():  # stopped while it was being spawned
            self.stop(self.stopping or "cancel")
        reply = await self.reporter.send(
            work.Started(
                pid=terminal.pid, start_ticks=terminal.start_ticks, argv=tuple(argv), workdir=str(worktree.path)
            )
        )
        self._obey(reply)
        exit_code, signal = await self._pump(terminal)
        if self.stopping == "hand back":
            raise _Stopped
        self._obey(await self.reporter.send(work.Exited(exit_code=exit_code, signal=signal)))
        if self.stopping is not None:
            raise _Stopped
        if exit_code != 0:
            await self.reporter.send(work.Finished(commit=None))
            return
        try:
            commit = await self._interruptible(self._commit_and_send(worktree))
        except (NumerusError, OSError) as e:
            why = e.message if isinstance(e, NumerusError) else f"{e.strerror or e}"
            await self.reporter.send(work.Finished(commit=None, error=f"cannot send the work back: {one_line(why)}"))
            return
        checks: tuple[work.CheckResult, ...] = ()
        if commit is not None:
            checks = await self._interruptible(self._checks(worktree, git_dirs))
        await self.reporter.send(work.Finished(commit=commit, checks=checks))

    async def _not_started(self, reason: str) -> None:
        log.warning("attempt %s/%s #%d not started: %s", self.offer.job, self.offer.task, self.offer.attempt, reason)
        await self.reporter.send(work.SpawnFailed(reason=reason))
        await self.reporter.send(work.Finished(commit=None, error=reason))

    async def _report_stop(self) -> None:
        """What the daemon is told of an attempt stopped early (the agent's `Exited` was reported already)."""
        if self.stopping == "hand back":
            await self.reporter.send(work.HandedBack(reason=f"worker {self.place.name} is shutting down"))
        elif self.stopping == "cancel":
            await self.reporter.send(work.Finished(commit=None, error="cancelled by the daemon"))

    def _obey(self, reply: work.ReportReply) -> None:
        """A reply with `cancel`: the daemon wants the agent stopped (a kill)."""
        if reply.cancel:
            self.stop("cancel")

    async def _interruptible(self, step: Awaitable[T]) -> T:
        """`step`'s result, unless the attempt is stopped first: then the step is cancelled and _Stopped raised."""
        if self._stop.is_set():
            raise _Stopped
        doing = asyncio.ensure_future(step)
        stopped = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({doing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not doing.done():
            doing.cancel()
            await asyncio.gather(doing, return_exceptions=True)
            raise _Stopped
        return doing.result()

    async def _make_worktree(self) -> git.Worktree:
        """The job's cache brought up to the offer's base, and a fresh worktree of it on the offer's branch."""
        offer, place = self.offer, self.place
        cache = place.cache(offer.job)
        cache.parent.mkdir(parents=True, exist_ok=True)
        async with worktree_lock(cache):  # two attempts of one job may start together: one fetch at a time
            await bundles.fetch_base(await place.store(), cache, offer.bundles, offer.base_sha, tmp=place.scratch)
        path = Path(os.path.abspath(place.worktree(offer.job, offer.task)))
        ref = f"refs/heads/{offer.branch}"
        if (await run_git(cache, "check-ref-format", ref, ok=(0, 1))).returncode != 0:
            raise ConfigError(f"the offer's branch {offer.branch!r} is not a branch name")
        async with worktree_lock(cache):
            if os.path.lexists(path):  # left by a worker that died with the attempt
                await run_git(cache, "worktree", "remove", "--force", "--force", str(path), ok=(0, 128))
                if os.path.lexists(path):
                    shutil.rmtree(path)
            await run_git(cache, "worktree", "prune")
            path.parent.mkdir(parents=True, exist_ok=True)
            add = ("worktree", "add", "--quiet", "--force", "-B", offer.branch, str(path), offer.base_sha)
            await run_git(cache, *add)
        found = admin_dir(cache, path)
        if found is None:
            raise git.GitError(f"{path} is not a worktree of {cache}")
        self._worktree = git.Worktree(path, offer.branch, offer.base_sha, found)
        return self._worktree

    def _git_dirs(self, worktree: git.Worktree) -> tuple[Path, ...]:
        """The worktree's git metadata, read-only in the sandbox: its `.git` file and the whole cache (which
        holds its administrative directory), known from the worker's side, never read from the worktree."""
        return (worktree.path / ".git", self.place.cache(self.offer.job))

    async def _pump(self, terminal: Terminal) -> tuple[int | None, int | None]:
        """Report the agent's output until its terminal closes; how it ended."""
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(OUTPUT_QUEUE)

        async def read() -> None:
            while chunk := await terminal.read():
                await chunks.put(chunk)
            await chunks.put(None)

        reading = asyncio.create_task(read(), name=f"read {self.offer.lease}")
        try:
            await self._report_output(chunks)
        except LeaseGone:
            self.stop("gone")
            raise
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            if self._ending is not None:
                await asyncio.gather(self._ending, return_exceptions=True)
        return await terminal.wait()

    async def _report_output(self, chunks: asyncio.Queue[bytes | None]) -> None:
        """Send what the terminal printed as `Output` reports, redacted: a batch is sent when OUTPUT_BYTES are
        there or OUTPUT_WAIT_S after its first chunk. Whatever the agent prints (no newline, binary, gigabytes)
        is only bytes passed on in pieces of at most OUTPUT_BYTES."""
        loop = asyncio.get_running_loop()
        redacting = RedactingStream(self.place.redactor)
        ended = False
        while not ended:
            first = await chunks.get()
            if first is None:
                break
            batch, size = [first], len(first)
            deadline = loop.time() + OUTPUT_WAIT_S
            while size < OUTPUT_BYTES and (wait := deadline - loop.time()) > 0:
                try:
                    more = await asyncio.wait_for(chunks.get(), wait)
                except TimeoutError:
                    break
                if more is None:
                    ended = True
                    break
                batch.append(more)
                size += len(more)
            await self._send_output(redacting.feed(b"".join(batch)))
        await self._send_output(redacting.close())

    async def _send_output(self, data: bytes) -> None:
        if self.stopping is not None:
            return  # stopped: what it prints while it ends is not reported
        for at in range(0, len(data), OUTPUT_BYTES):
            self._obey(await self.reporter.send(work.Output(data=data[at : at + OUTPUT_BYTES])))

    async def _commit_and_send(self, worktree: git.Worktree) -> str | None:
        """Commit what the agent left and send it to the bucket as the offer's result; the commit, or None when
        nothing changed."""
        offer = self.offer
        done = await git.commit_work(worktree, offer.commit_message, author=AUTHOR)
        if done.commit == offer.base_sha:
            return None
        store = await self.place.store()
        cache = self.place.cache(offer.job)
        await bundles.send_result(
            store, cache, offer.result_object, done.commit, offer.base_sha, tmp=self.place.scratch
        )
        return done.commit

    async def _checks(self, worktree: git.Worktree, git_dirs: tuple[Path, ...]) -> tuple[work.CheckResult, ...]:
        """The offer's checks on the committed work, in order, in the executor's sandbox; the first that fails is
        the last run."""
        offer, place = self.offer, self.place
        jail = sandbox.for_check(
            place.settings.agents[offer.agent], workdir=worktree.path, hidden=place.hidden, git_dirs=git_dirs
        )
        results: list[work.CheckResult] = []
        for command in offer.checks:
            exit_code, output, duration = await run_check(
                worktree.path, command, timeout=offer.check_timeout_s, sandbox=jail
            )
            tail = place.redactor.redact_text(output)[-CHECK_OUTPUT_CHARS:]
            results.append(work.CheckResult(command=command, exit_code=exit_code, duration_s=duration, output=tail))
            if exit_code != 0:
                break
        return tuple(results)

    async def _clean_up(self) -> None:
        """The agent ended, the worktree and its branch removed; the cache stays."""
        if self._terminal is not None:
            self._terminal.close()
        if self._worktree is None:
            return
        cache = self.place.cache(self.offer.job)
        try:
            await git.remove_worktree(cache, self._worktree, delete_branch=True)
        except (NumerusError, OSError) as e:
            log.warning("cannot remove the worktree %s: %s", self._worktree.path, e)
