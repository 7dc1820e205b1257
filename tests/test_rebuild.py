"""`numerusd rebuild`: the views replayed from the stream equal the live views exactly."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from numerusd.projections import dump
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git_repo
from tests.test_run import HELLO


def rebuild(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(daemon.state_dir), "rebuild", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def projected(daemon: Daemon, events: int) -> bool:
    rows = await dump(daemon.state_dir / "views.sqlite3")
    return len(rows["events"]) == events


async def test_rebuild_equals_live_views_and_status_is_unchanged(tmp_path: Path):
    daemon = Daemon(tmp_path / "state", agents={"scripted": HELLO, "failing": [{"exit": 1}]}).start()
    try:
        for agent in ("scripted", "failing", "scripted"):
            repo = git_repo(tmp_path / f"repo-{agent}-{len(daemon.ctl_json('status')['jobs'])}")
            daemon.ctl("run", "--no-plan", "Write a greeting", "--repo", str(repo), "--agent", agent, "--wait")
        statuses = daemon.ctl_json("status")
        total = sum(job["events"] for job in statuses["jobs"])
        await eventually(lambda: projected(daemon, total), timeout=20)

        result = rebuild(daemon)  # the daemon holds the views: refused, with what to do instead
        assert result.returncode == 78
        assert "--to" in result.stderr

        result = rebuild(daemon, "--to", str(tmp_path / "rebuilt.sqlite3"))
        assert result.returncode == 0, result.stderr
        assert f"{total} events applied" in result.stdout
        live = await dump(daemon.state_dir / "views.sqlite3")
        assert await dump(tmp_path / "rebuilt.sqlite3") == live
        assert [job["status"] for job in statuses["jobs"]] == ["completed", "failed", "completed"]
    finally:
        assert daemon.stop() == 0

    result = await asyncio.to_thread(rebuild, daemon)  # stopped: in place, through its own embedded server
    assert result.returncode == 0, result.stderr
    assert await dump(daemon.state_dir / "views.sqlite3") == live
    daemon.start()
    try:
        assert daemon.ctl_json("status") == statuses
    finally:
        daemon.stop()
