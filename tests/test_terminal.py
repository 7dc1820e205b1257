"""PTY terminals with real processes: byte-exact output, a controlling terminal, exit status, process groups."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from numerusd import terminal as terminal_module
from numerusd.errors import AgentError
from numerusd.terminal import Terminal, kill_leftover, process_start_ticks, spawn
from tests.conftest import eventually

TIMEOUT = 10.0


async def read_all(terminal: Terminal) -> bytes:
    """Everything the process and its children write, up to end of file."""

    async def pump() -> bytes:
        out = b""
        while chunk := await terminal.read():
            out += chunk
        return out

    return await asyncio.wait_for(pump(), TIMEOUT)


async def read_line(terminal: Terminal, buffer: bytearray) -> bytes:
    """The next line the process writes (the rest stays in `buffer`)."""
    while b"\n" not in buffer:
        chunk = await asyncio.wait_for(terminal.read(), TIMEOUT)
        assert chunk, f"end of output before a full line; got {bytes(buffer)!r}"
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in (b"Z", b"X")


async def test_output_is_byte_exact(tmp_path: Path) -> None:
    # Every byte value, and line endings that a terminal would normally rewrite.
    payload = bytes(range(256)) + b"one\ntwo\r\nthree\n"
    (tmp_path / "payload").write_bytes(payload)
    terminal = await spawn(["cat", "payload"], cwd=tmp_path)
    assert await read_all(terminal) == payload
    assert await terminal.wait() == (0, None)


async def test_child_has_the_pty_as_controlling_terminal_and_leads_its_session(tmp_path: Path) -> None:
    probe = (
        "import os; "
        "print(os.ttyname(0), os.isatty(0), os.isatty(1), os.isatty(2)); "
        "os.close(os.open('/dev/tty', os.O_RDWR)); "  # only a process with a controlling terminal can open it
        "print('session', os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), os.tcgetpgrp(0) == os.getpid())"
    )
    terminal = await spawn([sys.executable, "-c", probe], cwd=tmp_path)
    lines = (await read_all(terminal)).decode().splitlines()
    assert await terminal.wait() == (0, None)
    assert lines[0].startswith("/dev/pts/") and lines[0].endswith("True True True"), lines
    assert lines[1] == "session True True True", lines


async def test_window_size_environment_and_working_directory(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "GREETING": "bonjour"}
    terminal = await spawn(["sh", "-c", 'stty size; echo "$GREETING"; pwd'], cwd=tmp_path, env=env)
    assert (await read_all(terminal)).decode().splitlines() == ["50 200", "bonjour", str(tmp_path)]
    assert await terminal.wait() == (0, None)


async def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
    exited = await spawn(["sh", "-c", "exit 7"], cwd=tmp_path)
    killed = await spawn(["sh", "-c", "kill -KILL $$"], cwd=tmp_path)
    assert await asyncio.wait_for(exited.wait(), TIMEOUT) == (7, None)
    assert await asyncio.wait_for(killed.wait(), TIMEOUT) == (None, signal.SIGKILL)
    assert exited.returncode == (7, None)
    assert await read_all(exited) == b"" and await read_all(killed) == b""


async def test_terminate_ends_the_whole_process_group(tmp_path: Path) -> None:
    terminal = await spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"], cwd=tmp_path)
    grandchild = int(await read_line(terminal, bytearray()))
    assert running(grandchild)
    assert await asyncio.wait_for(terminal.terminate(grace=5), TIMEOUT) == (None, signal.SIGTERM)
    assert await read_all(terminal) == b""
    assert not running(terminal.pid)
    await eventually(lambda: not running(grandchild), timeout=5)  # SIGTERM takes a moment to land


async def test_terminate_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    terminal = await spawn(["sh", "-c", "trap '' TERM; echo ready; sleep 100; echo survived"], cwd=tmp_path)
    assert await read_line(terminal, bytearray()) == b"ready"
    assert await asyncio.wait_for(terminal.terminate(grace=0.3), TIMEOUT) == (None, signal.SIGKILL)
    assert b"survived" not in await read_all(terminal)


async def test_background_jobs_do_not_outlive_the_process(tmp_path: Path) -> None:
    # The agent exits on its own, leaving a background job that holds the terminal: it is killed, so the
    # output reaches its end instead of hanging for 100 s.
    terminal = await spawn(["sh", "-c", "sleep 100 & echo $!"], cwd=tmp_path)
    output = await read_all(terminal)
    assert await terminal.wait() == (0, None)
    await eventually(lambda: not running(int(output)), timeout=5)


async def test_close_kills_and_reaps_a_running_process(tmp_path: Path) -> None:
    terminal = await spawn(["sleep", "100"], cwd=tmp_path)
    terminal.close()
    assert terminal.returncode == (None, signal.SIGKILL)
    assert not os.path.exists(f"/proc/{terminal.pid}")  # reaped: no zombie left behind
    assert await terminal.read() == b""


async def test_close_ends_a_pending_read(tmp_path: Path) -> None:
    terminal = await spawn(["sleep", "100"], cwd=tmp_path)
    pending = asyncio.ensure_future(terminal.read())
    await asyncio.sleep(0)  # let the read start waiting on the PTY
    assert not pending.done()
    terminal.close()
    assert await asyncio.wait_for(pending, TIMEOUT) == b""


async def test_kill_leftover_checks_the_start_time_before_killing(tmp_path: Path) -> None:
    terminal = await spawn(["sleep", "100"], cwd=tmp_path)
    assert terminal.start_ticks == process_start_ticks(terminal.pid) > 0
    # A different start time means the pid now belongs to another process: it is left alone.
    assert not await asyncio.to_thread(kill_leftover, terminal.pid, terminal.start_ticks + 1)
    assert running(terminal.pid)
    assert await asyncio.to_thread(kill_leftover, terminal.pid, terminal.start_ticks)
    assert await asyncio.wait_for(terminal.wait(), TIMEOUT) == (None, signal.SIGTERM)


def test_kill_leftover_of_a_process_that_is_not_our_child(tmp_path: Path) -> None:
    # What a restarted daemon finds: an agent from its previous life, leading its own session, not its child.
    launched = subprocess.run(
        ["sh", "-c", "setsid sleep 100 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True, text=True
    )
    pid = int(launched.stdout)
    ticks = process_start_ticks(pid)
    assert ticks is not None and running(pid)
    assert kill_leftover(pid, ticks, grace=5)
    assert not running(pid)
    assert not kill_leftover(pid, ticks)  # already gone
    assert process_start_ticks(2**22 + 1) is None  # above any pid_max
    assert not kill_leftover(2**22 + 1, 1)


async def test_spawn_failures_are_agent_errors_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"cannot start no-such-agent-binary: no such executable"):
        await spawn(["no-such-agent-binary", "exec"], cwd=tmp_path)
    with pytest.raises(AgentError, match=r"working directory .*/missing does not exist"):
        await spawn(["true"], cwd=tmp_path / "missing")
    with pytest.raises(AgentError, match=r"empty command line"):
        await spawn([], cwd=tmp_path)
    # Linux caps one argument at 128 KiB: a huge prompt is refused with a reason, not an OSError.
    with pytest.raises(AgentError, match=r"cannot start echo: command line too long"):
        await spawn(["echo", "x" * 200_000], cwd=tmp_path)
    with pytest.raises(AgentError, match=r"cannot start echo: embedded null byte"):
        await spawn(["echo", "a\0b"], cwd=tmp_path)


async def test_without_util_linux_setsid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback: start_new_session plus TIOCSCTTY in a preexec_fn gives the same terminal, more slowly.
    monkeypatch.setattr(terminal_module, "_setsid_launcher", lambda: None)
    probe = "import os; os.close(os.open('/dev/tty', os.O_RDWR)); print(os.getsid(0) == os.getpid(), os.ttyname(1))"
    terminal = await spawn([sys.executable, "-c", probe], cwd=tmp_path)
    assert (await read_all(terminal)).decode().startswith("True /dev/pts/")
    assert await terminal.wait() == (0, None)
    group = await spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"], cwd=tmp_path)
    grandchild = int(await read_line(group, bytearray()))
    assert await group.terminate(grace=5) == (None, signal.SIGTERM)
    await eventually(lambda: not running(grandchild), timeout=5)


async def test_no_file_descriptor_leaks(tmp_path: Path) -> None:
    async def exercise() -> None:
        done = await spawn(["echo", "hi"], cwd=tmp_path)
        await read_all(done)
        await done.wait()
        stopped = await spawn(["sh", "-c", "echo go; sleep 100"], cwd=tmp_path)
        await read_line(stopped, bytearray())
        await stopped.terminate(grace=2)
        await read_all(stopped)
        abandoned = await spawn(["sleep", "100"], cwd=tmp_path)
        abandoned.close()
        with pytest.raises(AgentError):
            await spawn(["true"], cwd=tmp_path / "missing")

    await exercise()  # the loop may open its own descriptors on first use
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        await exercise()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_same_under_uvloop(tmp_path: Path) -> None:
    # numerusd runs on uvloop; add_reader on the PTY and the pidfd must behave the same there.
    async def scenario() -> None:
        terminal = await spawn(["sh", "-c", "printf 'a\\nb\\n'; exit 3"], cwd=tmp_path)
        assert await read_all(terminal) == b"a\nb\n"
        assert await terminal.wait() == (3, None)
        group = await spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"], cwd=tmp_path)
        grandchild = int(await read_line(group, bytearray()))
        assert await group.terminate(grace=5) == (None, signal.SIGTERM)
        assert await read_all(group) == b""
        await eventually(lambda: not running(grandchild), timeout=5)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_kill_leftover_ends_what_is_left_of_a_session_whose_leader_died(tmp_path: Path) -> None:
    """An agent's sandbox can outlive the process numerusd recorded (bwrap's own init in its PID namespace, when
    the outer bwrap died with the daemon): a restart ends what is left of the session that process led."""
    # A session leader from a daemon's previous life (not our child), with a child that ignores the hang-up its
    # leader's death leaves behind, as a PID namespace's init does.
    child_pid = tmp_path / "child.pid"
    script = f"trap '' HUP; sleep 100 & echo $! > {child_pid}; exec sleep 100"
    launched = subprocess.run(
        ["sh", "-c", f"setsid sh -c {shlex.quote(script)} >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        check=True,
        text=True,
    )
    leader = int(launched.stdout)
    left = 0
    try:
        ticks = process_start_ticks(leader)
        assert ticks is not None
        wait_until(lambda: child_pid.exists() and child_pid.read_text().strip())
        left = int(child_pid.read_text())
        assert running(left) and os.getsid(left) == leader
        os.kill(leader, signal.SIGKILL)  # the leader dies; its child stays in the session
        wait_until(lambda: not running(leader))
        assert running(left)
        assert kill_leftover(leader, ticks)
        wait_until(lambda: not running(left))
        assert not kill_leftover(leader, ticks)  # nothing left
    finally:
        for pid in (left, leader):  # what this test started, by pid, however it ended
            if pid and running(pid):
                os.kill(pid, signal.SIGKILL)


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
