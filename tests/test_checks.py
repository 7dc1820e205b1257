"""numerusd.checks: a check command of the quality gate, run for real in a directory, with its process group."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from numerusd.checks import KEEP_BYTES, run_check
from tests.conftest import eventually
from tests.test_terminal import running


async def test_a_check_runs_in_its_directory_with_stdout_and_stderr_as_one_text(tmp_path: Path) -> None:
    command = "pwd; echo out; echo err >&2; echo out again; exit 3"
    exit_code, output, duration = await run_check(tmp_path, command, timeout=30)
    assert exit_code == 3
    assert output == f"{tmp_path}\nout\nerr\nout again\n"
    assert 0 < duration < 30


async def test_a_check_that_prints_without_end_costs_the_daemon_only_its_tail(tmp_path: Path) -> None:
    # 200 MB of output (a test the agent wrote, say): the daemon keeps the last KEEP_BYTES, the end intact.
    command = "head -c 200000000 /dev/zero | tr '\\0' x; echo; echo the end"
    exit_code, output, _ = await run_check(tmp_path, command, timeout=120)
    assert exit_code == 0
    assert len(output) == KEEP_BYTES and output.endswith("x\nthe end\n")


async def test_a_check_does_not_see_the_daemons_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMERUS_NATS_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("NUMERUS_TEST_VISIBLE", "shown")
    exit_code, output, _ = await run_check(tmp_path, "env", timeout=30)
    assert exit_code == 0
    assert "NUMERUS_TEST_VISIBLE=shown" in output
    assert "hunter2-secret" not in output and "NOTIFY_SOCKET" not in output


async def test_a_check_out_of_time_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"sleep 100 & echo $! > {pids}; echo started; sleep 100"
    exit_code, output, duration = await run_check(tmp_path, command, timeout=0.5)
    assert (exit_code, output) == (None, "stopped after 0.5 s")
    assert 0.5 <= duration < 10
    background = int(pids.read_text())
    await eventually(lambda: not running(background), timeout=5)


async def test_a_cancelled_check_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"sleep 100 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; sleep 100"
    check = asyncio.ensure_future(run_check(tmp_path, command, timeout=60))
    await eventually(pids.exists, timeout=10)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    for pid in map(int, pids.read_text().split()):
        await eventually(lambda pid=pid: not running(pid), timeout=5)


async def test_what_a_check_leaves_running_ends_with_it(tmp_path: Path) -> None:
    # A background job holding the output open would keep the check waiting for its timeout; one with its
    # output elsewhere would outlive the gate. Neither: the shell's exit ends its process group.
    pids = tmp_path / "pids"
    command = f"sleep 100 & echo $! > {pids}; sleep 100 >/dev/null 2>&1 & echo $! >> {pids}; echo done"
    exit_code, output, duration = await run_check(tmp_path, command, timeout=60)
    assert (exit_code, output) == (0, "done\n")
    assert duration < 30
    for pid in map(int, pids.read_text().split()):
        await eventually(lambda pid=pid: not running(pid), timeout=5)


async def test_a_check_in_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run_check(tmp_path / "missing", "true", timeout=30)
