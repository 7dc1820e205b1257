"""Runs one attempt of a task's agent from spawn to exit, turning what it does into events.

The agent runs in its own PTY and session, in its own directory `runs/<job>/<task>/`. Everything it prints,
secrets redacted (`numerusd.redaction`), goes to `stdout.log` there and, in chunks, to `numerus.log.<job>.<task>`;
each line is also offered to the adapter's parser, whose events (messages, commands, file changes, token usage,
thread id) are appended to the job's stream. The start is recorded before the spawn and the exit after it, so a crash in
between is visible on restart as a task that started and never ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.client import Client

from numerusd import failpoints
from numerusd.agents.base import AgentAdapter, AgentInvocation, LineBuffer
from numerusd.breaker import CircuitBreaker
from numerusd.domain.observations import (
    AgentExited,
    AgentFailedToStart,
    AgentReported,
    AgentStarted,
    AgentStarting,
    Observation,
    Redacted,
)
from numerusd.errors import AgentError
from numerusd.metrics import Metrics
from numerusd.processes import inherited_environment
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    EventData,
    TokensUsed,
    Usage,
)
from numerusd.redaction import RedactingStream, Redactor
from numerusd.sandbox import Sandbox
from numerusd.terminal import Terminal, spawn

log = logging.getLogger(__name__)


class Launcher(Protocol):
    """Where an agent runs when not in a PTY of the daemon's: a remote worker (`numerusd.dispatch.RemoteAttempt`),
    whose `start` returns a terminal read as a local one (`read`, `wait`, `terminate`, `close`, `pid`)."""

    async def start(self) -> Any:
        """Have the agent started; its terminal."""

    def cancel(self) -> None:
        """Stop it before it started."""


#: What an agent call's answer decodes to (a claim, a verdict): a msgspec Struct, never a str.
_Answer = TypeVar("_Answer")


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


class AgentProcess:
    """One agent process in its own PTY: spawned, its output pumped to the log and the parser, its exit awaited.

    The part every agent run shares, whether it works on a task (`TaskRun`) or answers a question of the
    pipeline (`AgentCall`: a plan, a claim, a verdict); what becomes of the parsed events is the caller's.
    """

    def __init__(
        self,
        *,
        adapter: AgentAdapter,
        invocation: AgentInvocation,
        extra_env: dict[str, str],
        cwd: Path,
        log_path: Path,
        subject: str,
        nc: Client,
        chunk_bytes: int = 16 * 1024,
        flush_s: float = 0.05,
        breaker: CircuitBreaker | None = None,
        redactor: Redactor | None = None,
        sandbox: Sandbox | None = None,
        metrics: Metrics | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.adapter = adapter
        #: Runs the agent elsewhere (a remote worker) rather than in a PTY here.
        self.launcher = launcher
        self.metrics = metrics or Metrics()
        #: What the agent may see (None: unsandboxed, a profile's `sandbox = "none"`).
        self.sandbox = sandbox
        self.invocation = invocation
        self.breaker = breaker
        self.cwd = cwd
        self.log_path = log_path
        self.subject = subject
        self.nc = nc
        self.chunk_bytes = chunk_bytes
        self.flush_s = flush_s
        #: What the agent prints goes through it before the log, NATS and the parser; its counts say what it hid.
        self.redacted = RedactingStream(redactor or Redactor())
        self.argv, agent_env = adapter.command(invocation)
        self.env = {**inherited_environment(), **extra_env, **agent_env}
        self.terminal: Terminal | None = None
        self._started = 0.0
        #: `time.monotonic()` of the start and of the last output, for the pipeline's timeouts.
        self.last_output = 0.0
        #: Why the daemon stopped the agent (a timeout), when it says so.
        self.stopped_because: str | None = None

    async def spawn(self) -> Terminal:
        """Start the agent; AgentError with a one-line reason when it cannot start."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.launcher is not None:  # its time counts from when the worker started it, not from the offer
            self.terminal = await self.launcher.start()
            self._started = self.last_output = time.monotonic()
            if workdir := getattr(self.terminal, "workdir", ""):  # what it reports is read against where it runs
                self.invocation = msgspec.structs.replace(self.invocation, repo=Path(workdir))
            return self.terminal
        program = self.argv[0]
        refusal = self.breaker.refusal(program) if self.breaker is not None else None
        if refusal is not None:
            raise AgentError(refusal)
        self._started = self.last_output = time.monotonic()
        try:
            self.terminal = await spawn(self.argv, cwd=self.cwd, env=self.env, sandbox=self.sandbox)
        except AgentError as e:
            if self.breaker is not None:
                self.breaker.failed(program, e.message)
            raise
        self.metrics.agent_spawn_seconds.observe(time.monotonic() - self._started)
        if self.breaker is not None:
            self.breaker.started(program)
        return self.terminal

    async def pump(self, on_events: Callable[[list[EventData]], Awaitable[None]]) -> Outcome:
        """Copy the output to the log and the parser until the agent ends; how it ended."""
        terminal = self.terminal
        assert terminal is not None, "spawn() first"
        sink = LogSink(
            path=self.log_path, subject=self.subject, nc=self.nc, chunk_bytes=self.chunk_bytes, flush_s=self.flush_s
        )
        parser = self.adapter.parser(self.invocation)
        lines = LineBuffer()

        async def parsed(batch: list[str]) -> None:
            events: list[EventData] = []
            for line in batch:
                events.extend(parser.feed(line))
            if events:
                await on_events(events)

        try:
            while chunk := await terminal.read():
                self.last_output = time.monotonic()
                if chunk := self.redacted.feed(chunk):
                    await sink.write(chunk)
                    await parsed(lines.feed(chunk))
            if rest := self.redacted.close():
                await sink.write(rest)
                await parsed(lines.feed(rest))
            await parsed(lines.close())
            await sink.flush()
        finally:
            sink.close()
        exit_code, signal = await terminal.wait()
        terminal.close()
        return Outcome(
            exit_code=exit_code,
            signal=signal,
            log_path=str(self.log_path),
            log_sha256=sink.sha256.hexdigest(),
            log_bytes=sink.size,
            duration_s=time.monotonic() - self._started,
        )

    @property
    def started(self) -> float:
        """`time.monotonic()` when the agent was spawned."""
        return self._started

    async def terminate(self, grace: float, because: str | None = None) -> None:
        """Stop the agent's whole process group: TERM, then KILL after `grace` seconds; `because` is kept."""
        self.stopped_because = because or self.stopped_because
        if self.terminal is not None:
            await self.terminal.terminate(grace)
        elif self.launcher is not None:
            self.launcher.cancel()


@dataclass(frozen=True)
class Outcome:
    """How an agent process ended, and the log of everything it printed."""

    exit_code: int | None
    signal: int | None
    log_path: str
    log_sha256: str
    log_bytes: int
    duration_s: float

    def fields(self) -> dict[str, Any]:
        """The fields of the `AgentExited` observation."""
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "log_path": self.log_path,
            "log_sha256": self.log_sha256,
            "log_bytes": self.log_bytes,
            "duration_s": self.duration_s,
        }

    def describe(self) -> str:
        """`exit code 3` or `signal 9`."""
        return f"exit code {self.exit_code}" if self.signal is None else f"signal {self.signal}"


class _ProcessRun:
    """What the daemon needs of a running agent, whatever it runs for: to stop it."""

    process: AgentProcess

    async def terminate(self, grace: float) -> None:
        """Stop the agent's whole process group: TERM, then KILL after `grace` seconds."""
        await self.process.terminate(grace)


#: Decides an observation of one task's agent for its job, and returns once the events are durable.
Observe = Callable[[Observation], Awaitable[object]]


class TaskRun(_ProcessRun):
    """One attempt of one task: spawn its agent, pump its output, and report what it does as observations.

    The start is observed before the spawn and the exit after it; what the exit means for the task (the gate,
    a retry, the job's end) is the pipeline's to observe next.
    """

    def __init__(self, *, task_id: str, process: AgentProcess, observe: Observe) -> None:
        self.task_id = task_id
        self.process = process
        self.observe = observe
        self.spawn_error: str | None = None
        #: What the agent reported running and writing, in order: the gate holds them against the claim.
        self.commands: list[str] = []
        self.files: list[str] = []

    async def run(self) -> Outcome | None:
        """Run the attempt to its end; how the agent ended, or None when it never started (`spawn_error` says why)."""
        process, task_id = self.process, self.task_id
        process.cwd.mkdir(parents=True, exist_ok=True)
        await self.observe(
            AgentStarting(
                task=task_id,
                argv=tuple(process.argv),
                workdir=str(process.cwd),
                log_path=str(process.log_path),
                resumes=process.invocation.resume_thread,
            )
        )
        try:
            terminal = await process.spawn()
        except AgentError as e:
            self.spawn_error = e.message
            await self.observe(AgentFailedToStart(task=task_id, reason=e.message))
            return None
        await self.observe(AgentStarted(task=task_id, pid=terminal.pid, start_ticks=terminal.start_ticks))
        failpoints.hit("agent-running")  # tests: a crash while the agent runs (it dies with the daemon)
        outcome = await process.pump(self._reported)
        if process.redacted.counts:  # before the exit, while the task is still the agent's
            await self.observe(Redacted(task=task_id, counts=dict(process.redacted.counts)))
        await self.observe(AgentExited(task=task_id, **outcome.fields()))
        return outcome

    async def _reported(self, events: list[EventData]) -> None:
        for event in events:
            if isinstance(event, AgentCommandExecuted):
                self.commands.append(event.command)
            elif isinstance(event, AgentFileChanged):
                self.files.append(event.path)
        await self.observe(AgentReported(task=self.task_id, events=tuple(events)))


#: The largest answer file an agent call may write (a plan of a few hundred tasks is well under 1 MiB).
MAX_ANSWER_BYTES = 4 * 1024 * 1024


def read_answer(path: Path) -> str | None:
    """The answer file an agent wrote, or None when there is none. The agent chose what lies at `path`: a
    symlink is not followed (it could name the daemon's keys), only a regular file is read (not a FIFO that
    blocks), and one over MAX_ANSWER_BYTES is refused (AgentError, one line) rather than read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AgentError(f"the agent's answer {path.name} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as answer:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AgentError(f"the agent's answer {path.name} is not a regular file")
        if info.st_size > MAX_ANSWER_BYTES:
            raise AgentError(f"the agent's answer is {info.st_size} bytes, over the limit of {MAX_ANSWER_BYTES} bytes")
        return answer.read(MAX_ANSWER_BYTES).decode("utf-8", errors="replace")


@dataclass
class CallResult:
    """What an agent call answered: its last message (the `-o` file), its tokens, and how it ended."""

    outcome: Outcome | None
    answer: str | None
    usage: Usage
    errors: list[str]
    #: Secrets replaced in what the agent printed and answered, by kind.
    redacted: dict[str, int] = field(default_factory=dict)
    #: Why its answer file was not read (`read_answer`), if it was not.
    unreadable: str | None = None

    def failure(self) -> str | None:
        """Why there is no answer to read, or None when there is one."""
        if self.outcome is None:
            return self.errors[0] if self.errors else "the agent did not start"
        if self.outcome.exit_code != 0:
            detail = f": {self.errors[-1]}" if self.errors else ""
            return f"the agent ended with {self.outcome.describe()}{detail}"
        if not self.answer or not self.answer.strip():
            return self.unreadable or "the agent gave no answer (its last message was empty)"
        return None

    def decoded(self, decode: Callable[[str], _Answer], what: str) -> _Answer | str:
        """The answer read with `decode`, or why it cannot be: `failure()`, or `<what> is not valid: <error>`."""
        failure = self.failure()
        if failure is not None:
            return failure
        try:
            return decode(self.answer or "")
        except msgspec.DecodeError as e:
            return f"{what} is not valid: {e}"


class AgentCall(_ProcessRun):
    """One question to an agent (plan, claim, review): run it, collect its tokens, read its answer file."""

    def __init__(self, process: AgentProcess, answer_path: Path) -> None:
        self.process = process
        self.answer_path = answer_path

    async def run(self) -> CallResult:
        """Run the call to its end; never raises for what the agent does."""
        usage = [0, 0, 0]
        errors: list[str] = []

        async def collect(events: list[EventData]) -> None:
            for event in events:
                if isinstance(event, TokensUsed):
                    usage[0] += event.input_tokens
                    usage[1] += event.cached_input_tokens
                    usage[2] += event.output_tokens
                elif isinstance(event, AgentErrorReported):
                    errors.append(event.message)

        self.answer_path.unlink(missing_ok=True)
        try:
            await self.process.spawn()
        except AgentError as e:
            return CallResult(outcome=None, answer=None, usage=Usage(), errors=[e.message])
        outcome = await self.process.pump(collect)
        redacted = self.process.redacted
        unreadable = None
        try:
            written = read_answer(self.answer_path)
        except AgentError as e:
            written, unreadable = None, e.message
        if written is None:
            answer = None
        else:
            answer = redacted.redactor.redact_text(written, redacted.counts)
            if answer is not written:  # the agent's file stays in the run directory: it is kept redacted too
                self.answer_path.write_text(answer, encoding="utf-8")
        spent = Usage(input_tokens=usage[0], cached_input_tokens=usage[1], output_tokens=usage[2])
        return CallResult(
            outcome=outcome,
            answer=answer,
            usage=spent,
            errors=errors,
            redacted=dict(redacted.counts),
            unreadable=unreadable,
        )


class Agents:
    """The agent processes this daemon runs, each under a key (job, task) or (job, "<task>.claim"…).

    Every agent is made here (`process`) with the daemon's log settings and circuit breaker, and runs under
    `running(...)`, so that a kill or a shutdown finds it (`terminate`) whatever it runs for.
    """

    def __init__(
        self,
        nc: Client,
        *,
        chunk_bytes: int,
        flush_s: float,
        kill_grace_s: float,
        breaker: CircuitBreaker,
        redactor: Redactor | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.nc = nc
        self.metrics = metrics or Metrics()
        self.redactor = redactor or Redactor()
        self.chunk_bytes = chunk_bytes
        self.flush_s = flush_s
        self.kill_grace_s = kill_grace_s
        self.breaker = breaker
        self._running: dict[tuple[str, str], TaskRun | AgentCall] = {}

    def process(
        self,
        *,
        adapter: AgentAdapter,
        invocation: AgentInvocation,
        extra_env: dict[str, str],
        cwd: Path,
        log_path: Path,
        subject: str,
        sandbox: Sandbox | None,
        launcher: Launcher | None = None,
    ) -> AgentProcess:
        """An agent process, not started yet, whose output goes to `log_path` and `subject`, in `sandbox` (or
        started by `launcher` elsewhere)."""
        return AgentProcess(
            adapter=adapter,
            invocation=invocation,
            extra_env=extra_env,
            cwd=cwd,
            log_path=log_path,
            subject=subject,
            nc=self.nc,
            chunk_bytes=self.chunk_bytes,
            flush_s=self.flush_s,
            breaker=self.breaker,
            redactor=self.redactor,
            sandbox=sandbox,
            metrics=self.metrics,
            launcher=launcher,
        )

    @contextlib.contextmanager
    def running(self, job_id: str, name: str, run: TaskRun | AgentCall) -> Iterator[None]:
        """Keep `run` findable by `terminate` while the block runs it."""
        self._running[(job_id, name)] = run
        try:
            yield
        finally:
            self._running.pop((job_id, name), None)

    def of_job(self, job_id: str | None) -> list[tuple[str, TaskRun | AgentCall]]:
        """The job's agents running now (None: every job's), by name."""
        return [(name, run) for (job, name), run in self._running.items() if job_id in (None, job)]

    def terminal_of(self, job_id: str, task_id: str) -> Terminal | None:
        """The terminal of the task's agent working on it now (not a claim or review call), or None."""
        run = self._running.get((job_id, task_id))
        return run.process.terminal if isinstance(run, TaskRun) else None

    async def terminate(
        self, job_id: str | None = None, *, grace: float | None = None, task: str | None = None
    ) -> None:
        """Stop the agents of one job (or all of them; or of one task of the job: its executor, its claim and
        review calls): TERM, then KILL after `grace` (default: kill_grace_s)."""
        runs = [
            run
            for (job, name), run in self._running.items()
            if job_id in (None, job) and (task is None or name.split(".")[0] == task)
        ]
        grace = self.kill_grace_s if grace is None else grace
        await asyncio.gather(*(run.terminate(grace) for run in runs), return_exceptions=True)
