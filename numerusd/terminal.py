"""PTY terminals: one agent process in its own pseudo-terminal, session and process group.

`spawn()` starts a process whose stdin, stdout and stderr are the slave side of a fresh PTY, as the leader of a
new session with that PTY as its controlling terminal; the daemon keeps the master side and reads it without
blocking the event loop. The process is started as every child of the daemon is (`numerusd.processes`: vfork
in a worker thread, exit noticed through a pidfd); a PTY adds two things:

- no `fork()` of the daemon (ptyprocess.spawn forks the whole process: 52 ms at 1 GiB RSS) and no
  `preexec_fn`, which forces CPython onto fork: the new session and controlling terminal come from util-linux
  `setsid --ctty` as a tiny launcher that execs the agent (without util-linux, a `preexec_fn` does it, slowly);
- the terminal is set so output is byte-exact (no OPOST, so `\\n` is not turned into `\\r\\n`) with a fixed
  200x50 window.

The process leads its own process group: when it exits, whatever is left of the group (background jobs it
started) is killed before it is reaped, so nothing outlives the agent and the PTY always reaches end of file.
An agent given a `Sandbox` (`numerusd.sandbox`) runs inside bwrap, started by `setsid` in its place, so the PTY
is the sandboxed agent's controlling terminal; its PID namespace ends what left the process group too.

This module is the one place where OS errors of process spawning become `AgentError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import select
import shutil
import signal
import struct
import subprocess
import termios
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from numerusd import processes
from numerusd.errors import AgentError
from numerusd.processes import Child
from numerusd.sandbox import Sandbox

#: The window every agent sees: wide enough that tools do not wrap their output.
COLUMNS = 200
ROWS = 50
_READ_SIZE = 65536
#: How long `wait()` gives the kernel to end what is left in a killed sandbox.
HANG_UP_WAIT_S = 2.0


class Terminal:
    """One spawned process and its PTY master.

    Read its output with `read()` until it returns `b""`, learn how it ended with `wait()`, stop it with
    `terminate()`. The PTY is closed by itself once the output reached its end, and the process (a `Child` leading
    its own process group) is reaped as soon as it exits; `close()` releases everything at once (killing the process
    group if it still runs).
    """

    pid: int
    start_ticks: int

    def __init__(self, child: Child, master_fd: int, start_ticks: int, *, sandboxed: bool = False) -> None:
        self.pid = child.pid
        #: The process is bwrap, which reports an agent a signal ended as exit code 128 + the signal.
        self._sandboxed = sandboxed
        self.start_ticks = start_ticks
        self._child = child
        self._master: int | None = master_fd
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<Terminal pid={self.pid} {state}>"

    @property
    def returncode(self) -> tuple[int | None, int | None] | None:
        """`(exit_code, signal)` once the process has been reaped, else None."""
        code = self._child.returncode
        return None if code is None else _exit_and_signal(code, self._sandboxed)

    async def read(self) -> bytes:
        """The next chunk of output, `b""` once every holder of the PTY's slave side has gone."""
        if self._reading:
            raise RuntimeError("Terminal.read() is already being awaited")
        self._reading = True
        try:
            while self._master is not None:
                try:
                    data = os.read(self._master, _READ_SIZE)
                except BlockingIOError:
                    await self._readable(self._master)
                    continue
                except OSError as e:
                    # Linux reports the hang-up of the last slave holder as EIO: that is the end of output.
                    if e.errno != errno.EIO:
                        raise AgentError(f"cannot read the agent's terminal: {e.strerror}", pid=self.pid) from e
                    data = b""
                if not data:
                    self._close_master()
                return data
            return b""
        finally:
            self._reading = False

    async def write(self, data: bytes, timeout: float) -> int:
        """Type `data` into the terminal (the process's input); how many bytes went in before `timeout` passed
        (a process that does not read fills the PTY's input queue) or the terminal closed."""
        written = 0
        deadline = self._loop.time() + timeout
        while written < len(data) and self._master is not None:
            try:
                written += os.write(self._master, data[written:])
            except BlockingIOError:
                if not await self._writable(self._master, deadline - self._loop.time()):
                    break
            except OSError:  # the terminal hung up under us: what went in is all there is
                break
        return written

    async def wait(self) -> tuple[int | None, int | None]:
        """`(exit_code, None)` when the process exited, `(None, signal)` when a signal killed it."""
        returncode = await self._child.wait()
        if self._sandboxed:
            # bwrap may be gone (killed) while the kernel still tears down its PID namespace: the agent has ended
            # once nothing in there holds its terminal.
            await self._hung_up()
        return _exit_and_signal(returncode, self._sandboxed)

    async def terminate(self, grace: float = 5.0) -> tuple[int | None, int | None]:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds; returns how the process ended."""
        if self._child.returncode is None:
            self._child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._child.wait(), grace)
            except TimeoutError:
                self._child.kill()
        return await self.wait()

    def close(self) -> None:
        """Release the PTY and the pidfd now; a process still running is killed with its group and reaped."""
        self._child.close()
        self._close_master()

    # --- inside ---------------------------------------------------------------------------------------------

    async def _hung_up(self) -> None:
        """Until no process holds the PTY's slave side any more (or HANG_UP_WAIT_S passed)."""
        poller = select.poll()
        deadline = self._loop.time() + HANG_UP_WAIT_S
        while self._master is not None and self._loop.time() < deadline:
            poller.register(self._master, select.POLLHUP)
            if poller.poll(0):
                return
            poller.unregister(self._master)
            await asyncio.sleep(0.002)

    async def _readable(self, fd: int) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._read_waiter = waiter
        self._loop.add_reader(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            self._read_waiter = None
            if self._master == fd:  # else close() has unregistered it already
                self._loop.remove_reader(fd)

    async def _writable(self, fd: int, timeout: float) -> bool:
        """Whether `fd` takes more bytes within `timeout` seconds."""
        if timeout <= 0:
            return False
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._write_waiter = waiter
        self._loop.add_writer(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._write_waiter = None
            if self._master == fd:  # else _close_master has unregistered it already
                self._loop.remove_writer(fd)

    def _close_master(self) -> None:
        if self._master is not None:
            fd, self._master = self._master, None
            if self._read_waiter is not None:
                # A read() is waiting on this descriptor: unregister it before closing, then wake the reader,
                # which finds the terminal closed and returns end of file.
                with contextlib.suppress(RuntimeError):
                    self._loop.remove_reader(fd)
                if not self._read_waiter.done():
                    self._read_waiter.set_result(None)
            if self._write_waiter is not None:  # likewise for a write() waiting for room
                with contextlib.suppress(RuntimeError):
                    self._loop.remove_writer(fd)
                if not self._write_waiter.done():
                    self._write_waiter.set_result(None)
            os.close(fd)


def _exit_and_signal(returncode: int, sandboxed: bool = False) -> tuple[int | None, int | None]:
    """A `subprocess` return code as `(exit_code, None)`, or `(None, signal)` for a process a signal killed; for
    bwrap, an exit code 128 + N is the agent's signal N, as a shell reads it."""
    if sandboxed and returncode > 128 and returncode - 128 in _SIGNALS:
        return None, returncode - 128
    return (returncode, None) if returncode >= 0 else (None, -returncode)


_SIGNALS = frozenset(signal.valid_signals())


def find_program(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The executable `name` stands for, as `spawn` starts it: a path as given, a bare name looked up on the
    `PATH` of `env` (None: the daemon's); None when there is no such executable."""
    search_path = (env if env is not None else os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=search_path)


async def spawn(
    argv: list[str], *, cwd: Path, env: Mapping[str, str] | None = None, sandbox: Sandbox | None = None
) -> Terminal:
    """Start `argv` in `cwd` in a new PTY and session; `env` is its whole environment (None: the daemon's); in
    `sandbox` (bwrap, after the `setsid` launcher, so the PTY is the sandboxed agent's controlling terminal).

    Raises AgentError with a one-line reason when the program cannot be found or started.
    """
    if not argv:
        raise AgentError("cannot start an agent: empty command line")
    if not cwd.is_dir():
        raise AgentError(f"cannot start {argv[0]}: working directory {cwd} does not exist", cwd=str(cwd))
    program = find_program(argv[0], env)
    if program is None:
        raise AgentError(f"cannot start {argv[0]}: no such executable (searched PATH)", program=argv[0])

    # Looked up outside the sandbox, so that a missing program stays one clear line.
    command = [program, *argv[1:]]
    if sandbox is not None:
        command = [*sandbox.for_program(program).prefix(), *command]
    setsid = _setsid_launcher()
    master, slave = os.openpty()
    try:
        _configure_pty(slave)
        os.set_blocking(master, False)
        if setsid is not None:
            # `setsid --ctty` calls setsid() and makes its stdin (our slave) the controlling terminal, then
            # execs the agent; it does not fork, because a child of Popen is never a process group leader.
            child = await processes.start(
                [setsid, "--ctty", "--", *command],
                cwd=cwd,
                env=env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                group=True,
            )
        else:
            popen = subprocess.Popen(
                command,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_take_controlling_terminal,
            )
            child = Child(popen, group=True)
    except OSError as e:
        os.close(master)
        raise AgentError(_spawn_failure(argv[0], e), program=argv[0]) from e
    except ValueError as e:  # Popen's word for an argument or variable holding a NUL byte
        os.close(master)
        raise AgentError(f"cannot start {argv[0]}: {e}", program=argv[0]) from e
    finally:
        os.close(slave)
    return Terminal(child, master, process_start_ticks(child.pid) or 0, sandboxed=sandbox is not None)


def process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def kill_leftover(pid: int, start_ticks: int, grace: float = 2.0) -> bool:
    """Kill an agent's process group left from before a daemon restart, if `pid` is still that process.

    The pid is trusted only if it still has the same `start_ticks`: a pid reused by an unrelated program is
    left alone. SIGTERM goes to the group, SIGKILL after `grace` seconds. True if a process was signalled.

    When the process itself has ended, maybe not all of the agent has: a sandbox's own init (bwrap in its PID
    namespace) can outlive the bwrap that died with the daemon. What is left of the session it led is ended.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return _kill_session_left(pid, start_ticks)
    try:
        # Read the start time after the pidfd is open: the pidfd pins that very process, so a match now
        # cannot turn into a different process by the time the signal is sent.
        stat = _proc_stat(pid)
        if stat is None or stat[1] != start_ticks:
            return False
        if stat[0] in ("Z", "X"):
            return _kill_session_left(pid, start_ticks)
        group = pid if _getpgid(pid) == pid else None
        _signal_leftover(pidfd, group, signal.SIGTERM)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(grace * 1000):
            _signal_leftover(pidfd, group, signal.SIGKILL)
            poller.poll(1000)
        if group is not None:
            # Background jobs of the agent that outlived it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        return True
    finally:
        os.close(pidfd)


# --- helpers -----------------------------------------------------------------------------------------------


@functools.cache
def _setsid_launcher() -> str | None:
    return shutil.which("setsid")


def _configure_pty(slave: int) -> None:
    attrs = termios.tcgetattr(slave)
    # oflag: no output post-processing, so the bytes the agent writes are the bytes we read.
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))


def _take_controlling_terminal() -> None:  # pragma: no cover - runs in the child, only without util-linux
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn_failure(program: str, e: OSError) -> str:
    if e.errno == errno.E2BIG:
        return f"cannot start {program}: command line too long (a prompt over 128 KiB?)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot start {program}: permission denied"
    if e.errno == errno.ENOEXEC:
        return f"cannot start {program}: not an executable format"
    return f"cannot start {program}: {e.strerror or e}"


def _kill_session_left(sid: int, start_ticks: int) -> bool:
    """SIGKILL every process still in the session an agent led (`sid`, its leader's pid, now gone) that started
    no earlier than its leader. While any process is in that session the kernel does not hand its number to a
    new process, so what is found there is the agent's. True if one was signalled."""
    signalled = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        member = int(entry.name)
        try:
            pidfd = os.pidfd_open(member)
        except OSError:
            continue
        try:
            # Read after the pidfd pins the process: the one checked is the one signalled.
            stat = _proc_stat_fields(member)
            if stat is not None and stat.session == sid and stat.start_ticks >= start_ticks and stat.state not in "ZX":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    signalled = True
        finally:
            os.close(pidfd)
    return signalled


class _Stat(NamedTuple):
    state: str
    session: int
    start_ticks: int


def _proc_stat_fields(pid: int) -> _Stat | None:
    """The state, session id and start ticks of a process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last ")" are safe.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Stat(fields[0].decode(), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start ticks) of a process, from /proc/<pid>/stat."""
    stat = _proc_stat_fields(pid)
    return None if stat is None else (stat.state, stat.start_ticks)


def _getpgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _signal_leftover(pidfd: int, group: int | None, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group is not None:
            os.killpg(group, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
