"""The daemon's lifecycle: what it starts, in which order, and how it stops.

`startup()` connects to NATS (starting the embedded server when no URL is configured), makes sure the streams exist,
replays the stream into the job book, republishes what the write-ahead log holds and the stream does not, reconciles
jobs that were under way when the previous daemon died (they become `interrupted`), then starts the projector and
the command service, and resumes the interrupted jobs (unless `resume = "manual"`). `serve()` then waits for a
signal, which only sets a flag. `shutdown()` stops the runner (agents and pipelines; their jobs are recorded
`interrupted`), waits for every event to be acknowledged, and closes what startup opened.

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

from numerusd import domain, git, sandbox, state_lock
from numerusd.agent_input import listen_for_input
from numerusd.book import JobBook
from numerusd.breaker import CircuitBreaker
from numerusd.checkouts import CHECKOUTS_SUFFIX, Checkouts
from numerusd.config import NatsAddress, Settings, write_connection_file
from numerusd.dead_letters import DeadLetters
from numerusd.domain.observations import Interrupted, Merged, Resume
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import NatsUnavailable, NumerusError
from numerusd.event_store import EventStore
from numerusd.handlers.context import Context
from numerusd.history import EventHistory
from numerusd.keys import Keyring
from numerusd.pipeline import remove_merged
from numerusd.protocol.commands import JOB_DONE
from numerusd.protocol.envelope import InvalidEvent, open_untyped
from numerusd.protocol.subjects import EVENTS
from numerusd.redaction import Redactor, known_secrets
from numerusd.runner import Runner
from numerusd.schemas import agent_output_schemas
from numerusd.service import CommandService, start_service
from numerusd.stream_pump import head_started_stream
from numerusd.stream_reader import last_sequence, read_stream
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
#: At least this many events in the stream: the startup replay reads it in a child process.
PUMPED_REPLAY_FROM = 10_000
#: The views' first pause when the bus does not answer, doubled up to the second figure while it still does not.
PROJECTOR_RETRY_S = 0.5
PROJECTOR_RETRY_MAX_S = 5.0


class Daemon:
    """One numerusd: what it started (connections, store, book, runner, service, projector) and its stop flags."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        finally:
            await self.shutdown()

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
        await ensure_streams(js, stream_specs(dlq_max_bytes=settings.dlq_max_bytes))
        self.dead_letters = DeadLetters(js)
        self.store = EventStore(
            nc, js, WriteAheadLog.open(settings.wal_path), self.keyring, max_event_bytes=settings.max_event_bytes
        )
        redactor = Redactor(
            known_secrets(
                ((profile.env, profile.secret_env) for profile in settings.agents.values()),
                nats_passwords=(
                    address.password,
                    settings.nats_password,
                    *(login.password for login in (self.embedded.clients if self.embedded else {}).values()),
                ),
                signing_keys=self.keyring.keys.values(),
            )
        )
        book = self.book = JobBook(self.store, redactor)
        replayed = await self._replay(address)
        log.info("replayed %d events into %d jobs", replayed, len(book.jobs))
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
        )
        runner = self.runner = Runner(book, settings, agents)
        context = self.context = Context(
            settings=settings, book=book, jobs=runner, history=EventHistory(nc), git_problem=self.git_problem
        )
        self._service = await start_service(address, context, self.dead_letters)
        await listen_for_input(nc, book, agents)  # `numerusctl attach`; ends with the connection's drain
        if settings.resume == "auto":
            await self._resume_interrupted()
        # Clients get the logins of their roles, never the daemon's own (an external server's are what we were given).
        roles = dict(self.embedded.clients) if self.embedded is not None else {}
        client = roles.get("operator", address)
        write_connection_file(settings.connection_path, address.url, client.user, client.password, roles)
        self._wrote_connection = True
        self._spawn_background(self._sweep_checkouts(), name="checkouts of ended jobs")
        self._spawn_background(watchdog(self.should_exit), name="systemd watchdog")
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
        if self.store is not None:
            if self.book is not None:
                for job in list(self.book.jobs.values()):
                    await self.book.decide(job.id, self._interrupted("numerusd stopped"))
            try:
                await self.store.flush(timeout=10)
            except Exception as e:  # the WAL has them: they are republished on the next start
                log.warning("not every event reached JetStream before stopping: %s", e)
            await self.store.close()
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
        if self._wrote_connection:
            with contextlib.suppress(FileNotFoundError):
                self.settings.connection_path.unlink()
        log.info("numerusd stopped")

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
            log.info("reconnected to NATS; resending unacknowledged events")
            if self.store is not None:
                await self.store.on_reconnected()

        async def error(e: Exception) -> None:
            log.warning("NATS: %s", e)

        options: dict[str, object] = {
            "name": "numerusd",
            "reconnected_cb": reconnected,
            "error_cb": error,
            # A server that is not there at start is a configuration problem: give up after ~5 s with one line
            # (systemd restarts us). Once connected, outages are weathered for ever (see below).
            "max_reconnect_attempts": 10,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
        }
        try:
            nc = await nats.connect(address.url, **options, **address.options())
        except Exception as e:
            raise NatsUnavailable(f"cannot connect to NATS at {address.url}: {e}") from e
        nc.options["max_reconnect_attempts"] = -1  # read by nats-py at each reconnect: never stop trying
        return nc

    async def _replay(self, address: NatsAddress) -> int:
        """Fold the whole stream into memory, then what the WAL holds that the stream does not.

        Each event is checked as the auditor and the projector check it: its signature, its subject, its id not
        seen before, and that it extends its job's chain; one that does not is skipped, so `status` after a
        restart equals a rebuild whatever was republished onto the stream. A long stream is read by a child
        process (`stream_pump`), as a rebuild reads it: this process only verifies and folds, on the other core.
        """
        assert self.nc is not None and self.js is not None and self.store is not None and self.book is not None
        assert self.keyring is not None
        count = 0
        keys = self.keyring.keys
        if (last := await last_sequence(self.js, EVENTS)) >= PUMPED_REPLAY_FROM:
            log.debug("replaying %d events read by a child process", last)
            batches = head_started_stream(address, EVENTS)
        else:
            batches = read_stream(self.nc, EVENTS)
        skipped = 0
        seen: set[str] = set()  # ids folded so far: held for the replay only
        async for batch in batches:
            for message in batch:
                try:
                    event = open_untyped(message.data, keys)
                    # Not signed, so checked here: the subject, and the chain (a republished copy of a genuine
                    # event, or one out of its place, does not extend its job's chain and is not folded twice).
                    if event.subject != message.subject:
                        raise InvalidEvent("wrong_subject", f"event {event.id} belongs on {event.subject}")
                    if event.id in seen:
                        raise InvalidEvent("duplicate", f"event {event.id} was folded before")
                    if event.prev != self.store.chain_head(event.job):
                        raise InvalidEvent("broken_chain", f"event {event.id} does not follow its job's last event")
                    self.book.fold(event)
                except (InvalidEvent, ValueError) as e:
                    skipped += 1
                    log.warning("skipping event at seq %d on %s: %s", message.seq, message.subject, e)
                    continue
                seen.add(event.id)
                self.store.observe(message.seq, message.data)
                count += 1
        if skipped:
            log.warning("replay: %d stream messages skipped (the projector dead-letters them)", skipped)
        for sealed in await self.store.recover():
            self.book.fold(sealed.envelope)
            count += 1
        return count

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
