"""A NATS outage mid-job: the job goes on, every event reaches the stream exactly once, in chain order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import eventually, restartable
from tests.daemon_harness import Daemon, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs a job through a NATS restart

#: An agent that keeps talking for a while, so events are appended while the server is down.
CHATTY = [step for i in range(12) for step in ({"say": f"step {i} of 12"}, {"sleep": 0.25})]


async def test_the_job_survives_a_server_restart_and_nothing_is_lost_or_doubled(nats_server, tmp_path: Path):
    env = {
        "NUMERUS_NATS_URL": nats_server.url,
        "NUMERUS_NATS_USER": nats_server.user,
        "NUMERUS_NATS_PASSWORD": nats_server.password,
    }
    daemon = Daemon(tmp_path / "state", agents={"chatty": CHATTY}, env=env).start()
    try:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl_json("run", "--no-plan", "Talk", "--repo", str(repo), "--agent", "chatty")["job"]
        log = daemon.state_dir / "runs" / job / "t1" / "attempt-1.log"
        with restartable(nats_server) as (stop_server, start_server):
            await eventually(lambda: log.exists() and b"step 2 of 12" in log.read_bytes(), timeout=20)
            await stop_server()
            await eventually(lambda: b"step 6 of 12" in log.read_bytes(), timeout=20)  # talked while NATS was down
            assert daemon.alive
            await start_server()
            await eventually(lambda: daemon.ctl("status", job).returncode == 0, timeout=20)
            async with daemon.client() as client:
                await client.wait_for(job, lambda view: view["status"] == "completed", timeout=30)
            events = daemon.events(job)
            texts = [e["data"]["text"] for e in events if e["type"] == "AgentMessageReceived"]
            assert texts == [f"step {i} of 12" for i in range(12)]  # every message, once, in order
            ids = [e["id"] for e in events]
            assert len(ids) == len(set(ids))
            assert events[-1]["type"] == "JobCompleted"
            assert daemon.ctl("audit", "verify", job).returncode == 0  # the chain is whole and in order
            assert daemon.stop() == 0
    finally:
        daemon.stop()
