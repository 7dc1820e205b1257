"""Runs one attempt of a task's agent from spawn to exit, turning what it does into events.

The agent runs in its own PTY and session, in its own directory `runs/<job>/<task>/`. Everything it prints
goes, byte for byte, to `stdout.log` there and, in chunks, to `numerus.log.<job>.<task>`; each line is also
offered to the adapter's parser, whose events (messages, commands, file changes, token usage, thread id) are
appended to the job's stream. The start is recorded before the spawn and the exit after it, so a crash in
between is visible on restart as a task that started and never ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client

from numerusd import domain
from numerusd.agents.base import AgentAdapter, AgentInvocation, AgentOutputParser, LineBuffer
from numerusd.errors import AgentError
from numerusd.protocol.events import AgentSpawned, EventData
from numerusd.terminal import Terminal, spawn

log = logging.getLogger(__name__)

#: The daemon's own environment that an agent must not inherit: its NATS secrets and systemd's sockets.
DAEMON_ONLY_ENV = frozenset(
    {"NUMERUS_NATS_PASSWORD", "NUMERUS_NATS_CREDS", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"}
)

#: Appends the decision `decide(state)` for a job and returns once it is durable.
Record = Callable[[str, Callable[[domain.JobState], domain.Decision]], Awaitable[object]]


@dataclass
class LogSink:
    """Where a task's terminal output goes: the log file (with a running hash) and chunked NATS messages."""

    path: Path
    subject: str
    nc: Client
    chunk_bytes: int
    flush_s: float
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    _pending: bytearray = field(default_factory=bytearray)
    _last_flush: float = field(default_factory=time.monotonic)
    _timer: asyncio.TimerHandle | None = None
    _flushing: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    async def write(self, chunk: bytes) -> None:
        """Keep `chunk`: the file gets it at once, NATS when a chunk is full or `flush_s` old."""
        self._file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)
        self._pending += chunk
        if len(self._pending) >= self.chunk_bytes or time.monotonic() - self._last_flush >= self.flush_s:
            await self.flush()
        elif self._timer is None:
            # An agent that prints a prompt and then thinks for a minute must still be seen live.
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Publish what is pending as one log message (its offset in the file in a header)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        offset = self.size - len(self._pending)
        data, self._pending = bytes(self._pending), bytearray()
        self._last_flush = time.monotonic()
        try:
            await self.nc.publish(self.subject, data, headers={"Numerus-Offset": str(offset)})
        except Exception as e:  # the log file is the record; a lost live chunk must not stop the task
            log.warning("log chunk for %s not published: %s", self.subject, e)

    def close(self) -> None:
        """Close the file; what was written is durable enough for a log (its hash goes into TaskExited)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._file.close()


class TaskRun:
    """One attempt of one task: spawn its agent, pump its output, record its events and its exit."""

    def __init__(
        self,
        *,
        job: domain.JobState,
        task: domain.TaskState,
        adapter: AgentAdapter,
        extra_env: dict[str, str],
        run_dir: Path,
        nc: Client,
        record: Record,
        chunk_bytes: int = 16 * 1024,
        flush_s: float = 0.05,
    ) -> None:
        self.job_id = job.id
        self.task_id = task.id
        self.job = job
        self.task = task
        self.adapter = adapter
        self.extra_env = extra_env
        self.run_dir = run_dir
        self.nc = nc
        self.record = record
        self.chunk_bytes = chunk_bytes
        self.flush_s = flush_s
        self.terminal: Terminal | None = None
        self.stopping = False

    async def run(self) -> None:
        """Run the attempt to its end; every outcome, including failure to start, ends up as events."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "stdout.log"
        invocation = AgentInvocation(prompt=self.task.instructions, repo=Path(self.job.repo))
        argv, agent_env = self.adapter.command(invocation)
        inherited = {name: value for name, value in os.environ.items() if name not in DAEMON_ONLY_ENV}
        env = {**inherited, **self.extra_env, **agent_env}
        await self.record(
            self.job_id, lambda job: domain.decide_start(job, self.task, argv, str(self.run_dir), str(log_path))
        )
        started = time.monotonic()
        try:
            self.terminal = await spawn(argv, cwd=self.run_dir, env=env)
        except AgentError as e:
            reason = e.message
            await self.record(self.job_id, lambda job: domain.decide_spawn_failed(job, self.task_id, reason))
            return
        terminal = self.terminal
        await self._task_events([AgentSpawned(pid=terminal.pid, start_ticks=terminal.start_ticks)])
        sink = LogSink(
            path=log_path,
            subject=f"numerus.log.{self.job_id}.{self.task_id}",
            nc=self.nc,
            chunk_bytes=self.chunk_bytes,
            flush_s=self.flush_s,
        )
        parser = self.adapter.parser(invocation)
        lines = LineBuffer()
        try:
            while chunk := await terminal.read():
                await sink.write(chunk)
                await self._parsed(parser, lines.feed(chunk))
            await self._parsed(parser, lines.close())
            await sink.flush()
        finally:
            sink.close()
        exit_code, signal = await terminal.wait()
        terminal.close()
        outcome = {
            "exit_code": exit_code,
            "signal": signal,
            "log_path": str(log_path),
            "log_sha256": sink.sha256.hexdigest(),
            "log_bytes": sink.size,
            "duration_s": time.monotonic() - started,
        }
        if self.stopping:  # the daemon is shutting down: the exit is recorded, the outcome is "interrupted"
            await self.record(self.job_id, lambda job: domain.decide_exit(job, self.task_id, **outcome)[:1])
            return
        await self.record(self.job_id, lambda job: domain.decide_exit(job, self.task_id, **outcome))

    async def terminate(self, grace: float) -> None:
        """Stop the agent's whole process group: TERM, then KILL after `grace` seconds."""
        if self.terminal is not None:
            await self.terminal.terminate(grace)

    async def _parsed(self, parser: AgentOutputParser, lines: list[str]) -> None:
        events: list[EventData] = []
        for line in lines:
            events.extend(parser.feed(line))
        if events:
            await self._task_events(events)

    async def _task_events(self, events: list[EventData]) -> None:
        task_id = self.task_id
        await self.record(self.job_id, lambda _job: [(task_id, event) for event in events])
