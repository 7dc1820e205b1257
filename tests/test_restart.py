"""Restart honesty: a daemon killed during a task comes back with the task `interrupted`, nothing lost or doubled,
and the job goes on when resumed."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest

from numerusd.protocol import subjects
from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo
from tests.test_kill import KINDS, SLOW, SLOW_TEAM, TASKS, log_bytes, pid_alive, run_args, started
from tests.test_rebuild import rebuild
from tests.test_run import HELLO
from tests.views_reader import job_views

pytestmark = pytest.mark.slow  # real daemons killed and restarted during their jobs


def chain_of(events: list[dict]) -> list[str]:
    return [event["id"] for event in events]


#: What a restart records of a job cut by a crash: the task whose agent ran is interrupted, then the job (a task
#: waiting for its GO keeps waiting).
INTERRUPTED = ["TaskInterrupted", "JobInterrupted"]
MANUAL = 'resume = "manual"'


@pytest.mark.parametrize("kind", KINDS)
async def test_kill_9_during_a_job_then_restart_reads_it_interrupted_until_resumed(tmp_path: Path, kind: str):
    repo = git_repo(tmp_path / "repo")
    agents = {"slow": SLOW, "team": SLOW_TEAM}
    with Daemon(tmp_path / "state", agents=agents, config=MANUAL, env={"NUMERUS_KILL_GRACE_S": "1"}).start() as daemon:
        job = daemon.ctl_json(*run_args(kind), "--repo", str(repo))["job"]
        view = await started(daemon, job, kind)
        before = daemon.events(job)
        agent_pid = view["tasks"][0]["pid"]
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL

        daemon.start()
        view = daemon.status(job)
        assert (view["status"], view["next"]) == ("interrupted", "it waits for 'numerusctl resume'")
        statuses = {task["id"]: task["status"] for task in view["tasks"]}
        assert statuses == {"single-task": {"t1": "interrupted"}, "planned": {"a": "interrupted", "b": "waiting"}}[kind]
        assert "numerusd stopped" in view["tasks"][0]["reason"]
        await eventually(lambda: not pid_alive(agent_pid), timeout=10)

        after = daemon.events(job)
        ids = chain_of(after)
        assert len(ids) == len(set(ids)), "an event was stored twice"
        assert ids[: len(before)] == chain_of(before), "an event acknowledged before the crash is gone"
        assert [event["type"] for event in after[len(before) :]] == INTERRUPTED
        assert after[len(before)]["task"] == TASKS[kind][0]
        assert daemon.ctl("audit", "verify", job).returncode == 0

        # A second restart changes nothing: the interruption is recorded once, and nothing runs until asked.
        daemon.stop()
        daemon.start()
        assert chain_of(daemon.events(job)) == ids

        # Resumed: the cut attempt goes on in its agent's thread, under the same attempt number.
        resumed = daemon.ctl("resume", job[-6:])
        assert resumed.returncode == 0, resumed.stderr
        assert f"job {job}: resumed, running" in resumed.stdout
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["tasks"][0]["status"] == "running" and v["tasks"][0]["pid"])
        started_again = [event for event in daemon.events(job)[len(ids) :] if event["type"] == "TaskStarted"]
        (again,) = started_again
        assert again["data"]["attempt"] == 1 and again["data"]["resumes"] == view["tasks"][0]["thread_id"]
        assert again["data"]["log_path"].endswith("attempt-1-resumed-1.log")
        refused = daemon.ctl("resume", job)
        assert refused.returncode == 1 and "is running, not interrupted" in refused.stderr
        assert daemon.ctl("kill", job).returncode == 0
        async with daemon.client() as client:
            await client.wait_for(job, lambda v: v["status"] == "killed")
        assert daemon.ctl("audit", "verify", job).returncode == 0


async def test_graceful_stop_during_a_task_resumes_it_when_the_daemon_starts_again(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    daemon = Daemon(tmp_path / "state", agents={"slow": SLOW}, env={"NUMERUS_KILL_GRACE_S": "1"}).start()
    job = daemon.ctl_json("run", "--no-plan", "Build forever", "--repo", str(repo), "--agent", "slow")["job"]
    await eventually(lambda: b"sleep 300" in log_bytes(daemon, job), timeout=20)
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    try:
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["tasks"][0]["status"] == "running" and v["tasks"][0]["pid"])
        assert view["status"] == "running"
        types = [event["type"] for event in daemon.events(job)]
        ended = types.index("TaskExited")
        assert types[ended : ended + 4] == ["TaskExited", "TaskInterrupted", "JobInterrupted", "JobResumed"]
        resumed = next(e for e in daemon.events(job) if e["type"] == "JobResumed")
        assert resumed["data"]["by"] == "numerusd (resume = auto)"
    finally:
        daemon.stop()


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path):
    daemon = Daemon(tmp_path / "state").start()
    try:
        second = subprocess.run(
            [str(Path(daemon.ctl_argv()[0]).parent / "numerusd"), "--state-dir", str(daemon.state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 75
        assert "another numerusd" in second.stderr
        assert daemon.alive
    finally:
        daemon.stop()


async def test_genuine_events_republished_onto_the_stream_change_nothing_after_a_restart(tmp_path: Path):
    """Anyone who may publish on `numerus.job.>` could copy a job's own signed events back onto the stream: the
    replay at start skips what does not extend its job's chain (the chain its snapshot ends with, here), so the job
    reads as before, as a rebuild does."""
    repo = git_repo(tmp_path / "repo")
    with Daemon(tmp_path / "state", agents={"scripted": HELLO}).start() as daemon:
        run = daemon.ctl("run", "--no-plan", "Greet", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert run.returncode == 0, run.stdout + run.stderr
        job = run.stdout.splitlines()[0].strip()
        before = daemon.status(job)
        # The events exactly as stored (numerusctl prints their bytes as they are): still signed, still valid.
        wires = [line.encode() for line in daemon.ctl("--json", "events", job, check=True).stdout.splitlines()]
        connection = daemon.connection()
        nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
        try:
            js = nc.jetstream()
            for wire in (wires[2], wires[0], wires[-1]):  # a task's event, the submission, the job's end
                event = json.loads(wire)
                await js.publish(subjects.job_event(job, event["type"], event["task"]), wire)
        finally:
            await nc.close()
        daemon.stop()
        daemon.start()
        assert daemon.status(job) == before, "a copy of the job's own events changed it"
        # Each copy is skipped: its job starts from its snapshot, and no copy extends that snapshot's chain head.
        assert daemon.stderr().count("does not follow its job's last event") == 3
        # The whole job again, in its order: each copy is skipped, and `status` equals what a rebuild shows.
        connection = daemon.connection()  # a restarted embedded server listens on a new port
        nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
        try:
            for wire in wires:
                event = json.loads(wire)
                await nc.jetstream().publish(subjects.job_event(job, event["type"], event["task"]), wire)
        finally:
            await nc.close()
        daemon.stop()
        daemon.start()
        assert daemon.status(job) == before
        rebuilt = tmp_path / "rebuilt.sqlite3"
        result = rebuild(daemon, "--to", str(rebuilt))
        assert result.returncode == 0, result.stderr
        (view,) = job_views(rebuilt, job)
        assert msgspec.to_builtins(view) == before, "status differs from the rebuilt view"
