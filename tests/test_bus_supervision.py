"""The embedded nats-server is supervised: killed, it is restarted on the same port and store and the daemon goes
on; while it does not answer, numerusctl says the daemon runs and its bus is down (exit 4), not that there is no
daemon (exit 3)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from numerusd.protocol.exit_codes import CtlExit
from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo
from tests.views_reader import job_views

pytestmark = pytest.mark.slow  # a real daemon, its server killed under it

QUICK = [{"say": "done"}]


async def test_a_killed_server_is_restarted_and_the_daemon_goes_on(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"quick": QUICK}).start() as daemon:
        url = daemon.connection()["url"]
        first = daemon.server_pid()
        os.kill(first, signal.SIGKILL)  # the server this daemon started, by its pid

        def restarted() -> bool:
            try:
                return daemon.server_pid() != first
            except ValueError:  # no ports file yet
                return False

        await eventually(restarted, timeout=20)
        await eventually(lambda: daemon.ctl("status").returncode == 0, timeout=20)
        assert daemon.connection()["url"] == url  # same port: clients' connection file still holds
        repo = git_repo(tmp_path / "repo")
        run = daemon.ctl("--json", "run", "--no-plan", "Go on", "--repo", str(repo), "--agent", "quick", "--wait")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout.splitlines()[0])["job"]
        assert daemon.status(job)["status"] == "completed"
        # The projector's consumer came back too: the views follow the stream again.
        views = daemon.state_dir / "views.sqlite3"
        await eventually(lambda: [view.status for view in job_views(views, job)] == ["completed"], timeout=20)
        assert daemon.ctl("audit", "verify", job, "--finished").returncode == 0  # the store came back whole
        assert "restarted the embedded nats-server" in daemon.stderr()
        assert daemon.stop() == 0


def test_bus_down_is_told_apart_from_no_daemon(tmp_path: Path):
    with Daemon(tmp_path / "state").start() as daemon:
        url = daemon.connection()["url"]
        server = daemon.server_pid()
        os.kill(server, signal.SIGSTOP)  # held down: it accepts no login until it is continued
        try:
            down = daemon.ctl("--timeout", "0.5", "status")
        finally:
            os.kill(server, signal.SIGCONT)
        assert down.returncode == CtlExit.BUS_DOWN
        pid = daemon.process.pid  # type: ignore[union-attr]
        assert down.stderr == (
            f"numerusctl: numerusd (pid {pid}) is running, but its bus at {url} does not answer (timed out); "
            "an embedded server is restarted by numerusd itself: try again shortly\n"
        )
        assert daemon.ctl("status").returncode == 0
        connection = (daemon.state_dir / "connection.json").read_bytes()
        assert daemon.stop() == 0
    (daemon.state_dir / "connection.json").write_bytes(connection)  # as a daemon killed with -9 leaves it
    gone = daemon.ctl("--timeout", "0.5", "status")
    assert gone.returncode == CtlExit.UNREACHABLE
    assert f"numerusd pid {pid} from {daemon.state_dir / 'connection.json'} is not running" in gone.stderr
