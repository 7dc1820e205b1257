"""The daemon's lifecycle: what it starts, in which order, and how it stops.

`startup()` connects to NATS (starting the embedded server when no URL is configured), makes sure the streams exist,
takes the lease of the event stream (`lease.py`: refused when another numerusd holds it, or, with `--standby`,
waited for), restores the jobs from their snapshots and replays the stream's tail into the job book
(`snapshots.py`, `replay.py`), republishes what the write-ahead log holds and the stream does not, reconciles jobs
that were under way when the previous daemon died (they become `interrupted`), then starts the projector and the
command service, and resumes the interrupted jobs (unless `resume = "manual"`); snapshots are written in the
background from then on. `serve()` then waits for a signal, which only sets a flag. `shutdown()` stops the runner
(agents and pipelines; their jobs are recorded `interrupted`), waits for every event to be acknowledged, writes a
last checkpoint, releases the lease, and closes what startup opened. A daemon whose lease passes to another stops
at once, recording nothing more, and exits non-zero.

Signals as uvicorn handles them: the first SIGINT or SIGTERM asks for a graceful stop (agents get
`kill_grace_s` to end); a second one forces it (agents are killed at once, pipelines cancelled). Either way the
jobs under way are recorded `interrupted`, to go on when a daemon starts again.

The parts it wires together, each behind its own seam: the job book (`book.py`: state, and `decide` to change
it), the runner (`runner.py`: pipelines and agents), the command service (`service.py`, handlers given a
`handlers.context.Context`), the projector (`projections.py`), dead letters (`dead_letters.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from numerusd import domain, git, sandbox, snapshots, state_lock, tracing
from numerusd.agent_input import listen_for_input
from numerusd.book import JobBook
from numerusd.breaker import CircuitBreaker
from numerusd.checkouts import CHECKOUTS_SUFFIX, Checkouts
from numerusd.config import NatsAddress, Settings, write_connection_file
from numerusd.dead_letters import DeadLetters
from numerusd.domain.observations import Interrupted, Merged, Resume
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import LeaseLost, NatsUnavailable, NumerusError
from numerusd.event_store import EventStore
from numerusd.handlers.context import Context
from numerusd.handlers.status import priced
from numerusd.history import EventHistory
from numerusd.keys import Keyring
from numerusd.lease import Lease
from numerusd.metrics import Metrics, MetricsServer, WatchedDaemon
from numerusd.pipeline import remove_merged
from numerusd.protocol.commands import JOB_DONE
from numerusd.protocol.connection import server_urls
from numerusd.protocol.subjects import EVENTS
from numerusd.redaction import Redactor, known_secrets
from numerusd.replay import replay
from numerusd.runner import Runner
from numerusd.schemas import agent_output_schemas
from numerusd.service import CommandService, start_service
from numerusd.stream_reader import last_sequence
from numerusd.streams import check_server_version, ensure_streams, stream_specs
from numerusd.supervisor import Agents
from numerusd.systemd import notify, watchdog
from numerusd.terminal import kill_leftover
from numerusd.views.fold import Rejected
from numerusd.views.projector import Projector
from numerusd.views.rebuild import rebuild
from numerusd.wal import WriteAheadLog

if TYPE_CHECKING:
    from numerusd.reload import Reloader

log = logging.getLogger(__name__)

#: Empty views and at least this many events in the stream: the views are loaded in bulk before they follow it.
BULK_VIEWS_FROM = 10_000
#: The views' first pause when the bus does not answer, doubled up to the second figure while it still does not.
PROJECTOR_RETRY_S = 0.5
PROJECTOR_RETRY_MAX_S = 5.0


class Daemon:
    """One numerusd: what it started (connections, store, book, runner, service, projector) and its stop flags."""

    def __init__(self, settings: Settings, *, standby: bool = False) -> None:
        self.settings = settings
        #: Wait for the lease of the stream rather than be refused when another numerusd holds it.
        self.standby = standby
        #: The first SIGINT / SIGTERM sets `should_exit` (a graceful stop), a second one `force_exit`.
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        #: Why planned jobs cannot run here (no git, or one too old for merges without a checkout), if so.
        self.git_problem: str | None = None
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.store: EventStore | None = None
        self.book: JobBook | None = None
        self.runner: Runner | None = None
        #: What handlers are given; its settings are replaced by a reload (numerusd.reload).
        self.context: Context | None = None
        self.keyring: Keyring | None = None
        self.embedded: EmbeddedNats | None = None
        self.projector: Projector | None = None
        self.dead_letters: DeadLetters | None = None
        self.snapshotter: snapshots.Snapshotter | None = None
        #: Its Prometheus metrics (numerusd.metrics), served on `metrics_address` when one is set.
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self.lease: Lease | None = None
        self._lease_kept: asyncio.Task[None] | None = None
        self._lease_stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._lock_file: int | None = None
        self._service: CommandService | None = None
        self._projector_task: asyncio.Task[None] | None = None
        self._wrote_connection = False

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Start, run until a signal asks to stop, then stop (gracefully, unless a second signal forces it)."""
        try:
            await self.startup()
            await self.should_exit.wait()
        except NumerusError:
            if self.lease is None or self.lease.lost is None:
                raise
            # Lost during start-up: the store refused what start-up appended; the loss is what to report.
        finally:
            await self.shutdown()
        if self.lease is not None and self.lease.lost is not None:
            raise LeaseLost(
                f"stopped: the lease of the event stream (epoch {self.lease.epoch}) passed to another numerusd"
            )

    def handle_exit(self) -> None:
        """Signal handlers only set flags: the first asks for a graceful stop, a second forces it."""
        if self.should_exit.is_set():
            self.force_exit.set()
        self.should_exit.set()

    async def startup(self) -> None:
        """Everything from an empty process to a daemon answering commands; see the module docstring."""
        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = state_lock.take(settings.state_dir)  # held for the life of the process
        self.keyring = Keyring.load_or_create(settings.keys_path)
        await self._serve_metrics()  # before NATS: a bad address is refused at once
        tracing.start(settings.otel_endpoint)
        self._write_agent_schemas()
        # Refuse now, in one line, rather than fail every agent of every job later.
        bwrapped = (name for name, profile in settings.agents.items() if profile.sandbox == "bwrap")
        await asyncio.to_thread(sandbox.check_sandboxes, bwrapped)
        try:
            await git.check_git()
        except git.GitError as e:
            self.git_problem = e.message
            log.warning("%s: planned jobs are refused, --no-plan jobs still run", e.message)
        address = await asyncio.to_thread(self._nats_endpoint)
        nc = self.nc = await self._connect(address)
        check_server_version(nc)
        js = self.js = nc.jetstream()
        await ensure_streams(js, stream_specs(dlq_max_bytes=settings.dlq_max_bytes, replicas=settings.replicas))
        self._spawn_background(watchdog(self.should_exit), name="systemd watchdog")
        self.lease = lease = await self._take_lease()
        if lease is None:
            return  # asked to stop while standing by
        self.dead_letters = DeadLetters(js, self.metrics)
        self.store = EventStore(
            nc,
            js,
            WriteAheadLog.open(settings.wal_path, metrics=self.metrics),
            self.keyring,
            max_event_bytes=settings.max_event_bytes,
            metrics=self.metrics,
            lease=lease,
        )
        redactor = Redactor(
            known_secrets(
                ((profile.env, profile.secret_env) for profile in settings.agents.values()),
                nats_passwords=(
                    address.password,
                    settings.nats_password,
                    *(login.password for login in (self.embedded.clients if self.embedded else {}).values()),
                    self.embedded.worker.password if self.embedded else None,
                ),
                signing_keys=self.keyring.keys.values(),
            )
        )
        book = self.book = JobBook(self.store, redactor)
        loaded = await snapshots.load(nc, js, self.keyring.keys)
        replayed = await replay(nc, js, address, book, self.store, self.keyring.keys, loaded)
        log.info(
            "%d jobs: %d restored from snapshots, %d events replayed after stream sequence %d",
            len(book.jobs),
            len(loaded.jobs),
            replayed,
            loaded.position,
        )
        await self._reconcile()
        self.projector = await Projector(settings.db_path, self.keyring.keys).open()
        self._projector_task = asyncio.create_task(self._project(address), name="projector")
        agents = Agents(
            nc,
            chunk_bytes=settings.log_chunk_bytes,
            flush_s=settings.log_flush_ms / 1000,
            kill_grace_s=settings.kill_grace_s,
            breaker=CircuitBreaker(),
            redactor=redactor,
            metrics=self.metrics,
        )
        runner = self.runner = Runner(book, settings, agents)
        context = self.context = Context(
            settings=settings, book=book, jobs=runner, history=EventHistory(nc), git_problem=self.git_problem
        )
        self._service = await start_service(address, context, self.dead_letters)
        await listen_for_input(nc, book, agents, self.keyring)  # `numerusctl attach`; ends with the connection's drain
        if settings.resume == "auto":
            await self._resume_interrupted()
        # Clients get the logins of their roles, never the daemon's own (an external server's are what we were given).
        roles = dict(self.embedded.clients) if self.embedded is not None else {}
        client = roles.get("operator", address)
        write_connection_file(settings.connection_path, address.url, client.user, client.password, roles)
        if self.embedded is not None:  # an external server's worker user is the operator's to provision
            worker = self.embedded.worker
            write_connection_file(settings.worker_connection_path, address.url, worker.user, worker.password)
        self._wrote_connection = True
        self.snapshotter = snapshots.Snapshotter(
            js,
            nc,
            book,
            self.store,
            self.keyring,
            known=loaded.jobs,
            position=loaded.position,
            every_events=settings.snapshot_every_events,
            every_s=settings.snapshot_every_s,
        )
        self._spawn_background(self.snapshotter.run(self.should_exit), name="snapshots")
        self._spawn_background(self._sweep_checkouts(), name="checkouts of ended jobs")
        if self.embedded is not None:
            self._spawn_background(self.embedded.supervise(self.should_exit), name="embedded nats-server")
        notify(f"READY=1\nSTATUS=serving {len(book.jobs)} jobs on {address.url}\nMAINPID={os.getpid()}")
        log.info("numerusd ready on %s, state in %s", address.url, settings.state_dir)

    async def shutdown(self) -> None:
        """Stop the runner (its jobs are recorded interrupted), flush every event to JetStream, close what
        startup opened, cancelling and awaiting what it started.

        Also runs after a failed startup, so each step checks that its part was started.
        """
        self.should_exit.set()
        notify("STOPPING=1")
        if self.runner is not None:
            await self.runner.stop(self.force_exit)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._service is not None:
            await self._service.stop()
        # A daemon whose lease passed to another records nothing more: the new holder decides for its jobs.
        writing = self.lease is not None and self.lease.may_append()
        if self.store is not None:
            if self.book is not None and writing:
                for job in list(self.book.jobs.values()):
                    await self.book.decide(job.id, self._interrupted("numerusd stopped"))
            try:
                if writing:
                    await self.store.flush(timeout=10)
            except Exception as e:  # the WAL has them: they are republished on the next start
                log.warning("not every event reached JetStream before stopping: %s", e)
            else:
                await self._last_checkpoint()
            await self.store.close()
        if self._lease_kept is not None:
            self._lease_stop.set()
            await self._lease_kept
        if self.lease is not None:
            await self.lease.release()  # every event is published: a standby may take over at once
        if self._projector_task is not None:
            self._projector_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._projector_task
        if self.projector is not None:
            await self.projector.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        if self._metrics_server is not None:
            await self._metrics_server.close()
        tracing.stop()
        if self._wrote_connection:
            with contextlib.suppress(FileNotFoundError):
                self.settings.connection_path.unlink()
            with contextlib.suppress(FileNotFoundError):  # its passwords die with the embedded server
                self.settings.worker_connection_path.unlink()
        log.info("numerusd stopped")

    async def _last_checkpoint(self) -> None:
        """Snapshot what the stop left (so the next start replays almost nothing); the events have it anyway."""
        if self.snapshotter is None:
            return
        try:
            report = await asyncio.wait_for(self.snapshotter.checkpoint(), 10)
            log.info("checkpoint at stream sequence %d: %d job snapshots written", report.position, report.written)
        except (NumerusError, TimeoutError) as e:
            log.warning("no checkpoint written before stopping (the next start replays more): %s", e)

    async def _serve_metrics(self) -> None:
        """Serve the metrics on `metrics_address`, if set (ConfigError, one line, when it cannot listen there)."""
        address = self.settings.metrics_address
        if address is None:
            return
        self.metrics.watch(WatchedDaemon(jobs=self._jobs, slots=self._slots, cost=self._cost))
        self._metrics_server = MetricsServer(self.metrics, address)
        log.info("metrics on %s", await self._metrics_server.start())

    def _jobs(self) -> list[domain.JobState]:
        return list(self.book.jobs.values()) if self.book is not None else []

    def _slots(self) -> tuple[int, int, int]:
        pool = self.runner.pool if self.runner is not None else None
        return (pool.busy, pool.size, pool.waiting()) if pool is not None else (0, self.settings.max_agents, 0)

    def _cost(self, job: domain.JobState) -> float | None:
        if not self.settings.prices:  # nothing priced: no view of every job built at every scrape for nothing
            return None
        return priced(domain.job_view(job, tasks=False), job, self.settings).cost  # as `status` shows it

    async def _take_lease(self) -> Lease | None:
        """The lease of the event stream, before anything is replayed or answered, then kept renewed (lease.py).
        LeaseHeld when another numerusd holds it; with `--standby`, waits for it (None: asked to stop meanwhile)."""
        assert self.js is not None
        if self.standby:
            notify("READY=1\nSTATUS=standing by: waiting for the lease of the event stream")
        lease = await Lease.take(
            self.js,
            state_dir=self.settings.state_dir,
            ttl_s=self.settings.lease_ttl_s,
            replicas=self.settings.replicas,
            standby=self.standby,
            stop=self.should_exit,
        )
        if lease is not None:
            self._lease_kept = asyncio.create_task(lease.keep(self._lease_lost, self._lease_stop), name="lease")
        return lease

    def _lease_lost(self, reason: str) -> None:
        """Another numerusd holds the lease now: stop at once (agents killed), appending nothing more."""
        log.error("%s: stopping now, nothing more is appended or published by this numerusd", reason)
        self.force_exit.set()
        self.should_exit.set()

    def _write_agent_schemas(self) -> None:
        """The `--output-schema` files agents answer with, fresh from the protocol types at every start."""
        directory = self.settings.schemas_dir
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in agent_output_schemas().items():
            path = directory / f"{name}.schema.json"
            if not path.exists() or path.read_text() != text:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(text)
                tmp.replace(path)

    def _nats_endpoint(self) -> NatsAddress:
        configured = self.settings.configured_nats()
        if configured is not None:
            return configured
        self.embedded = EmbeddedNats(store_dir=self.settings.nats_store_dir)
        url = self.embedded.start()
        return NatsAddress(url=url, user=self.embedded.user, password=self.embedded.password)

    async def _connect(self, address: NatsAddress) -> Client:
        async def reconnected() -> None:
            self.metrics.nats_reconnects.inc()
            log.info("reconnected to NATS; resending unacknowledged events")
            if self.store is not None:
                await self.store.on_reconnected()

        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        async def disconnected() -> None:
            self.metrics.nats_disconnects.inc()

        options: dict[str, object] = {
            "name": "numerusd",
            "reconnected_cb": reconnected,
            "disconnected_cb": disconnected,
            "error_cb": error,
            # A server that is not there at start is a configuration problem: give up after ~5 s with one line
            # (systemd restarts us). Once connected, outages are weathered for ever (see below).
            "max_reconnect_attempts": 10,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
            # A cluster's nodes in the order given: the first that answers, as the command service's connection
            # does (both on one node; nats-py would pick each at random).
            "dont_randomize": True,
        }
        try:
            # A cluster's nodes, comma separated: nats-py connects to one and moves to another when it goes down.
            nc = await nats.connect(server_urls(address.url), **options, **address.options())
        except Exception as e:
            raise NatsUnavailable(f"cannot connect to NATS at {address.url}: {e}") from e
        nc.options["max_reconnect_attempts"] = -1  # read by nats-py at each reconnect: never stop trying
        return nc

    def _interrupted(self, reason: str) -> Interrupted:
        """What a daemon stop records of a job under way, saying what happens next."""
        if self.settings.resume == "auto":
            return Interrupted(reason=reason, next="it goes on when numerusd starts")
        return Interrupted(reason=reason, next="it waits for 'numerusctl resume'")

    async def _resume_interrupted(self) -> None:
        """With `resume = "auto"`: every interrupted job goes on, oldest first, each from its last recorded step."""
        assert self.book is not None and self.runner is not None
        for job in sorted(self.book.jobs.values(), key=lambda job: job.id):
            if job.status == "interrupted":
                await self.book.decide(job.id, Resume(by="numerusd (resume = auto)"))
                self.runner.start(job.id)
                log.info("job %s resumed", job.id)

    async def _reconcile(self) -> None:
        """Jobs that were under way when the previous daemon died: stop what is left of their agents, and record
        them interrupted (their running agents' attempts cut; everything else as it was, to go on from there).

        A merge that was started and not recorded as done is looked up in git first: if it happened, it is
        recorded (never repeated); if not, the merge is made when the job resumes.
        """
        assert self.book is not None
        for job in list(self.book.jobs.values()):
            for task in job.tasks.values():
                if task.status == "merging" and task.merge_parent and task.commit and job.integration:
                    await self._repair_merge(job, task)
            for task in domain.running_tasks(job):
                if task.pid is not None and await asyncio.to_thread(kill_leftover, task.pid, task.start_ticks):
                    log.info("stopped leftover agent pid %d of %s/%s", task.pid, job.id, task.id)
            await self.book.decide(job.id, self._interrupted("numerusd stopped while the job was under way"))

    async def _sweep_checkouts(self) -> None:
        """Remove the read-only checkouts of jobs that ended while a daemon stopped before removing them (a
        running job's pipeline clears its own when it starts again)."""
        root = self.settings.worktrees_dir
        for path in sorted(root.glob(f"*{CHECKOUTS_SUFFIX}")) if root.is_dir() else ():
            assert self.book is not None
            job = self.book.jobs.get(path.name.removesuffix(CHECKOUTS_SUFFIX))
            if job is None or job.status not in JOB_DONE:
                continue
            try:
                await Checkouts(git.mirror_path(self.settings.repos_dir, job.repo), path).clear()
            except (NumerusError, OSError) as e:
                log.warning("cannot remove the checkouts of job %s in %s: %s", job.id, path, e)

    async def _repair_merge(self, job: domain.JobState, task: domain.TaskState) -> None:
        assert job.integration and task.merge_parent and task.commit
        try:
            mirror = git.mirror_path(self.settings.repos_dir, job.repo)
            state = await git.merge_state(mirror, job.integration, task.merge_parent, task.commit)
        except git.GitError as e:
            log.warning("cannot tell whether %s/%s was merged: %s", job.id, task.id, e)
            return
        if isinstance(state, git.Done):
            log.info("merge of %s/%s had happened before the restart: recording it", job.id, task.id)
            assert self.book is not None
            await self.book.decide(job.id, Merged(task=task.id, sha=state.sha, created=state.sha != task.merge_parent))
            if task.worktree and task.branch:  # as after any merge
                worktree = git.Worktree(Path(task.worktree), task.branch, task.base_sha or "")
                await remove_merged(mirror, Path(job.repo), worktree)

    async def _project(self, address: NatsAddress) -> None:
        """Keep the views following the stream. The bus going away (the embedded server restarted, an external
        one down) only pauses them: they follow again from their stored position once it answers. Anything else
        stops them, said in the log."""
        pause = PROJECTOR_RETRY_S
        while not self.should_exit.is_set():
            try:
                await self._load_views(address)
                assert self.projector is not None
                assert self.nc is not None
                await self.projector.run(self.nc, self.should_exit, on_rejected=self._rejected)
                return
            except asyncio.CancelledError:
                raise
            except (NatsUnavailable, nats.errors.Error) as e:
                log.warning("views paused: %s; following the stream again in %g s", e, pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.should_exit.wait(), pause)
                pause = min(pause * 2, PROJECTOR_RETRY_MAX_S)
            except Exception:
                log.exception("projector stopped; views are stale until restart or 'numerusd rebuild'")
                return

    async def _load_views(self, address: NatsAddress) -> None:
        """Views that start empty (new, lost, or dropped for a new schema) while the stream holds many events are
        loaded as `numerusd rebuild` does, about twice as fast as following the stream from its start.

        Meanwhile the views stay as they were (empty) and commands are answered from memory as always. Events a
        bulk load rejects are counted and logged, not dead-lettered again (the projector did when it first met
        them).
        """
        assert self.projector is not None and self.js is not None and self.keyring is not None
        if self.projector.position() > 0 or await last_sequence(self.js, EVENTS) < BULK_VIEWS_FROM:
            return
        await self.projector.close()
        self.projector = None
        try:
            report = await rebuild(address, self.keyring.keys, self.settings.db_path)
            log.info(
                "loaded the views in bulk: %d events, %d rejected, in %.1f s",
                report.messages,
                report.rejected,
                report.seconds,
            )
        except NumerusError as e:
            log.warning("cannot load the views in bulk (%s): following the stream from its start instead", e)
        finally:
            self.projector = await Projector(self.settings.db_path, self.keyring.keys).open()

    async def _rejected(self, rejected: list[Rejected]) -> None:
        assert self.dead_letters is not None
        for r in rejected:
            log.warning("rejected event at seq %d on %s: %s", r.seq, r.subject, r.message)
            await self.dead_letters.keep("projector", r.reason, r.wire, r.message, seq=r.seq, subject=r.subject)

    def _spawn_background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def install_signal_handlers(daemon: Daemon, reloader: Reloader | None = None) -> None:
    """SIGINT and SIGTERM: the first asks the daemon to stop gracefully, a second forces the stop. SIGHUP: the
    configuration is loaded again (`numerusd.reload`)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.handle_exit)
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.requested)
