"""Stopping numerusd: the first SIGTERM asks for a graceful stop, a second one forces it.

The real daemon, with an agent that ignores SIGTERM: a graceful stop gives it `kill_grace_s` (a minute here)
to end; the second signal kills it at once, and the daemon still records its job and exits cleanly.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo
from tests.test_kill import pid_alive

pytestmark = pytest.mark.slow  # a real daemon runs a job

STUBBORN = """#!/bin/sh
trap '' TERM
echo "ignoring SIGTERM"
exec sleep 300
"""


async def test_a_second_signal_forces_the_stop_and_the_job_is_still_recorded_interrupted(tmp_path: Path):
    agent = tmp_path / "stubborn-codex"
    agent.write_text(STUBBORN)
    agent.chmod(0o755)
    config = f'kill_grace_s = 60\nresume = "manual"\n[agents.stubborn]\nkind = "codex"\nbinary = "{agent}"\n'
    daemon = Daemon(tmp_path / "state", config=config).start()
    repo = git_repo(tmp_path / "repo")
    job = daemon.ctl_json("run", "--no-plan", "Never stop", "--repo", str(repo), "--agent", "stubborn")["job"]
    log = daemon.state_dir / "runs" / job / "t1" / "attempt-1.log"
    await eventually(lambda: log.exists() and b"ignoring SIGTERM" in log.read_bytes(), timeout=20)
    agent_pid = daemon.status(job)["tasks"][0]["pid"]
    process = daemon.process
    assert process is not None

    process.send_signal(signal.SIGTERM)
    await eventually(lambda: "a second signal kills them now" in daemon.stderr(), timeout=10)
    assert process.poll() is None and Path(f"/proc/{agent_pid}").exists()  # waiting for the agent, as asked

    forced = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert time.monotonic() - forced < 15  # not the minute of grace
    await eventually(lambda: not pid_alive(agent_pid), timeout=10)

    daemon.process = None
    daemon.log.close()
    daemon.start()
    try:
        view = daemon.status(job)
        assert (view["status"], view["tasks"][0]["status"]) == ("interrupted", "interrupted")
        exited = [event["data"] for event in daemon.events(job) if event["type"] == "TaskExited"]
        assert [e["signal"] for e in exited] == [signal.SIGKILL]
        assert daemon.ctl("audit", "verify", job).returncode == 0
    finally:
        daemon.stop()
