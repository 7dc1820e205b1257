"""`numerusd rebuild`: the views replayed from the stream equal the live views exactly."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import pytest

from numerusd.daemon import BULK_VIEWS_FROM
from numerusd.keys import Keyring
from numerusd.protocol.envelope import Sealed
from numerusd.protocol.events import (
    AgentMessageReceived,
    JobCompleted,
    JobSubmitted,
    TaskCompleted,
    TaskCreated,
    TokensUsed,
)
from numerusd.replay import PUMPED_REPLAY_FROM
from numerusd.views.dump import dump
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git_repo
from tests.test_projections import Chain
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


@pytest.mark.slow
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


def finished_jobs(count: int, kid: str, key: bytes) -> list[Sealed]:
    """`count` jobs of one task each, from submission to completion, signed and chained as numerusd writes them."""
    sealed = []
    for n in range(count):
        e = Chain(f"J{n:05d}", kid, key)
        sealed += [
            e(JobSubmitted(goal="fix it", repo="/nowhere", agent="codex")),
            e(TaskCreated(title="fix it", instructions="fix it", agent="codex"), "t1"),
            e(TokensUsed(input_tokens=10, cached_input_tokens=0, output_tokens=1), "t1"),
            e(AgentMessageReceived(text="done"), "t1"),
            e(TaskCompleted(), "t1"),
            e(JobCompleted()),
        ]
    return sealed


@pytest.mark.slow
async def test_a_daemon_restarted_on_a_long_stream_reads_it_in_a_child_and_loads_empty_views_in_bulk(tmp_path: Path):
    daemon = Daemon(tmp_path / "state").start()
    try:
        keyring = Keyring.load(daemon.state_dir / "keys.json")
        enough = max(BULK_VIEWS_FROM, PUMPED_REPLAY_FROM)
        events = finished_jobs(enough // 6 + 1, keyring.current_kid, keyring.current_key)
        connection = daemon.connection()
        nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
        js = nc.jetstream(publish_async_max_pending=2000)
        for event in events:
            await js.publish_async(event.envelope.subject, event.wire, headers={"Nats-Msg-Id": event.envelope.id})
        await js.publish_async_completed()
        await nc.close()
        await eventually(lambda: projected(daemon, len(events)), timeout=60)
    finally:
        assert daemon.stop() == 0
    for suffix in ("", "-wal", "-shm"):  # the views lost (or dropped for a new schema)
        Path(f"{daemon.state_dir / 'views.sqlite3'}{suffix}").unlink(missing_ok=True)

    daemon.start()
    try:
        await eventually(lambda: projected(daemon, len(events)), timeout=60)
        assert f"loaded the views in bulk: {len(events)} events, 0 rejected" in daemon.stderr()
        # The daemon's own replay of a stream this long is read by a child process too: every job is there.
        assert f"replaying {len(events)} events read by a child process" in daemon.stderr()
        assert daemon.ctl_json("status", "--limit", "1")["total"] == len(events) // 6
        assert daemon.status("J00007")["status"] == "completed"
        result = rebuild(daemon, "--to", str(tmp_path / "rebuilt.sqlite3"))
        assert result.returncode == 0, result.stderr
        assert await dump(tmp_path / "rebuilt.sqlite3") == await dump(daemon.state_dir / "views.sqlite3")
    finally:
        assert daemon.stop() == 0
