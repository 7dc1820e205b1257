"""The daemon's side of remote workers: attempts offered to a pool, the workers' requests answered, leases kept.

A job with a pool (`run --pool`, `default_pool`) has its executors run by `numerusd worker` processes
(numerusd/worker.py; the wire protocol in numerusd/protocol/work.py). The pipeline makes the task's worktree and
its agent as for a local attempt; only the agent's terminal is remote: `RemoteAttempt.start` records the offer
(`TaskOffered`), publishes it on `numerus.work.<pool>` and waits for a worker to take it (`TaskTaken`, decided
before the worker is told to go) and start the agent. From then on the worker's reports feed a `RemoteTerminal`,
which the daemon's `AgentProcess.pump` reads as it reads a PTY: the same redaction, log file, `numerus.log`
chunks, parser and events. After the agent's exit the worker sends its commit as a bundle and the checks it ran;
the pipeline takes the commit into its mirror and worktree (`numerusd.bundles`) and its gate goes on as for a
local task.

The daemon stays the only writer: a request is decided before it is answered, and a request whose lease no attempt
holds (it was lost, killed, or the daemon restarted since) is refused and kept on `numerus.dlq.worker.<reason>`.

Leases: an attempt a worker took is kept alive by the worker's heartbeats listing its lease (and by its reports);
one not heard of for `worker_lease_s` is lost: its waiters get `WorkLost`, the pipeline records `TaskLost`, and
the task runs again as a new attempt. A worker whose heartbeat lists a lease the daemon does not know (or one
being killed) is told to stop it in the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.client import JetStreamContext

from numerusd import bundles
from numerusd.dead_letters import DeadLetters
from numerusd.domain.observations import Observation, Offered, Taken
from numerusd.errors import AgentError, InvalidTransition
from numerusd.protocol import work
from numerusd.protocol.commands import WorkersReply, WorkerView
from numerusd.protocol.ids import is_token

log = logging.getLogger(__name__)

#: How long a worker has to ack an offer it fetched (it asks the daemon first): past it, another worker may take it.
OFFER_ACK_WAIT_S = 30.0
#: Seconds between two looks for leases gone quiet.
WATCH_S = 0.5
#: Output reports of one attempt held before its pump reads them: past it, the worker's next report waits for
#: its answer, so an agent printing faster than the daemon logs it is slowed, not buffered without end.
OUTPUT_BACKLOG = 64
#: Pools one worker may name: each is a consumer the daemon makes.
MAX_POOLS = 32


class WorkLost(Exception):
    """The attempt's worker went away, or handed the attempt back: `reason` says which."""

    def __init__(self, lease: str, worker: str, reason: str) -> None:
        super().__init__(reason)
        self.lease = lease
        self.worker = worker
        self.reason = reason


@dataclass
class WorkerSeen:
    """A worker as its last heartbeat described it."""

    name: str
    pools: tuple[str, ...]
    capacity: int
    host: str
    leases: tuple[str, ...]
    draining: bool
    version: str
    #: `time.monotonic()` and wall time of its last heartbeat.
    heard: float
    heard_at: datetime


class RemoteTerminal:
    """A remote agent's terminal, as `AgentProcess.pump` reads a local one: its output and exit come from the
    worker's reports. Nothing can be typed into it (`numerusctl attach` watches only)."""

    def __init__(self, attempt: RemoteAttempt) -> None:
        self.attempt = attempt
        self.pid = 0
        self.start_ticks = 0
        #: Where the agent works on the worker (its reported files are relative to it).
        self.workdir = ""

    async def read(self) -> bytes:
        """The next output, b"" once the agent has exited (or the attempt was lost)."""
        attempt = self.attempt
        if attempt.closed and attempt.output.empty():
            return b""
        return await attempt.output.get()

    async def wait(self) -> tuple[int | None, int | None]:
        """The agent's exit code and signal; WorkLost when its worker went away first."""
        return await self.attempt.exited

    async def write(self, data: bytes, timeout: float) -> int:
        """Nothing is written to an agent on a worker: 0 bytes."""
        return 0

    async def terminate(self, grace: float = 5.0) -> tuple[int | None, int | None] | None:
        """Ask the worker to stop the agent (answered in its next heartbeat or report)."""
        self.attempt.cancel()
        return None

    def close(self) -> None:
        """Nothing to close: the PTY is the worker's."""


@dataclass(eq=False)
class RemoteAttempt:
    """One attempt offered to a pool: what the daemon waits for from the worker that takes it."""

    offer: work.WorkOffer
    dispatcher: Dispatcher
    #: The pipeline's `observe`: the attempt's offer and its taking are decided as every observation is.
    observe: Callable[[Observation], Awaitable[object]]
    worker: str | None = None
    host: str = ""
    #: `time.monotonic()` when the worker was last heard of for this attempt (a heartbeat listing it, a report).
    heard: float = 0.0
    seq: int = 0
    cancelled: bool = False
    lost: WorkLost | None = None
    started: asyncio.Future[work.Started] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    exited: asyncio.Future[tuple[int | None, int | None]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    finished: asyncio.Future[work.Finished] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    output: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(OUTPUT_BACKLOG))
    #: No more output comes (the agent exited, or the attempt was lost).
    closed: bool = False
    #: Serialises the worker's requests for this attempt (each is decided before the next).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.terminal = RemoteTerminal(self)
        for future in (self.started, self.exited, self.finished):
            future.add_done_callback(_consume)  # a lost attempt's futures may never be awaited

    @property
    def lease(self) -> str:
        return self.offer.lease

    async def start(self) -> RemoteTerminal:
        """Offer the attempt and wait until a worker has started its agent; AgentError when none could (it could
        not start there, or the attempt was cancelled first), WorkLost when its worker went away first."""
        offer = self.offer
        await self.observe(Offered(task=offer.task, pool=offer.pool, lease=offer.lease))
        self.dispatcher.attempts[offer.lease] = self
        await self.dispatcher.publish(offer)
        started = await self.started
        self.terminal.pid, self.terminal.start_ticks = started.pid, started.start_ticks
        self.terminal.workdir = started.workdir
        return self.terminal

    async def result(self) -> work.Finished:
        """What the worker made of the attempt after its agent exited: its commit and checks."""
        try:
            return await self.finished
        finally:
            self.dispatcher.forget(self)

    def cancel(self) -> None:
        """Stop the attempt: refuse it to a worker not yet running it, tell the one running it to stop."""
        self.cancelled = True
        if self.worker is None and not self.started.done():
            self.started.set_exception(AgentError("stopped before a worker took it"))
            self.dispatcher.forget(self)

    def lose(self, reason: str) -> None:
        """The worker went away: every waiter gets WorkLost, and the lease is refused from now on."""
        self.lost = WorkLost(self.lease, self.worker or "", reason)
        for future in (self.started, self.exited, self.finished):
            if not future.done():
                future.set_exception(self.lost)
        self._close()
        self.dispatcher.forget(self)

    def _close(self) -> None:
        """No more output: a reader waiting on an empty queue gets b"" now, one draining a full one after it."""
        self.closed = True
        if not self.output.full():
            self.output.put_nowait(b"")

    async def report(self, body: work.ReportBody) -> None:
        """Take one report of the worker's (in order); output waits while OUTPUT_BACKLOG reports are unread."""
        match body:
            case work.Started():
                _settle(self.started, body)
            case work.SpawnFailed(reason=reason):
                _fail(self.started, AgentError(f"on worker {self.worker}: {reason}"))
            case work.Output(data=data):
                if data and not self.closed:
                    await self.output.put(data)
            case work.Exited(exit_code=exit_code, signal=signal):
                self._close()
                _settle(self.exited, (exit_code, signal))
            case work.Finished():
                if not self.exited.done():  # finished without starting (it could not make the worktree)
                    _fail(self.started, AgentError(f"on worker {self.worker}: {body.error or 'no agent ran'}"))
                    self._close()
                    _settle(self.exited, (None, None))
                _settle(self.finished, body)
            case work.HandedBack(reason=reason):
                self.lose(f"worker {self.worker} handed it back: {reason}")


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Refused(Exception):
    """A worker's request refused: `reason` is a dead letter's reason token, `message` what the worker is told."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Dispatcher:
    """Offers attempts to pools and answers every worker's requests; see the module docstring."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        lease_s: Callable[[], float],
        dead_letters: DeadLetters | None = None,
        replicas: int = 1,
        max_request_bytes: int = 1024 * 1024,
    ) -> None:
        self.nc = nc
        self.js = js
        #: The lease's length now (a setting a SIGHUP may change).
        self.lease_s = lease_s
        self.dead_letters = dead_letters
        self.replicas = replicas
        self.max_request_bytes = max_request_bytes
        #: The attempts offered or running, by lease: a request under any other lease is refused.
        self.attempts: dict[str, RemoteAttempt] = {}
        self.workers: dict[str, WorkerSeen] = {}
        self.store: Any = None
        self._pools: set[str] = set()
        self._subscription: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """The bundle store made, the workers' requests listened to, the leases watched."""
        self.store = await bundles.ensure_bucket(self.js, replicas=self.replicas)
        self._subscription = await self.nc.subscribe(work.WORKER_REQUESTS, cb=self._on_request)
        self._watch = asyncio.create_task(self._watch_leases(), name="worker leases")

    async def stop(self) -> None:
        """No more requests answered; the attempts still waiting are lost (the daemon records them interrupted)."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for task in list(self._handling):
            task.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        for attempt in list(self.attempts.values()):
            attempt.lose("numerusd is stopping")

    # --- offers ----------------------------------------------------------------------------------------------

    async def attempt(
        self,
        *,
        job: str,
        task: str,
        attempt: int,
        pool: str,
        agent: str,
        prompt: str,
        mirror: Path,
        root: str,
        base: str,
        branch: str,
        commit_message: str,
        checks: tuple[str, ...],
        check_timeout_s: float,
        observe: Callable[[Observation], Awaitable[object]],
    ) -> RemoteAttempt:
        """An attempt to offer to `pool` (the bundles that bring `base` uploaded first); `start()` offers it."""
        lease = secrets.token_hex(16)
        names = await bundles.offer_base(self.store, mirror, job, root, base)
        offer = work.WorkOffer(
            job=job,
            task=task,
            attempt=attempt,
            lease=lease,
            pool=pool,
            agent=agent,
            prompt=prompt,
            base_sha=base,
            bundles=names,
            branch=branch,
            commit_message=commit_message,
            result_object=f"result/{job}/{task}/{attempt}-{lease}.bundle",
            checks=checks,
            check_timeout_s=check_timeout_s,
        )
        return RemoteAttempt(offer=offer, dispatcher=self, observe=observe)

    async def publish(self, offer: work.WorkOffer) -> None:
        """Put `offer` on its pool's queue (its pool's consumer made first, so a worker can pull it)."""
        await self.ensure_pool(offer.pool)
        headers = {"Nats-Msg-Id": offer.lease}
        await self.js.publish(work.work_subject(offer.pool), work.encoder.encode(offer), headers=headers)

    async def ensure_pool(self, pool: str) -> None:
        """The durable consumer the workers of `pool` pull their offers from, made once."""
        if pool in self._pools:
            return
        config = ConsumerConfig(
            durable_name=work.pool_consumer(pool),
            filter_subject=work.work_subject(pool),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=OFFER_ACK_WAIT_S,
            max_ack_pending=-1,
        )
        await self.js.add_consumer(work.WORK_STREAM, config)
        self._pools.add(pool)

    async def receive(self, attempt: RemoteAttempt, mirror: Path, finished: work.Finished) -> None:
        """Bring the attempt's commit from the bundle store into `mirror` (checked: one ref, on top of its base)."""
        assert finished.commit is not None
        offer = attempt.offer
        await bundles.receive_result(self.store, mirror, offer.result_object, offer.base_sha, finished.commit)

    async def remove_job(self, job: str) -> None:
        """The bundles of an ended job, out of the store (best effort: a failure is logged)."""
        try:
            await bundles.remove_job(self.store, job)
        except Exception as e:  # the objects only take room: never the job's end
            log.warning("job %s: cannot remove its bundles: %s", job, e)

    def forget(self, attempt: RemoteAttempt) -> None:
        """The attempt is over: its lease is refused from now on."""
        if self.attempts.get(attempt.lease) is attempt:
            del self.attempts[attempt.lease]

    def view(self) -> WorkersReply:
        """Every worker heard from since the daemon started, what it runs, and the attempts waiting per pool."""
        now, limit = time.monotonic(), self.lease_s()
        running: dict[str, list[str]] = {}
        waiting: dict[str, int] = {}
        for attempt in self.attempts.values():
            offer = attempt.offer
            if attempt.worker is None:
                waiting[offer.pool] = waiting.get(offer.pool, 0) + 1
            else:
                running.setdefault(attempt.worker, []).append(f"{offer.job}/{offer.task}#{offer.attempt}")
        workers = [
            WorkerView(
                name=seen.name,
                host=seen.host,
                pools=list(seen.pools),
                capacity=seen.capacity,
                running=sorted(running.get(seen.name, ())),
                heard_s=round(now - seen.heard, 1),
                heard_at=seen.heard_at,
                draining=seen.draining,
                lost=now - seen.heard > limit,
                version=seen.version,
            )
            for seen in sorted(self.workers.values(), key=lambda seen: seen.name)
        ]
        return WorkersReply(workers=workers, waiting=waiting)

    # --- the workers' requests -------------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        handling = asyncio.create_task(self._answer(msg))
        self._handling.add(handling)
        handling.add_done_callback(self._handling.discard)

    async def _answer(self, msg: Msg) -> None:
        target = work.worker_request(msg.subject)
        if target is None or not msg.reply:
            return
        worker, kind = target
        try:
            if not is_token(worker):
                raise Refused("bad_request", f"{worker!r} is not a worker name")
            if len(msg.data) > self.max_request_bytes:
                raise Refused("too_large", f"the request is {len(msg.data)} bytes, over {self.max_request_bytes}")
            reply: msgspec.Struct
            match kind:
                case "take":
                    reply = await self._take(worker, _decode(msg.data, work.Take))
                case "report":
                    reply = await self._report(worker, _decode(msg.data, work.Report))
                case "heartbeat":
                    reply = self._heartbeat(worker, _decode(msg.data, work.Heartbeat))
                    await self._pools_of(reply, worker)
                case _:
                    raise Refused("bad_request", f"no request {kind!r}: take, report or heartbeat")
        except Refused as e:
            log.info("worker %s: %s refused: %s", worker, kind, e.message)
            if self.dead_letters is not None:
                await self.dead_letters.keep("worker", e.reason, msg.data, e.message, worker=worker, kind=kind)
            # A refused heartbeat is answered as a report is: the worker reads no `cancel` in it.
            reply = (
                work.TakeReply(ok=False, reason=e.message)
                if kind == "take"
                else work.ReportReply(ok=False, reason=e.message)
            )
        with contextlib.suppress(Exception):  # the worker may be gone: it asks again or is lost
            await self.nc.publish(msg.reply, work.encoder.encode(reply))

    async def _take(self, worker: str, take: work.Take) -> work.TakeReply:
        attempt = self._held(take.lease, worker=None)
        if attempt.worker is not None:
            raise Refused("taken", f"the attempt was taken by worker {attempt.worker}")
        if attempt.cancelled:
            raise Refused("stale_lease", "the attempt was stopped before a worker took it")
        offer = attempt.offer
        if (take.job, take.task, take.attempt) != (offer.job, offer.task, offer.attempt):
            raise Refused("bad_request", f"lease {take.lease} is not for {take.job}/{take.task} #{take.attempt}")
        attempt.worker, attempt.host, attempt.heard = worker, take.host, time.monotonic()
        try:
            await attempt.observe(Taken(task=offer.task, lease=offer.lease, worker=worker, host=take.host))
        except InvalidTransition as e:
            attempt.worker = None
            raise Refused("stale_lease", e.message) from None
        return work.TakeReply(ok=True)

    async def _report(self, worker: str, report: work.Report) -> work.ReportReply:
        attempt = self._held(report.lease, worker=worker)
        async with attempt.lock:
            if report.seq <= attempt.seq:
                return work.ReportReply(ok=True, cancel=attempt.cancelled)  # sent again: taken already
            if report.seq != attempt.seq + 1:
                raise Refused("out_of_order", f"report {report.seq} after {attempt.seq}: send them in order")
            attempt.seq = report.seq
            attempt.heard = time.monotonic()
            await attempt.report(report.body)
        return work.ReportReply(ok=True, cancel=attempt.cancelled)

    def _heartbeat(self, worker: str, beat: work.Heartbeat) -> work.HeartbeatReply:
        now = time.monotonic()
        self.workers[worker] = WorkerSeen(
            name=worker,
            pools=beat.pools,
            capacity=beat.capacity,
            host=beat.host,
            leases=beat.leases,
            draining=beat.draining,
            version=beat.version,
            heard=now,
            heard_at=datetime.now(UTC),
        )
        cancel = []
        for lease in beat.leases:
            attempt = self.attempts.get(lease)
            if attempt is None or attempt.worker != worker or attempt.cancelled:
                cancel.append(lease)
            else:
                attempt.heard = now
        return work.HeartbeatReply(cancel=tuple(cancel))

    async def _pools_of(self, reply: work.HeartbeatReply, worker: str) -> None:
        """The consumers of the pools a worker serves, made when it first says them (it pulls from them)."""
        for pool in self.workers[worker].pools[:MAX_POOLS]:
            if is_token(pool):
                await self.ensure_pool(pool)

    def _held(self, lease: str, *, worker: str | None) -> RemoteAttempt:
        attempt = self.attempts.get(lease)
        if attempt is None:
            raise Refused("stale_lease", f"no attempt holds lease {lease[:64]} now (lost, stopped or ended)")
        if worker is not None and attempt.worker != worker:
            raise Refused("stale_lease", f"lease {lease[:64]} was given to another worker")
        return attempt

    async def _watch_leases(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            limit = self.lease_s()
            now = time.monotonic()
            for attempt in list(self.attempts.values()):
                if attempt.worker is not None and now - attempt.heard > limit:
                    log.warning(
                        "worker %s: not heard of for %g s: attempt %s of %s/%s lost",
                        attempt.worker,
                        limit,
                        attempt.offer.attempt,
                        attempt.offer.job,
                        attempt.offer.task,
                    )
                    attempt.lose(f"worker {attempt.worker} stopped heart-beating: not heard of for {limit:g} s")


def _decode(data: bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as e:
        raise Refused("bad_request", f"not a {kind.__name__}: {e}") from None
