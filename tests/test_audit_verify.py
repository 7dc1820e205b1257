"""`numerusctl audit verify` against a real daemon's stream: intact history passes, a forged event is named."""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from numerusd.views.dump import dump
from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo
from tests.test_run import HELLO

pytestmark = pytest.mark.slow  # a real daemon runs a job, then the stream is forged and verified


async def test_verify_passes_then_names_a_forged_event_and_the_daemon_shrugs_it_off(tmp_path: Path):
    daemon = Daemon(tmp_path / "state", agents={"scripted": HELLO}).start()
    try:
        repo = git_repo(tmp_path / "repo")
        assert (
            daemon.ctl("run", "--no-plan", "Greet", "--repo", str(repo), "--agent", "scripted", "--wait").returncode
            == 0
        )
        job = daemon.ctl_json("status")["jobs"][0]["id"]
        result = daemon.ctl("audit", "verify")
        assert result.returncode == 0, result.stdout + result.stderr
        assert daemon.ctl("audit", "verify", job).returncode == 0

        genuine = daemon.events(job)[-1]
        forged = {**genuine, "id": "01FORGEDFORGEDFORGEDFORGED", "type": "JobFailed", "data": {"reason": "forged"}}
        c = daemon.connection()
        nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
        try:
            ack = await nc.jetstream().publish(f"numerus.job.{job}.job_failed", json.dumps(forged).encode())
        finally:
            await nc.close()

        result = daemon.ctl("audit", "verify", job)
        assert result.returncode == 1
        assert "01FORGEDFORGEDFORGEDFORGED" in result.stdout + result.stderr
        assert str(ack.seq) in result.stdout + result.stderr

        # The daemon did not believe it: the job is still completed, the views ignore it, the DLQ keeps it.
        assert daemon.alive
        assert daemon.status(job)["status"] == "completed"

        async def rejected() -> bool:
            rows = await dump(daemon.state_dir / "views.sqlite3")
            return any(row[0] == ack.seq for row in rows["rejected"])

        await eventually(rejected, timeout=10)
        views = await dump(daemon.state_dir / "views.sqlite3")
        assert next(row for row in views["jobs"] if row[0] == job)[4] == "completed"
        # The projector reported it, and the daemon dead-lettered it under the reason the views recorded.
        [(_, _, reason, _)] = [row for row in views["rejected"] if row[0] == ack.seq]
        nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
        try:
            dead = await nc.jetstream().get_last_msg("NUMERUS_DLQ", f"numerus.dlq.projector.{reason}")
        finally:
            await nc.close()
        assert dead.headers["Numerus-Seq"] == str(ack.seq)
        assert dead.data == json.dumps(forged).encode()
    finally:
        daemon.stop()

    daemon.start()  # and a restart folds the stream without it
    try:
        assert daemon.status(job)["status"] == "completed"
    finally:
        daemon.stop()
