"""`numerusctl kill`: the agent's whole process group is stopped and the job reads `killed`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo

SLOW = [{"say": "starting a long build"}, {"run": "sleep 300 & sleep 300"}, {"say": "never printed"}]


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", agents={"slow": SLOW}, env={"NUMERUS_KILL_GRACE_S": "2"}).start()
    yield d
    d.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_kill_stops_the_agent_and_its_children_and_wait_exits_1(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    waiting = subprocess.Popen(
        daemon.ctl_argv("run", "--no-plan", "Build forever", "--repo", str(repo), "--agent", "slow", "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    await eventually(lambda: bool(daemon.ctl_json("status")["jobs"]), timeout=20)
    job = daemon.ctl_json("status")["jobs"][0]["id"]
    await eventually(lambda: b"sleep 300" in log_bytes(daemon, job), timeout=20)
    pid = daemon.status(job)["tasks"][0]["pid"]
    group = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
    assert len(group) >= 3  # the agent, its shell, and the sleeps

    started = time.monotonic()
    result = daemon.ctl("kill", job)
    assert result.returncode == 0, result.stderr
    assert "t1" in result.stdout
    await eventually(lambda: daemon.status(job)["status"] == "killed", timeout=15)
    assert time.monotonic() - started < 10
    assert not [p for p in group if pid_alive(p)]
    task = daemon.status(job)["tasks"][0]
    assert task["status"] == "killed"
    out, err = waiting.communicate(timeout=20)
    assert waiting.returncode == 1, out + err

    again = daemon.ctl("kill", job)
    assert again.returncode == 1
    assert "already killed" in again.stderr
    types = [event["type"] for event in daemon.events(job)]
    assert types[-4:] == ["KillRequested", "TaskExited", "TaskKilled", "JobKilled"]


def test_kill_of_unknown_job_is_refused(daemon: Daemon):
    result = daemon.ctl("kill", "01NOSUCHJOB0000000000000000")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no job" in result.stderr


def log_bytes(daemon: Daemon, job: str) -> bytes:
    path = daemon.state_dir / "runs" / job / "t1" / "attempt-1.log"
    return path.read_bytes() if path.exists() else b""


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
