"""The one way Numerus starts a child process and learns that it ended: agents' terminals, git, check commands.

Starting a process must stay cheap however large the daemon grows (`bench/bench_spawn.py`, docs/git.md), so:

- no `fork()` of the daemon: `subprocess.Popen` without a `preexec_fn` spawns with vfork, as cheap at 1 GiB
  resident as at 50 MiB. asyncio's subprocesses fork the whole daemon under uvloop: 5.7 ms per
  `git rev-parse` at 0 and 33.5 ms at 1 GiB resident, against 2.3 ms and 3.1 ms this way (git 2.39).
- `Popen` runs in a worker thread: it lets go of the GIL while its vfork child gets to its exec, which on a machine
  busy with agents can take milliseconds the event loop would otherwise spend blocked. `os.posix_spawn` costs the
  daemon less CPU (0.3 ms against 0.95) but keeps the GIL until the child execs, which with 16 agents on 2 cores
  stalled the event loop for a second in all over a 64-task job.
- no asyncio transports and no child-watcher threads: the child's pipes and a pidfd are registered with the
  event loop, and the child is reaped with `waitpid(WNOHANG)` as soon as its pidfd says it exited, whether or not
  anybody awaits it, so no zombie outlives it.

`start()` spawns and returns a `Child` to watch; `run()` also collects the output of a child that reads nothing,
for git and check commands. A child that leads its own process group (`group`) takes the rest of its group with
it when it exits: background jobs it started are killed before it is reaped, so nothing outlives it and its output
reaches end of file. OS errors are raised as they are: the caller knows what it was starting (`terminal.py` makes
them `AgentError`, `numerusd.git` `GitError`).

`DAEMON_ONLY_ENV` is what of the daemon's environment agents and check commands must not inherit;
`inherited_environment()` is the rest. (Git gets an environment of its own making, `numerusd.git.command`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: The daemon's own environment that an agent or a check command must not inherit: its NATS secrets and systemd's
#: sockets.
DAEMON_ONLY_ENV = frozenset(
    {"NUMERUS_NATS_PASSWORD", "NUMERUS_NATS_CREDS", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"}
)

_READ_SIZE = 65536

#: What `Popen` takes for a standard stream: a file descriptor, a file, `subprocess.DEVNULL` or `PIPE`, or None.
Stream = int | IO[bytes] | None


def inherited_environment() -> dict[str, str]:
    """The daemon's environment without `DAEMON_ONLY_ENV`: what agents and check commands start from."""
    return {name: value for name, value in os.environ.items() if name not in DAEMON_ONLY_ENV}


class Child:
    """A started process, watched through a pidfd by the event loop, and reaped as soon as it exits.

    `returncode` follows `subprocess`: the exit code, or minus the signal that killed it; None while it runs.
    With `group` the child leads its own process group (it was started in a new session, or by a launcher such as
    `setsid` that makes one): signals go to the whole group, and when the child exits, whatever is left of the group
    is killed before the child is reaped.
    """

    pid: int

    def __init__(self, popen: subprocess.Popen[bytes], *, group: bool) -> None:
        """Watch `popen`, which must not have been waited for; if it cannot be watched it is killed and reaped."""
        self.pid = popen.pid
        self._popen = popen
        self._group = group
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            raise
        # Watched from the start, so the child is reaped as soon as it exits even when nobody awaits wait().
        self._loop.add_reader(self._pidfd, self._on_pidfd_readable)
        self._on_pidfd_readable()

    def __repr__(self) -> str:
        state = "running" if not self._exited.done() else f"exited {self._exited.result()}"
        return f"<Child pid={self.pid} {state}>"

    @property
    def returncode(self) -> int | None:
        """The exit code, or minus the signal that killed the child, once it has been reaped; else None."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """Wait until the child has exited and been reaped; its `returncode`. Cancelling the wait leaves it running."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the child (to its whole process group with `group`); nothing once it has been reaped."""
        if self._exited.done():
            return
        if self._group:
            # Right after it started, the child of a launcher may not have called setsid() yet, so there is no
            # such group: then it is alone, and signalled alone (its pid cannot be reused before it is reaped).
            try:
                os.killpg(self.pid, sig)
                return
            except ProcessLookupError:
                pass
            except PermissionError:
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the child (and its group); it is reaped by the event loop a moment later."""
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Stop watching now: a child still running is killed (with its group) and reaped before this returns."""
        if not self._exited.done():
            self.kill()
            # SIGKILL cannot be caught, so this blocking reap is short.
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
                self._set_exited(os.waitstatus_to_exitcode(status))
        self._close_pidfd()

    # --- inside ---------------------------------------------------------------------------------------------

    def _on_pidfd_readable(self) -> None:
        if self._group:
            # Look without reaping first: while the exited leader is a zombie its pid, and so its process group
            # id, cannot be reused, so sweeping the group can only hit the child's own leftovers.
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self._reaped_elsewhere()
                return
            if info is None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._reaped_elsewhere()
            return
        if pid:
            self._set_exited(os.waitstatus_to_exitcode(status))
            self._close_pidfd()

    def _reaped_elsewhere(self) -> None:
        # Reaped behind our back (nobody should): report what Popen knows rather than spin on the pidfd. A status
        # that is lost is reported as a kill, which no caller takes for success.
        code = self._popen.returncode
        if not self._exited.done():
            self._exited.set_result(code if code is not None else -signal.SIGKILL)
        self._close_pidfd()

    def _set_exited(self, returncode: int) -> None:
        # Tell Popen the child is reaped, so it never waits on a pid that may belong to someone else by then.
        self._popen.returncode = returncode
        if not self._exited.done():
            self._exited.set_result(returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def start(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: Stream = subprocess.DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
    new_session: bool = False,
    group: bool = False,
) -> Child:
    """Start `argv` (`env` is its whole environment; None: the daemon's) and watch it.

    OSError when it cannot start (no such program or directory, …), ValueError for a NUL byte in an argument.

    `new_session` starts it as the leader of a new session and process group; `group` says it leads one of its own
    some other way (a `setsid` launcher). A caller cancelled while the child starts still waits for the worker thread
    (the file descriptors handed to the child must outlive it), then kills and reaps what was started.
    """
    spawning = asyncio.ensure_future(
        asyncio.to_thread(
            subprocess.Popen,
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
        )
    )
    try:
        popen: subprocess.Popen[bytes] = await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            started = await spawning
            try:
                if new_session or group:
                    os.killpg(started.pid, signal.SIGKILL)
                else:
                    started.kill()
            except ProcessLookupError:
                started.kill()  # a launcher that has not made its group yet: the child alone
            started.wait()
        raise
    return Child(popen, group=new_session or group)


@dataclass(frozen=True, slots=True)
class Completed:
    """A child `run()` saw to its end: its `returncode` (as `Child.returncode`), its output and its error output."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
    new_session: bool = False,
    keep_last: int | None = None,
    copy_to: Callable[[bytes], None] | None = None,
) -> Completed:
    """Run `argv` with stdin from /dev/null to its end: its exit, its stdout and its stderr read to end of file.

    `merge_stderr` sends both to one pipe, read as `stdout` in the order written (`stderr` is then empty).
    `new_session` makes the child lead a new session and process group, killed whole when it exits (see `Child`).
    After `timeout` seconds the child (with `new_session`, its group) is killed and reaped: TimeoutError. A cancelled
    caller kills it likewise; it is reaped by the event loop a moment later. `keep_last` keeps only the last that
    many bytes of each stream (a check running an agent's code may print without end; its tail is what is read);
    `copy_to` is given every piece of output as it is read, all of it (a check's log file).
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe() if not merge_stderr else (-1, out_w)
    try:
        child = await start(argv, cwd=cwd, env=env, stdout=out_w, stderr=err_w, new_session=new_session)
    except BaseException:
        os.close(out_r)
        if err_r != -1:
            os.close(err_r)
        raise
    finally:
        os.close(out_w)
        if err_w != out_w:
            os.close(err_w)
    fds = (out_r,) if err_r == -1 else (out_r, err_r)
    output: dict[int, list[bytes]] = {fd: [] for fd in fds}
    held: dict[int, int] = dict.fromkeys(fds, 0)
    reading = set(fds)
    ended = loop.create_future()

    def readable(fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if data:
            if copy_to is not None:
                copy_to(data)
            output[fd].append(data)
            held[fd] += len(data)
            if keep_last is not None and held[fd] > 2 * keep_last:  # trimmed now and then: linear in the bytes
                kept = b"".join(output[fd])[-keep_last:]
                output[fd], held[fd] = [kept], len(kept)
            return
        loop.remove_reader(fd)
        reading.discard(fd)
        if not reading and not ended.done():
            ended.set_result(None)

    for fd in fds:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable, fd)
    try:
        async with asyncio.timeout(timeout):
            await ended
            returncode = await child.wait()
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    except asyncio.CancelledError:
        child.kill()
        raise
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)

    def text(fd: int) -> bytes:
        whole = b"".join(output[fd])
        return whole if keep_last is None else whole[-keep_last:]

    return Completed(returncode, text(out_r), text(err_r) if err_r != -1 else b"")
