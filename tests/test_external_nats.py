"""With --nats-url, numerusd and numerusctl use an existing server instead of starting their own."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.daemon_harness import BIN, Daemon, git_repo
from tests.test_run import HELLO

pytestmark = pytest.mark.slow  # a daemon running jobs, and one trying for seconds to reach a server that is not there


def test_a_job_runs_against_an_existing_server(nats_server, tmp_path: Path):
    env = {
        "NUMERUS_NATS_URL": nats_server.url,
        "NUMERUS_NATS_USER": nats_server.user,
        "NUMERUS_NATS_PASSWORD": nats_server.password,
    }
    agent = [*HELLO, {"run": "env"}]
    planned = '[agents.planned]\nkind = "scripted"\n'  # the scripted agent's own scenario: every role answers
    daemon = Daemon(tmp_path / "state", agents={"scripted": agent}, env=env, config=planned).start()
    try:
        assert not (daemon.state_dir / "nats").exists()  # no embedded server was started
        assert daemon.connection()["url"] == nats_server.url
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "--no-plan", "Greet", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert result.returncode == 0, result.stderr
        assert (repo / "HELLO.md").exists()
        (listed,) = daemon.ctl_json("status")["jobs"]
        job = daemon.status(listed["id"])
        agent_saw = Path(job["tasks"][0]["log_path"]).read_text()
        assert "HOME=" in agent_saw  # the agent got an environment...
        assert nats_server.password not in agent_saw  # ...but not the daemon's NATS password

        # Nor do a planned job's check commands, which run in the task's worktree.
        result = daemon.ctl("run", "Greet", "--repo", str(repo), "--agent", "planned", "--check", "env", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.splitlines()[0].strip()
        (check,) = [e["data"] for e in daemon.events(job) if e["type"] == "CheckCompleted"]
        assert "HOME=" in check["output"] and nats_server.password not in check["output"]
    finally:
        assert daemon.stop() == 0
    assert nats_server.process is not None and nats_server.process.poll() is None  # not ours to stop


def test_unreachable_server_fails_startup_with_one_clear_line(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    result = subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "state"), "--nats-url", f"nats://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 69
    assert f"cannot connect to NATS at nats://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
