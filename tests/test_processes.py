"""numerusd.processes: the daemon's one way to start a child, against real processes (terminals and git use it too)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import uvloop

from numerusd import processes
from tests.conftest import eventually
from tests.test_terminal import running


async def test_run_reads_stdout_and_stderr_apart_however_much_is_written(tmp_path: Path) -> None:
    # Far more than a pipe holds: both pipes are drained while the child writes.
    write = "import sys; sys.stdout.write('o' * 2**20); sys.stderr.write('e' * 2**20); sys.exit(4)"
    completed = await processes.run([sys.executable, "-c", write], cwd=tmp_path, timeout=30)
    assert completed == processes.Completed(4, b"o" * 2**20, b"e" * 2**20)


async def test_run_kills_a_child_out_of_time_and_reaps_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        await processes.run(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 100"], timeout=0.5)
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped: not even a zombie left


async def test_a_child_is_reaped_when_it_exits_whether_or_not_it_is_awaited(tmp_path: Path) -> None:
    child = await processes.start(["sh", "-c", "exit 7"], cwd=tmp_path)
    await eventually(lambda: child.returncode is not None, timeout=10)
    assert child.returncode == 7
    assert not os.path.exists(f"/proc/{child.pid}")
    killed = await processes.start(["sleep", "100"], new_session=True)
    killed.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(killed.wait(), 10) == -signal.SIGTERM
    assert not running(killed.pid)


async def test_no_file_descriptor_leaks(tmp_path: Path) -> None:
    async def exercise() -> None:
        await processes.run(["echo", "hi"], timeout=30)
        await processes.run(["sh", "-c", "echo hi >&2"], merge_stderr=True, new_session=True, timeout=30)
        with pytest.raises(TimeoutError):
            await processes.run(["sleep", "100"], timeout=0.05)
        with pytest.raises(FileNotFoundError):
            await processes.run(["no-such-program-anywhere"], timeout=30)
        abandoned = await processes.start(["sleep", "100"])
        abandoned.close()

    await exercise()  # the loop may open its own descriptors on first use
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        await exercise()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_the_same_under_uvloop(tmp_path: Path) -> None:
    # numerusd runs on uvloop; add_reader on the pipes and the pidfd must behave the same there.
    async def scenario() -> None:
        completed = await processes.run(["sh", "-c", "echo out; echo err >&2; exit 2"], timeout=30)
        assert completed == processes.Completed(2, b"out\n", b"err\n")
        with pytest.raises(TimeoutError):
            await processes.run(["sleep", "100"], timeout=0.2, new_session=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
