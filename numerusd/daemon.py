"""The daemon's lifecycle and its one piece of mutable state: the fold of the event stream.

`startup()` connects to NATS (starting the embedded server when no URL is configured), makes sure the streams
exist, replays the stream into memory, republishes what the write-ahead log holds and the stream does not,
reconciles tasks that were running when the previous daemon died (they become `interrupted`), then starts the
projector and the command service. `main_loop()` waits for a signal, which only sets a flag. `shutdown()` stops
the agents (their tasks are recorded `interrupted`), waits for every event to be acknowledged, and closes.

All state changes go through `record()`: decide against the current state, append durably, then evolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from numerusd import domain, git, state_lock
from numerusd.agents.base import adapter_for
from numerusd.breaker import CircuitBreaker
from numerusd.checkouts import CHECKOUTS_SUFFIX, Checkouts
from numerusd.config import NatsAddress, Settings, write_connection_file
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import NatsUnavailable, NotFound, NumerusError, StoreError
from numerusd.event_store import EventStore
from numerusd.keys import Keyring
from numerusd.pipeline import JobPipeline, remove_merged
from numerusd.projections import Projector, Rejected, rebuild
from numerusd.protocol.commands import JOB_DONE, EventsReply
from numerusd.protocol.envelope import InvalidEvent, Sealed, open_untyped
from numerusd.protocol.ids import new_ulid
from numerusd.schemas import agent_output_schemas
from numerusd.service import start_service
from numerusd.stream_pump import head_started_stream
from numerusd.stream_reader import StreamReader, last_sequence, read_stream
from numerusd.streams import EVENTS, check_server_version, ensure_streams
from numerusd.supervisor import AgentCall, TaskRun
from numerusd.systemd import notify, watchdog
from numerusd.terminal import kill_leftover
from numerusd.wal import WriteAheadLog

log = logging.getLogger(__name__)

#: Empty views and at least this many events in the stream: the views are loaded in bulk before they follow it.
BULK_VIEWS_FROM = 10_000
#: At least this many events in the stream: the startup replay reads it in a child process.
PUMPED_REPLAY_FROM = 10_000


class Daemon:
    """One numerusd: its connections, its event store, the fold of its stream and its running agents."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs: dict[str, domain.JobState] = {}
        #: Agents running now, by (job, task) for task attempts and (job, "<task>.claim"…) for agent calls.
        self.runs: dict[tuple[str, str], TaskRun | AgentCall] = {}
        self.pipelines: dict[str, JobPipeline] = {}
        self.breaker = CircuitBreaker()
        #: Why planned jobs cannot run here (no git, or one too old for merges without a checkout), if so.
        self.git_problem: str | None = None
        self.should_exit = asyncio.Event()
        self.nc: Client = None  # type: ignore[assignment]  # set by startup()
        self.js: JetStreamContext = None  # type: ignore[assignment]
        self.store: EventStore | None = None
        self.keyring: Keyring = None  # type: ignore[assignment]
        self.embedded: EmbeddedNats | None = None
        self.projector: Projector | None = None
        #: Each job's state with its events still on their way to disk, while there are any (see `record`).
        self._ahead: dict[str, domain.JobState] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._lock_file: int | None = None
        self._service = None
        self._projector_task: asyncio.Task[None] | None = None
        self._wrote_connection = False

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Start, run until a signal asks to stop, then stop gracefully."""
        try:
            await self.startup()
            await self.should_exit.wait()
        finally:
            await self.shutdown()

    def handle_exit(self) -> None:
        """Signal handlers only set this flag; the main loop does the work."""
        self.should_exit.set()

    async def startup(self) -> None:
        """Everything from an empty process to a daemon answering commands; see the module docstring."""
        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = state_lock.take(settings.state_dir)  # held for the life of the process
        self.keyring = Keyring.load_or_create(settings.keys_path)
        self._write_agent_schemas()
        try:
            await git.check_git()
        except git.GitError as e:
            self.git_problem = e.message
            log.warning("%s: planned jobs are refused, --no-plan jobs still run", e.message)
        address = await asyncio.to_thread(self._nats_endpoint)
        self.nc = await self._connect(address)
        check_server_version(self.nc)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js)
        self.store = EventStore(self.nc, self.js, WriteAheadLog.open(settings.wal_path), self.keyring)
        replayed = await self._replay(address)
        log.info("replayed %d events into %d jobs", replayed, len(self.jobs))
        await self._reconcile()
        self.projector = await Projector(settings.db_path, self.keyring.keys).open()
        self._projector_task = asyncio.create_task(self._project(address), name="projector")
        self._service = await start_service(self)
        write_connection_file(settings.connection_path, address.url, address.user, address.password)
        self._wrote_connection = True
        for job in list(self.jobs.values()):
            if job.status not in JOB_DONE:
                self.schedule(job.id)
        self._spawn_background(self._sweep_checkouts(), name="checkouts of ended jobs")
        self._spawn_background(watchdog(self.should_exit), name="systemd watchdog")
        notify(f"READY=1\nSTATUS=serving {len(self.jobs)} jobs on {address.url}\nMAINPID={os.getpid()}")
        log.info("numerusd ready on %s, state in %s", address.url, settings.state_dir)

    async def shutdown(self) -> None:
        """Stop agents (recorded interrupted), flush every event to JetStream, close what startup opened.

        Also runs after a failed startup, so each step checks that its part was started.
        """
        self.should_exit.set()
        notify("STOPPING=1")
        for run in self.runs.values():
            run.stopping = True
        await asyncio.gather(
            *(run.terminate(self.settings.kill_grace_s) for run in self.runs.values()), return_exceptions=True
        )
        if self._background:
            await asyncio.wait(self._background, timeout=self.settings.kill_grace_s + 5)
        if self._service is not None:
            await self._service.stop()
        if self.store is not None:
            for job in list(self.jobs.values()):
                await self.record(job.id, lambda state: domain.decide_interrupt(state, "numerusd stopped"))
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

        A long stream is read by a child process (`stream_pump`), as a rebuild reads it: this process only
        verifies and folds, on the other core.
        """
        count = 0
        keys = self.keyring.keys
        if (last := await last_sequence(self.js, EVENTS)) >= PUMPED_REPLAY_FROM:
            log.debug("replaying %d events read by a child process", last)
            batches = head_started_stream(address, EVENTS)
        else:
            batches = read_stream(self.nc, EVENTS)
        async for batch in batches:
            for message in batch:
                try:
                    event = open_untyped(message.data, keys)
                    self.jobs[event.job] = domain.evolve_untyped(self.jobs.get(event.job), event)
                except (InvalidEvent, ValueError) as e:
                    log.warning("skipping event at seq %d on %s: %s", message.seq, message.subject, e)
                    continue
                self.store.observe(message.seq, message.data)
                count += 1
        for sealed in await self.store.recover():
            self._fold(sealed)
            count += 1
        return count

    async def _reconcile(self) -> None:
        """Tasks that were running when the previous daemon died: stop what is left of them, say interrupted.

        A merge that was started and not recorded as done is looked up in git first: if it happened, it is
        recorded (never repeated); if not, the task is interrupted like the others.
        """
        for job in list(self.jobs.values()):
            for task in job.tasks.values():
                if task.status == "merging" and task.merge_parent and task.commit and job.integration:
                    await self._repair_merge(job, task)
            for task in domain.running_tasks(job):
                if task.pid is not None and await asyncio.to_thread(kill_leftover, task.pid, task.start_ticks):
                    log.info("stopped leftover agent pid %d of %s/%s", task.pid, job.id, task.id)
            await self.record(
                job.id, lambda state: domain.decide_interrupt(state, "numerusd stopped while the agent was running")
            )

    async def _sweep_checkouts(self) -> None:
        """Remove the read-only checkouts of jobs that ended while a daemon stopped before removing them (a
        running job's pipeline clears its own when it starts again)."""
        root = self.settings.worktrees_dir
        for path in sorted(root.glob(f"*{CHECKOUTS_SUFFIX}")) if root.is_dir() else ():
            job = self.jobs.get(path.name.removesuffix(CHECKOUTS_SUFFIX))
            if job is None or job.status not in JOB_DONE:
                continue
            try:
                await Checkouts(Path(job.repo), path).clear()
            except (NumerusError, OSError) as e:
                log.warning("cannot remove the checkouts of job %s in %s: %s", job.id, path, e)

    async def _repair_merge(self, job: domain.JobState, task: domain.TaskState) -> None:
        assert job.integration and task.merge_parent and task.commit
        try:
            state = await git.merge_state(Path(job.repo), job.integration, task.merge_parent, task.commit)
        except git.GitError as e:
            log.warning("cannot tell whether %s/%s was merged: %s", job.id, task.id, e)
            return
        if isinstance(state, git.Done):
            log.info("merge of %s/%s had happened before the restart: recording it", job.id, task.id)
            sha, created = state.sha, state.sha != task.merge_parent
            await self.record(job.id, lambda job: domain.decide_merged(job, task.id, sha, created))
            if task.worktree and task.branch:  # as after any merge
                await remove_merged(Path(job.repo), git.Worktree(Path(task.worktree), task.branch, task.base_sha or ""))

    async def _project(self, address: NatsAddress) -> None:
        try:
            await self._load_views(address)
            assert self.projector is not None
            await self.projector.run(self.nc, self.should_exit, on_rejected=self._rejected)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("projector stopped; views are stale until restart or 'numerusd rebuild'")

    async def _load_views(self, address: NatsAddress) -> None:
        """Views that start empty (new, lost, or dropped for a new schema) while the stream holds many events are
        loaded as `numerusd rebuild` does, about twice as fast as following the stream from its start.

        Meanwhile the views stay as they were (empty) and commands are answered from memory as always. Events a
        bulk load rejects are counted and logged, not dead-lettered again (the projector did when it first met
        them).
        """
        assert self.projector is not None
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
        for r in rejected:
            log.warning("rejected event at seq %d on %s: %s", r.seq, r.subject, r.message)
            await self.dead_letter("projector", r.reason, r.wire, r.message, seq=r.seq, subject=r.subject)

    # --- state --------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> domain.JobState:
        """The job, or NotFound with a hint."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; 'numerusctl status' lists the jobs")
        return job

    async def record(
        self, job_id: str, decide: Callable[[domain.JobState], domain.Decision], correlation_id: str | None = None
    ) -> list[Sealed]:
        """Decide against the job's latest state, append the events durably, and fold them in.

        Deciding, sealing and queueing for the WAL are one synchronous step, against the state that includes
        the job's events still on their way to disk (`_ahead`): decisions of one job follow one another without
        each waiting for the fdatasync of the one before, and share it. `jobs`, which status and the pipeline
        read, moves only once the events are durable, in WAL order, whether or not the caller still waits.
        """
        state = self._ahead.get(job_id) or self.jobs.get(job_id)
        decision = decide(state)  # type: ignore[arg-type]  # None only for a new job's decide_run
        if not decision:
            return []
        assert self.store is not None
        after: list[domain.JobState] = []  # filled below, before the WAL can call back
        sealed, durable = self.store.submit(
            job_id,
            decision,
            correlation_id=correlation_id or job_id,
            causation_id=state.last_event_id if state is not None else None,
            on_durable=lambda: self._landed(job_id, after[0]),
        )
        for event in sealed:
            state = domain.evolve(state, event.envelope)
        after.append(state)
        self._ahead[job_id] = state
        try:
            await asyncio.shield(durable)  # a caller that gives up does not take the events back
        except StoreError:
            self._ahead.pop(job_id, None)  # never durable: nothing may build on it (the WAL refuses more anyway)
            raise
        return sealed

    def _landed(self, job_id: str, state: domain.JobState) -> None:
        """A decision's events are durable: the job is now as they left it (called in WAL order)."""
        self.jobs[job_id] = state
        if self._ahead.get(job_id) is state:
            del self._ahead[job_id]  # nothing of this job is on its way any more

    def _fold(self, sealed: Sealed) -> None:
        event = sealed.envelope
        self.jobs[event.job] = domain.evolve(self.jobs.get(event.job), event)

    # --- agents -------------------------------------------------------------------------------------------

    def schedule(self, job_id: str) -> None:
        """Start the job's pipeline, or, on the single-task path, every ready task not already running."""
        job = self.jobs[job_id]
        if job.planned:
            if job_id not in self.pipelines and job.status not in JOB_DONE and not self.should_exit.is_set():
                pipeline = self.pipelines[job_id] = JobPipeline(self, job_id)
                self._spawn_background(self._pipeline(pipeline), name=f"pipeline {job_id}")
            return
        for task in domain.ready_tasks(job):
            key = (job_id, task.id)
            if key in self.runs or self.should_exit.is_set():
                continue
            profile = self.settings.agents[task.agent]
            run = TaskRun(
                job=job,
                task=task,
                adapter=adapter_for(profile),
                extra_env=dict(profile.env),
                run_dir=self.settings.runs_dir / job_id / task.id,
                nc=self.nc,
                record=self.record,
                chunk_bytes=self.settings.log_chunk_bytes,
                flush_s=self.settings.log_flush_ms / 1000,
                breaker=self.breaker,
            )
            self.runs[key] = run
            self._spawn_background(self._run(key, run), name=f"task {job_id}/{task.id}")

    async def _run(self, key: tuple[str, str], run: TaskRun) -> None:
        try:
            await run.run()
        except Exception as e:
            log.exception("task %s/%s crashed in the daemon", *key)
            reason = f"internal error while supervising the agent: {e}"
            await self.record(key[0], lambda job: domain.decide_spawn_failed(job, key[1], reason))
        finally:
            self.runs.pop(key, None)
        if not self.should_exit.is_set():
            self.schedule(key[0])

    async def _pipeline(self, pipeline: JobPipeline) -> None:
        try:
            await pipeline.run()
        finally:
            self.pipelines.pop(pipeline.job_id, None)

    def terminate_job(self, job_id: str) -> list[str]:
        """Stop the job's running agents in the background; the list of tasks (or calls) being stopped."""
        tasks = []
        for (job, task), run in list(self.runs.items()):
            if job == job_id:
                tasks.append(task)
                self._spawn_background(run.terminate(self.settings.kill_grace_s), name=f"kill {job}/{task}")
        pipeline = self.pipelines.get(job_id)
        if pipeline is not None:
            self._spawn_background(pipeline.poke(), name=f"wake {job_id}")
        return tasks

    def _spawn_background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- reads and dead letters ---------------------------------------------------------------------------

    async def read_events(self, subject: str, after_seq: int, limit: int) -> EventsReply:
        """Up to `limit` stored events on `subject` after stream sequence `after_seq`."""
        events: list[msgspec.Raw] = []
        seqs: list[int] = []
        last_seq = after_seq
        more = False
        async with StreamReader(self.nc, EVENTS, start_seq=after_seq + 1, filter_subjects=[subject]) as reader:
            async for batch in reader:
                for message in batch:
                    if len(events) == limit:
                        more = True
                        break
                    events.append(msgspec.Raw(message.data))
                    seqs.append(message.seq)
                    last_seq = message.seq
                if more:
                    break
        return EventsReply(events=events, seqs=seqs, last_seq=last_seq, more=more)

    async def dead_letter(self, source: str, reason: str, data: bytes, message: str, **fields: object) -> None:
        """Keep a rejected input on `numerus.dlq.<source>.<reason>` with why, for an operator to look at."""
        headers = {"Numerus-Reason": message[:1000], "Numerus-Id": new_ulid()}
        headers |= {f"Numerus-{key.title()}": str(value) for key, value in fields.items()}
        try:
            await self.js.publish(f"numerus.dlq.{source}.{reason}", data, headers=headers)
        except Exception as e:  # a dead letter that cannot be kept is logged, never fatal
            log.warning("dead letter %s.%s not stored: %s", source, reason, e)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGINT and SIGTERM ask the daemon to stop; a second one is left to the default (the user insists)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.handle_exit)
