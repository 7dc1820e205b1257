"""`numerusd worker`: a process on another machine that runs task attempts for a daemon, over the bus alone.

It speaks the protocol of numerusd/protocol/work.py (subjects, messages, leases) as the bus user of its connection
file, with the worker role's inbox (`_INBOX_worker`), and shares nothing else with the daemon: the repository comes
and goes as git bundles (numerusd/bundles.py), the agent profiles are the worker's own (`[agents.*]` of its
numerus.toml). Its life, as uvicorn's (`serve`: start, main loop, stop; signals only set flags):

- **Heartbeat**, every `heartbeat_s` (and at once when it starts draining): its pools, its capacity, the leases it
  holds, its host, whether it is draining. The reply's `cancel` stops those attempts (`Attempt.stop("cancel")`).
  No reply: it goes on (the daemon may be restarting).
- **Taking work**, while a slot is free and it is not draining: one message at a time from the durable consumer
  `pool_consumer(pool)` of `NUMERUS_WORK`, its pools in turn. A consumer not made yet is waited for quietly. An
  offer that does not decode (or names a job, task or branch that is no name) is acknowledged and dropped with one
  log line; else `Take` is asked: yes, the message is acknowledged and the attempt runs
  (numerusd/worker_attempt.py); no, acknowledged and dropped; no answer, given back to the stream (`nak`) with a
  delay, since the daemon is away.
- **Stopping** (SIGTERM, SIGINT): no more work taken (its heartbeat says `draining`), the attempts running have
  `drain_s` to finish, the rest are handed back (`HandedBack`); a second signal hands them back at once. It exits
  0. A bus that is down is waited for: nats-py reconnects for ever, and the first connection is tried again until
  it works or the worker is stopped.

The agents it runs are untrusted as the daemon's are: each runs in its sandbox with the worker's directory, its
connection file and its configuration hidden, and its output reaches the bus redacted of the worker's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext
from nats.js.object_store import ObjectStore

from numerusd import __version__, bundles
from numerusd.config import Settings
from numerusd.errors import ConfigError, NumerusError, one_line
from numerusd.protocol import work
from numerusd.protocol.connection import ConnectionInfo, decode_connection, inbox_prefix, server_urls
from numerusd.redaction import Redactor, known_secrets
from numerusd.worker_attempt import Attempt, WorkerPlace, offer_problem

log = logging.getLogger(__name__)

#: The bus role a worker logs in as: its replies come to this role's inbox, the only one it may read.
ROLE = "worker"
#: How long one pull waits for an offer; with several pools, how long a pool with none delays the next one's turn.
FETCH_S = 1.0
#: How long `Take` waits for the daemon's answer, and how long an offer given back then waits to be offered again.
TAKE_TIMEOUT_S = 5.0
NAK_DELAY_S = 2.0
#: The pause after a pull that failed (the pool's consumer not made yet, the bus away), before the next.
RETRY_S = 1.0

_offer = work.decoder(work.WorkOffer)
_take_reply = work.decoder(work.TakeReply)
_heartbeat_reply = work.decoder(work.HeartbeatReply)


@dataclass(frozen=True)
class WorkerOptions:
    """What `numerusd worker` is told on its command line."""

    name: str
    pools: tuple[str, ...]
    slots: int
    dir: Path
    connection_file: Path
    #: The numerus.toml its agent profiles come from (hidden from agents, as it may hold their keys).
    config_file: Path
    heartbeat_s: float = 2.0
    drain_s: float = 30.0


def read_login(path: Path) -> ConnectionInfo:
    """The worker's connection file (`numerusd/protocol/connection.py`); ConfigError in one line when it cannot be
    read or is not one."""
    try:
        return decode_connection(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the connection file: {e.strerror}", path=str(path)) from e
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not a connection file: {e}", path=str(path)) from e


class Worker:
    """One `numerusd worker` process; see the module docstring. `serve()` runs it, `request_stop()` (a signal)
    stops it: the first call drains, the second hands everything back at once."""

    def __init__(self, options: WorkerOptions, settings: Settings, login: ConnectionInfo) -> None:
        self.options = options
        self.settings = settings
        self.login = login
        self.host = socket.gethostname()
        #: The attempts running, by lease.
        self.attempts: dict[str, Attempt] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._draining = asyncio.Event()
        self._forced = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._store: ObjectStore | None = None
        self._js: JetStreamContext | None = None
        #: When each pool may be pulled from again, and the pools whose last pull failed (said once in the log).
        self._retry_at = dict.fromkeys(options.pools, 0.0)
        self._failing: set[str] = set()
        secrets = known_secrets(
            ((profile.env, profile.secret_env) for profile in settings.agents.values()),
            nats_passwords=(login.password, *(role.password for role in login.roles.values())),
        )
        self.redactor = Redactor(secrets)

    def request_stop(self) -> None:
        """A signal: drain the first time, hand back at once the second."""
        if self._draining.is_set():
            self._forced.set()
            for attempt in self.attempts.values():
                attempt.stop("hand back", now=True)
        self._draining.set()
        self._beat_now.set()

    async def serve(self) -> None:
        """Connect, heart-beat and take work until stopped, then drain and hand back what is left."""
        nc = await self._connect()
        if nc is None:
            return
        self._js = nc.jetstream()
        place = WorkerPlace(
            nc=nc,
            name=self.options.name,
            dir=self.options.dir,
            settings=self.settings,
            hidden=self._hidden(),
            redactor=self.redactor,
            store=self._bundles,
        )
        log.info(
            "worker %s on %s: pools %s, %d slots, serving %s",
            self.options.name,
            self.host,
            ", ".join(self.options.pools),
            self.options.slots,
            self.login.url,
        )
        await self._beat(nc)  # the daemon hears of the worker before its first Take
        beating = asyncio.create_task(self._heartbeats(nc), name="heartbeat")
        taking = asyncio.create_task(self._take_work(nc, place), name="take work")
        failed: BaseException | None = None
        try:
            await _wait(None, self._draining, doing=(taking, beating))
            if not self._draining.is_set():  # a bug ended one: what runs is handed back, and the worker exits 70
                failed = (taking if taking.done() else beating).exception()
                log.error("the worker stops on an internal error", exc_info=failed)
                self.request_stop()
            await self._unless_forced(taking)
            await self._drain()
        finally:
            for task in (taking, beating):
                task.cancel()
            await asyncio.gather(taking, beating, return_exceptions=True)
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._beat(nc)  # its last word: draining, no leases
            await nc.close()
        log.info("worker %s stopped", self.options.name)
        if failed is not None:
            raise NumerusError("the worker stopped on an internal error (see its log)") from failed

    # --- the bus --------------------------------------------------------------------------------------------

    async def _connect(self) -> Client | None:
        """A connection to the daemon's bus, tried again until it works; None when stopped first."""

        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        async def disconnected() -> None:
            log.warning("NATS: disconnected")

        async def reconnected() -> None:
            log.info("NATS: reconnected")

        options: dict[str, object] = {
            "name": f"numerusd worker {self.options.name}",
            "inbox_prefix": inbox_prefix(ROLE),
            "error_cb": error,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "max_reconnect_attempts": 2,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
            "dont_randomize": True,
        }
        if self.login.user:
            options["user"] = self.login.user
        if self.login.password:
            options["password"] = self.login.password
        pause = 0.5
        while not self._draining.is_set():
            try:
                nc = await nats.connect(server_urls(self.login.url), **options)
            except Exception as e:  # nats-py raises several kinds, none of them ours: try again
                log.warning("cannot connect to NATS at %s: %s; trying again in %g s", self.login.url, e, pause)
                await _wait(pause, self._draining)
                pause = min(pause * 2, 10.0)
                continue
            nc.options["max_reconnect_attempts"] = -1  # read at each reconnect: once connected, never give up
            return nc
        return None

    async def _bundles(self) -> ObjectStore:
        """The bundle bucket, opened once; BundleError when it cannot be (the daemon has not made it)."""
        if self._store is None:
            assert self._js is not None
            try:
                self._store = await self._js.object_store(work.BUNDLES_BUCKET)
            except (NatsError, TimeoutError) as e:
                raise bundles.BundleError(f"cannot open the bundle bucket {work.BUNDLES_BUCKET}: {e}") from e
        return self._store

    def _hidden(self) -> tuple[Path, ...]:
        """What no agent may see: the worker's directory (other jobs' caches and worktrees), its connection file
        (the bus password) and its configuration (profiles' keys)."""
        return tuple(
            dict.fromkeys(
                path.absolute()
                for path in (self.options.dir, self.options.connection_file, self.options.config_file)
                if path.exists()
            )
        )

    # --- heartbeats -----------------------------------------------------------------------------------------

    async def _heartbeats(self, nc: Client) -> None:
        while True:
            await _wait(self.options.heartbeat_s, self._beat_now)
            self._beat_now.clear()
            await self._beat(nc)

    async def _beat(self, nc: Client) -> None:
        """One heartbeat; the attempts its reply cancels are stopped. No reply: nothing happens."""
        beat = work.Heartbeat(
            pools=self.options.pools,
            capacity=self.options.slots,
            leases=tuple(self.attempts),
            host=self.host,
            draining=self._draining.is_set(),
            version=__version__,
        )
        timeout = min(max(self.options.heartbeat_s, 0.5), 5.0)
        try:
            answer = await nc.request(
                work.worker_subject(self.options.name, "heartbeat"), work.encoder.encode(beat), timeout=timeout
            )
            reply = _heartbeat_reply.decode(answer.data)
        except (NatsError, TimeoutError, msgspec.DecodeError) as e:
            log.debug("heartbeat not answered: %s", e or type(e).__name__)
            return
        for lease in reply.cancel:
            attempt = self.attempts.get(lease)
            if attempt is not None:
                log.info("the daemon cancels %s/%s #%d", attempt.offer.job, attempt.offer.task, attempt.offer.attempt)
                attempt.stop("cancel")

    # --- taking work ----------------------------------------------------------------------------------------

    async def _take_work(self, nc: Client, place: WorkerPlace) -> None:
        """Offers from the pools in turn, one whenever a slot is free, until the worker drains. A pool whose pull
        failed (its consumer not made yet, the bus away) is tried again RETRY_S later, the others meanwhile."""
        loop = asyncio.get_running_loop()
        pulls: dict[str, JetStreamContext.PullSubscription] = {}
        retry_at = self._retry_at
        turn = itertools.cycle(self.options.pools)
        while not self._draining.is_set():
            if len(self.attempts) >= self.options.slots:
                self._slot_freed.clear()
                await _wait(None, self._slot_freed, self._draining)
                continue
            due = min(retry_at.values()) - loop.time()
            if due > 0:
                await _wait(due, self._draining)
                continue
            pool = next(pool for pool in turn if retry_at[pool] <= loop.time())
            message = await self._pull(pool, pulls)
            if message is None:
                continue
            if self._draining.is_set():
                await _settle(message, nak=0)  # to another worker, now
                break
            if not await self._consider(nc, place, message):
                retry_at.update(dict.fromkeys(retry_at, loop.time() + RETRY_S))  # the daemon is away: a pause

    async def _pull(self, pool: str, pulls: dict[str, JetStreamContext.PullSubscription]) -> Msg | None:
        """The next offer of `pool`, or None when there was none within FETCH_S or the pull failed (then the
        pool waits RETRY_S; said once in the log until it works again)."""
        assert self._js is not None
        try:
            if pool not in pulls:
                pulls[pool] = await self._js.pull_subscribe_bind(
                    durable=work.pool_consumer(pool), stream=work.WORK_STREAM
                )
            message = (await pulls[pool].fetch(1, timeout=FETCH_S))[0]
        except nats.errors.TimeoutError:
            self._failing.discard(pool)
            return None
        except (NatsError, TimeoutError) as e:
            if pool not in self._failing:
                self._failing.add(pool)
                log.info(
                    "pool %s: cannot take from consumer %s of %s (not made by the daemon yet? %s); trying again",
                    pool,
                    work.pool_consumer(pool),
                    work.WORK_STREAM,
                    type(e).__name__,
                )
            self._retry_at[pool] = asyncio.get_running_loop().time() + RETRY_S
            return None
        self._failing.discard(pool)
        return message

    async def _consider(self, nc: Client, place: WorkerPlace, message: Msg) -> bool:
        """Take the offer `message` holds if the daemon agrees; False when the daemon did not answer."""
        try:
            offer = _offer.decode(message.data)
        except msgspec.DecodeError as e:
            log.warning("dropped an offer that does not decode: %s", one_line(str(e)))
            await _settle(message)
            return True
        problem = offer_problem(offer)
        if problem is not None:
            log.warning("dropped the offer of %s/%s: %s", one_line(offer.job), one_line(offer.task), problem)
            await _settle(message)
            return True
        take = work.Take(lease=offer.lease, job=offer.job, task=offer.task, attempt=offer.attempt, host=self.host)
        try:
            answer = await nc.request(
                work.worker_subject(self.options.name, "take"), work.encoder.encode(take), timeout=TAKE_TIMEOUT_S
            )
            reply = _take_reply.decode(answer.data)
        except (NatsError, TimeoutError, msgspec.DecodeError) as e:
            log.info("no answer to taking %s/%s (%s): offered again later", offer.job, offer.task, e or "timeout")
            await _settle(message, nak=NAK_DELAY_S)
            return False
        await _settle(message)
        if not reply.ok:
            log.info("the daemon kept %s/%s #%d: %s", offer.job, offer.task, offer.attempt, one_line(reply.reason))
            return True
        self._start(Attempt(offer, place))
        return True

    def _start(self, attempt: Attempt) -> None:
        offer = attempt.offer
        log.info("running %s/%s #%d (agent %s)", offer.job, offer.task, offer.attempt, offer.agent)
        # An older attempt of the same task here works in the same worktree: the daemon has moved on from it.
        older = [
            lease
            for lease, other in self.attempts.items()
            if (other.offer.job, other.offer.task) == (offer.job, offer.task)
        ]
        for lease in older:
            self.attempts[lease].stop("gone")
        ended = [self._tasks[lease] for lease in older]
        self.attempts[offer.lease] = attempt
        self._tasks[offer.lease] = asyncio.create_task(self._run(attempt, ended), name=f"attempt {offer.lease}")

    async def _run(self, attempt: Attempt, older: list[asyncio.Task[None]]) -> None:
        offer = attempt.offer
        try:
            await asyncio.gather(*older, return_exceptions=True)
            await attempt.run()
        finally:
            self.attempts.pop(offer.lease, None)
            self._tasks.pop(offer.lease, None)
            self._slot_freed.set()
            log.info("attempt %s/%s #%d over", offer.job, offer.task, offer.attempt)

    # --- stopping -------------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Let the attempts running finish within `drain_s` (unless forced), then hand back the rest."""
        running = set(self._tasks.values())
        if running and not self._forced.is_set():
            log.info(
                "stopping: %d attempts have %g s to finish (a second signal hands them back now)",
                len(running),
                self.options.drain_s,
            )
            await self._unless_forced(asyncio.wait(running, timeout=self.options.drain_s))
        for attempt in list(self.attempts.values()):
            attempt.stop("hand back", now=self._forced.is_set())
        if self._tasks:
            log.info("handing back %d attempts", len(self._tasks))
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _unless_forced(self, step: Awaitable[object]) -> None:
        """Wait for `step` unless a second signal comes first (then it is cancelled)."""
        doing = asyncio.ensure_future(step)
        await _wait(None, self._forced, doing=(doing,))
        if not doing.done():
            doing.cancel()
            await asyncio.gather(doing, return_exceptions=True)


async def _wait(timeout: float | None, *events: asyncio.Event, doing: Iterable[asyncio.Future[Any]] = ()) -> None:
    """Until one of `events` is set, one of `doing` is done, or `timeout` seconds passed (None: no limit)."""
    waits = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait({*waits, *doing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


async def _settle(message: Msg, nak: float | None = None) -> None:
    """Acknowledge an offer's message (dropped or taken), or with `nak` give it back to be offered again after
    that many seconds; a bus gone meanwhile only means the stream offers it again."""
    with contextlib.suppress(NatsError):
        if nak is None:
            await message.ack()
        else:
            await message.nak(delay=nak or None)


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT ask the worker to stop (the second time: at once)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
