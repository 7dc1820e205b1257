"""`numerusctl attach JOB TASK`: a running agent's terminal, live in the user's terminal.

What the agent prints comes from `numerus.log.<job>.<task>` (stream NUMERUS_LOGS, from the last chunk stored, so
a prompt printed before the attach is seen); what the user types goes, as it is typed, to
`numerus.input.<job>.<task>` (one request per read, so it arrives in order; see `numerusd/agent_input.py`, which
records each as `AgentInputSent` with its size and keyed hash, never the bytes). The user's terminal is put in raw mode
(every key goes to the agent, Ctrl-C too) with output processing kept (the agent's `\\n` is a new line), and
restored on every way out: the detach key (Ctrl-], as telnet's), the agent's exit, an error, SIGTERM or SIGHUP.

`--read-only`, and the viewer role always, send nothing: keys other than the detach key are dropped here (the bus
refuses a viewer's input anyway, `numerusd/bus_roles.py`).

The agent is untrusted, and its output goes to the user's terminal as it is, with one exception: the control
strings a terminal acts on outside the screen (OSC: window title, clipboard, hyperlinks; DCS, APC, PM, SOS),
opened by ESC or by their 8-bit C1 bytes, are dropped (`TerminalFilter`); colours and cursor movement pass. What
the agent left set (the alternate screen, a hidden cursor, mouse reporting, bracketed paste, colours) is reset on
every way out (`RESET`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
from collections.abc import Iterator

import msgspec
import nats.errors
from nats.aio.client import Client

from numerusctl.connection import CtlError, decode_reply, request, request_headers, unless_refused
from numerusctl.feed import Stored, StreamFeed
from numerusd.protocol import subjects
from numerusd.protocol.attach import DETACH_KEY, MAX_INPUT_BYTES, InputReply
from numerusd.protocol.commands import ErrorReply, GetStatus, StatusReply
from numerusd.protocol.exit_codes import CtlExit

_ESC = 0x1B
#: After ESC, the bytes that open a control string (OSC `]`, DCS `P`, SOS `X`, PM `^`, APC `_`).
_STRING_OPENERS = frozenset(b"]PX^_")
#: The same control strings opened by their C1 character (DCS, SOS, OSC, PM, APC: U+0090..U+009F, which UTF-8
#: writes as 0xC2 then this byte; a lone byte of these values is a UTF-8 continuation byte, not a control).
_C1_OPENERS = frozenset((0x90, 0x98, 0x9D, 0x9E, 0x9F))
_C1_LEAD = 0xC2
_BEL = 0x07
#: Written to the user's terminal on detach: main screen, cursor shown, mouse and bracketed paste off, plain colours.
RESET = b"\x1b[?1049l\x1b[?25h\x1b[?1000;1002;1003;1006l\x1b[?2004l\x1b[m"
_reply_decoder = msgspec.json.Decoder(InputReply)
_error_decoder = msgspec.json.Decoder(ErrorReply)


class TerminalFilter:
    """An agent's terminal output without its control strings (see the module docstring), chunk by chunk: a
    sequence may be cut anywhere between two chunks."""

    def __init__(self) -> None:
        self._after_esc = False
        self._after_lead = False
        self._in_string = False

    def feed(self, data: bytes) -> bytes:
        """What of `data` may reach the user's terminal."""
        if not (self._in_string or self._after_esc or self._after_lead or _ESC in data or _C1_LEAD in data):
            return data  # most output: nothing to look at byte by byte
        out = bytearray()
        for byte in data:
            if self._in_string:
                # A control string ends at BEL or at ST (ESC \); everything in it is dropped.
                if byte == _BEL or (self._after_esc and byte == ord("\\")):
                    self._in_string = self._after_esc = False
                else:
                    self._after_esc = byte == _ESC
            elif self._after_esc:
                self._after_esc = False
                if byte in _STRING_OPENERS:
                    self._in_string = True
                else:
                    out += bytes((_ESC, byte))
            elif byte == _ESC:
                self._after_esc = True
            elif self._after_lead and byte in _C1_OPENERS:
                self._in_string = True
                if out and out[-1] == _C1_LEAD:  # (a lead byte sent with the chunk before stays: a stray character)
                    del out[-1]
            else:
                out.append(byte)
            self._after_lead = byte == _C1_LEAD and not self._in_string
        return bytes(out)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """`fd`'s terminal in raw mode (no echo, no line editing, no signals from keys, Ctrl-S/Ctrl-Q passed on) with
    output processing kept, restored however the block ends; nothing when `fd` is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
    mode[2] = (mode[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    mode[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSAFLUSH, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach(nc: Client, job: str, task: str, *, read_only: bool, timeout: float) -> int:
    """Attach the user's terminal to the task's running agent until it ends or the user detaches; the exit code."""
    # Exits of tasks so named from now on, in every job (`job` may be `last` or a short id, resolved by the status
    # asked next): opened first, so an exit between the two is not missed.
    exits_subject = subjects.job_event("*", "TaskExited", task)
    async with StreamFeed(nc, subjects.EVENTS, exits_subject, only="new") as exits:
        job_id = await _running_task(nc, job, task, timeout)
        mode = "read-only; " if read_only else ""
        _say(f"attached to {job_id} {task} ({mode}Ctrl-] detaches)")
        async with StreamFeed(nc, subjects.LOGS, subjects.task_log(job_id, task), only="last") as output:
            session = _Session(nc, job_id, task, read_only=read_only, timeout=timeout)
            try:
                with raw_terminal(sys.stdin.fileno()):
                    code = await session.run(output, exits)
            finally:
                if sys.stdout.isatty():  # the agent's terminal modes end with the attach, however it ends
                    sys.stdout.buffer.write(RESET)
                    sys.stdout.buffer.flush()
    return code


async def _running_task(nc: Client, job: str, task: str, timeout: float) -> str:
    """The full id of `job`, once its `task` is found running; CtlError in one line otherwise."""
    reply: StatusReply = decode_reply("status", await request(nc, "status", GetStatus(job=job), timeout))
    found = next((t for t in reply.jobs[0].tasks if t.id == task), None) if reply.jobs else None
    if found is None:
        raise CtlError(f"job {job} has no task {task}")
    if found.status != "running":
        raise CtlError(f"task {task} of job {reply.jobs[0].id} is {found.status}: only a running agent can be attached")
    return reply.jobs[0].id


def _say(line: str) -> None:
    """A line of numerusctl's own on stderr, from the start of the line (the terminal may be raw)."""
    sys.stderr.write(f"\r\nnumerusctl: {line}\r\n")
    sys.stderr.flush()


class _Session:
    """One attachment: output copied in, keys sent out, until one of them ends it."""

    def __init__(self, nc: Client, job: str, task: str, *, read_only: bool, timeout: float) -> None:
        self.nc = nc
        self.job = job
        self.subject = subjects.task_input(job, task)
        self.read_only = read_only
        self.timeout = timeout
        self.keys: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.filter = TerminalFilter()

    async def run(self, output: StreamFeed, exits: StreamFeed) -> int:
        loop = asyncio.get_running_loop()
        stdin = sys.stdin.fileno()
        try:
            loop.add_reader(stdin, self._on_keys, stdin)
            reading = True
        except (OSError, ValueError):  # a regular file or /dev/null: nothing to type, only to watch
            reading = False
        stop = asyncio.Event()
        caught = [signal.SIGTERM, signal.SIGHUP]
        for sig in caught:
            loop.add_signal_handler(sig, stop.set)
        parts = {
            asyncio.create_task(self._copy_output(output)): "output",
            asyncio.create_task(self._send_keys()): "keys",
            asyncio.create_task(_exit_of(exits, self.job)): "exit",
            asyncio.create_task(stop.wait()): "signal",
        }
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if reading:
                loop.remove_reader(stdin)
            for sig in caught:
                loop.remove_signal_handler(sig)
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)
        ended = next(iter(done))
        ended.result()  # an error (a lost connection, a refusal) surfaces here; the terminal is restored on its way
        match parts[ended]:
            case "exit":
                # Its output was all published before its exit was recorded: what is stored is the rest.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain(output), self.timeout)
                _say("the agent exited; detached")
            case "keys":
                _say("detached")
            case _:
                _say("stopped by a signal; detached")
        return CtlExit.OK

    def _on_keys(self, fd: int) -> None:
        try:
            data = os.read(fd, MAX_INPUT_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of input (a pipe closed): detach
            self.keys.put_nowait(None)
            return
        before, detach, _ = data.partition(DETACH_KEY)
        if before and not self.read_only:
            self.keys.put_nowait(before)
        if detach:
            self.keys.put_nowait(None)

    async def _send_keys(self) -> None:
        """Send what is typed, in order, one request at a time; return on detach, CtlError on a refusal."""
        while (data := await self.keys.get()) is not None:
            sent = self.nc.request(self.subject, data, timeout=self.timeout, headers=request_headers())
            try:
                reply = await unless_refused(self.nc, self.subject, sent)
            except nats.errors.NoRespondersError:
                raise CtlError(f"numerusd does not answer on {self.subject}: is it running?") from None
            except nats.errors.TimeoutError:
                raise CtlError(f"numerusd did not take the input within {self.timeout:g} s") from None
            headers = reply.headers or {}
            if "Nats-Service-Error-Code" in headers:
                raise CtlError(_error_decoder.decode(reply.data).message)
            taken = _reply_decoder.decode(reply.data)
            if taken.written < taken.size:
                _say(f"the agent is not reading its input: {taken.written} of {taken.size} bytes went in")

    async def _copy_output(self, output: StreamFeed) -> None:
        async for batch in output.forever():
            self._write(batch)

    async def _drain(self, output: StreamFeed) -> None:
        async for batch in output.drain():
            self._write(batch)

    def _write(self, batch: list[Stored]) -> None:
        out = sys.stdout.buffer
        for stored in batch:
            out.write(self.filter.feed(stored.data))
        out.flush()


async def _exit_of(exits: StreamFeed, job: str) -> None:
    """Return once the feed of tasks' exits has delivered one of `job`."""
    while True:
        for stored in await exits.next_batch():
            if subjects.job_of(stored.subject) == job:
                return
