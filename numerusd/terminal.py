"""PTY terminals: one agent process in its own pseudo-terminal, session and process group.

`spawn()` starts a process whose stdin, stdout and stderr are the slave side of a fresh PTY, as the leader of a
new session with that PTY as its controlling terminal; the daemon keeps the master side and reads it without
blocking the event loop. Spawning must stay cheap however large the daemon grows, so:

- no `fork()` of the daemon (ptyprocess.spawn forks the whole process: 52 ms at 1 GiB RSS) and no
  `preexec_fn`, which forces CPython onto fork: `subprocess.Popen` then uses vfork (called in a worker thread,
  so that the event loop does not wait for the child to reach its exec), and the new session and controlling
  terminal come from util-linux `setsid --ctty` as a tiny launcher that execs the agent;
- no asyncio subprocess transports (three times slower under uvloop) and no child-watcher threads: exit is
  noticed through a pidfd registered with the loop, and reaped with `waitpid(WNOHANG)`.

The terminal is set so output is byte-exact (no OPOST, so `\\n` is not turned into `\\r\\n`) with a fixed
200x50 window. When the process exits, whatever is left of its process group (background jobs it started) is
killed before it is reaped, so nothing outlives the agent and the PTY always reaches end of file.

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
from collections.abc import Callable, Mapping
from pathlib import Path

from numerusd.errors import AgentError

#: The window every agent sees: wide enough that tools do not wrap their output.
COLUMNS = 200
ROWS = 50
_READ_SIZE = 65536


class Terminal:
    """One spawned process, its PTY master and its pidfd.

    Read its output with `read()` until it returns `b""`, learn how it ended with `wait()`, stop it with
    `terminate()`. Both file descriptors are closed by themselves once the output reached its end and the
    process was reaped; `close()` releases everything at once (killing the process group if it still runs).
    """

    pid: int
    start_ticks: int

    def __init__(self, popen: subprocess.Popen[bytes], master_fd: int, pidfd: int, start_ticks: int) -> None:
        self.pid = popen.pid
        self.start_ticks = start_ticks
        self._popen = popen
        self._master: int | None = master_fd
        self._pidfd: int | None = pidfd
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[tuple[int | None, int | None]] = self._loop.create_future()
        self._reading = False
        self._read_waiter: asyncio.Future[None] | None = None
        # The pidfd is watched from the start, so the process is reaped as soon as it exits even when nobody
        # awaits wait(): no zombie outlives its terminal.
        self._loop.add_reader(pidfd, self._on_pidfd_readable)
        self._on_pidfd_readable()

    def __repr__(self) -> str:
        state = "running" if not self._exited.done() else f"exited {self._exited.result()}"
        return f"<Terminal pid={self.pid} {state}>"

    @property
    def returncode(self) -> tuple[int | None, int | None] | None:
        """`(exit_code, signal)` once the process has been reaped, else None."""
        return self._exited.result() if self._exited.done() else None

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

    async def wait(self) -> tuple[int | None, int | None]:
        """`(exit_code, None)` when the process exited, `(None, signal)` when a signal killed it."""
        return await asyncio.shield(self._exited)

    async def terminate(self, grace: float = 5.0) -> tuple[int | None, int | None]:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds; returns how the process ended."""
        if not self._exited.done():
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), grace)
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
        return await self.wait()

    def close(self) -> None:
        """Release the PTY and the pidfd now; a process still running is killed with its group and reaped."""
        if not self._exited.done():
            self._signal_group(signal.SIGKILL)
            # SIGKILL cannot be caught, so this blocking reap is short.
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
                self._set_exited(status)
        self._close_pidfd()
        self._close_master()

    # --- inside ---------------------------------------------------------------------------------------------

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

    def _on_pidfd_readable(self) -> None:
        # Look without reaping first: while the exited leader is a zombie its pid, and so its process group
        # id, cannot be reused, so sweeping the group below can only hit the agent's own leftovers.
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Reaped behind our back (nobody should): report what is known rather than spin on the pidfd.
            self._set_exited_from_returncode()
            self._close_pidfd()
            return
        if info is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._set_exited_from_returncode()
        else:
            self._set_exited(status)
        self._close_pidfd()

    def _set_exited(self, status: int) -> None:
        if os.WIFSIGNALED(status):
            result: tuple[int | None, int | None] = (None, os.WTERMSIG(status))
        else:
            result = (os.waitstatus_to_exitcode(status), None)
        # Tell Popen the child is reaped, so it never waits on a pid that may belong to someone else by then.
        self._popen.returncode = result[0] if result[0] is not None else -(result[1] or 0)
        if not self._exited.done():
            self._exited.set_result(result)

    def _set_exited_from_returncode(self) -> None:
        code = self._popen.returncode
        if not self._exited.done():
            self._exited.set_result((None, None) if code is None else (code, None) if code >= 0 else (None, -code))

    def _signal_group(self, sig: signal.Signals) -> None:
        # The process leads its own session, so its process group id is its pid. Right after spawn the child
        # may not have called setsid() yet, so there is no such group: then it is alone, and signalled alone
        # (its pid cannot be reused before we reap it).
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            if self._popen.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
        except PermissionError:
            pass

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

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
            os.close(fd)


async def spawn(argv: list[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> Terminal:
    """Start `argv` in `cwd` in a new PTY and session; `env` is its whole environment (None: the daemon's).

    Raises AgentError with a one-line reason when the program cannot be found or started.
    """
    if not argv:
        raise AgentError("cannot start an agent: empty command line")
    if not cwd.is_dir():
        raise AgentError(f"cannot start {argv[0]}: working directory {cwd} does not exist", cwd=str(cwd))
    search_path = (env if env is not None else os.environ).get("PATH", os.defpath)
    program = shutil.which(argv[0], path=search_path)
    if program is None:
        raise AgentError(f"cannot start {argv[0]}: no such executable (searched PATH)", program=argv[0])

    setsid = _setsid_launcher()
    master, slave = os.openpty()
    try:
        _configure_pty(slave)
        os.set_blocking(master, False)
        if setsid is not None:
            # `setsid --ctty` calls setsid() and makes its stdin (our slave) the controlling terminal, then
            # execs the agent; it does not fork, because a child of Popen is never a process group leader.
            start = functools.partial(
                subprocess.Popen,
                [setsid, "--ctty", "--", program, *argv[1:]],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
            )
            popen = await _in_thread(start)
        else:
            popen = subprocess.Popen(
                [program, *argv[1:]],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_take_controlling_terminal,
            )
    except OSError as e:
        os.close(master)
        raise AgentError(_spawn_failure(argv[0], e), program=argv[0]) from e
    except ValueError as e:  # Popen's word for an argument or variable holding a NUL byte
        os.close(master)
        raise AgentError(f"cannot start {argv[0]}: {e}", program=argv[0]) from e
    finally:
        os.close(slave)

    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as e:
        os.close(master)
        popen.kill()
        popen.wait()
        raise AgentError(f"cannot watch {argv[0]}: pidfd_open failed: {e.strerror}") from e
    return Terminal(popen, master, pidfd, process_start_ticks(popen.pid) or 0)


async def _in_thread(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run `start` in a worker thread: `subprocess` lets go of the GIL while its vfork child gets to its exec,
    which on a busy machine takes milliseconds the event loop would otherwise spend blocked.

    A caller cancelled meanwhile still waits for the thread (its file descriptors must outlive it), then kills
    and reaps what it started.
    """
    started = asyncio.ensure_future(asyncio.to_thread(start))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            popen = await started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
        raise


def process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def kill_leftover(pid: int, start_ticks: int, grace: float = 2.0) -> bool:
    """Kill an agent's process group left from before a daemon restart, if `pid` is still that process.

    The pid is trusted only if it still has the same `start_ticks`: a pid reused by an unrelated program is
    left alone. SIGTERM goes to the group, SIGKILL after `grace` seconds. True if the process was signalled.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        # Read the start time after the pidfd is open: the pidfd pins that very process, so a match now
        # cannot turn into a different process by the time the signal is sent.
        stat = _proc_stat(pid)
        if stat is None or stat[1] != start_ticks or stat[0] in ("Z", "X"):
            return False
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


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start ticks) of a process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last ")" are safe.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


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
