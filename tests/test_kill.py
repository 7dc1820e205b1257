"""`numerusctl kill`: every agent's whole process group is stopped, waiting tasks too, and the job reads `killed`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, claim, git_repo

pytestmark = pytest.mark.slow  # real daemons run jobs until they are killed

SLOW = [{"say": "starting a long build"}, {"run": "sleep 300 & sleep 300"}, {"say": "never printed"}]

#: A planned job of two tasks on one file: `a` holds it and runs SLOW's long build, `b` asks later and waits.
SLOW_TEAM = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {
                    "answer": {
                        "summary": "two tasks on one file",
                        "tasks": [
                            {"id": "a", "title": "A", "instructions": "write", "intents": []},
                            {"id": "b", "title": "B", "instructions": "write", "intents": []},
                        ],
                    }
                }
            ],
        },
        {"match": {"role": "claimer", "task": "b"}, "steps": [{"sleep": 0.5}, {"answer": claim(("F.md", "create"))}]},
        {"match": {"role": "claimer"}, "steps": [{"answer": claim(("F.md", "create"))}]},
        {"match": {"role": "executor"}, "steps": SLOW},
    ]
}


#: The kinds of job a kill or a crash is tried on: `--no-plan`'s one task, or a planned job of SLOW_TEAM.
KINDS = ("single-task", "planned")
#: Their tasks, the one that builds forever first.
TASKS = {"single-task": ["t1"], "planned": ["a", "b"]}


def run_args(kind: str) -> tuple[str, ...]:
    """`numerusctl run`'s arguments but the repository, for a job of `kind` whose first task builds forever."""
    agent = ("--no-plan", "--agent", "slow") if kind == "single-task" else ("--agent", "team")
    return ("run", *agent, "Build forever")


async def started(daemon: Daemon, job: str, kind: str) -> dict:
    """The job's view once its first task runs its long build (and, planned, `b` waits for `a`'s file)."""
    await eventually(lambda: b"sleep 300" in log_bytes(daemon, job, kind), timeout=20)
    async with daemon.client() as client:
        if kind == "single-task":
            return await client.status(job)
        view = await client.wait_for(job, lambda v: [t["status"] for t in v["tasks"]] == ["running", "waiting"])
    assert {task["id"]: task["holders"] for task in view["tasks"]}["b"] == ["a"]
    return view


#: The events recorded from a kill on, job's (None) and each task's: a running agent exits first, and every
#: task of a planned job gives its locks back.
KILLED = {
    "single-task": {None: ["KillRequested", "JobKilled"], "t1": ["TaskExited", "TaskKilled"]},
    "planned": {
        None: ["KillRequested", "JobKilled"],
        "a": ["TaskExited", "LocksReleased", "TaskKilled"],
        "b": ["LocksReleased", "TaskKilled"],
    },
}


@pytest.fixture
def daemon(tmp_path: Path):
    agents = {"slow": SLOW, "team": SLOW_TEAM}
    d = Daemon(tmp_path / "state", agents=agents, env={"NUMERUS_KILL_GRACE_S": "2"}).start()
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


@pytest.mark.parametrize("kind", KINDS)
async def test_kill_stops_the_agents_and_their_children_and_the_waiting_tasks_and_wait_exits_1(
    daemon: Daemon, tmp_path: Path, kind: str
):
    repo = git_repo(tmp_path / "repo")
    waiting = subprocess.Popen(
        daemon.ctl_argv(*run_args(kind), "--repo", str(repo), "--wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with daemon.client() as client:
            await eventually(client.jobs, timeout=20)
            (listed,) = await client.jobs()
        job = listed["id"]
        view = await started(daemon, job, kind)
        pid = view["tasks"][0]["pid"]
        group = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
        assert len(group) >= 3  # the agent, its shell, and the sleeps

        started_at = time.monotonic()
        result = daemon.ctl("kill", job)
        assert result.returncode == 0, result.stderr
        assert TASKS[kind][0] in result.stdout
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["status"] == "killed", timeout=15)
        assert time.monotonic() - started_at < 10
        assert not [p for p in group if pid_alive(p)]
        assert {task["id"]: task["status"] for task in view["tasks"]} == dict.fromkeys(TASKS[kind], "killed")
        out, err = waiting.communicate(timeout=20)
        assert waiting.returncode == 1, out + err
    finally:
        if waiting.poll() is None:  # the test failed before the job ended
            waiting.kill()
            waiting.communicate()

    again = daemon.ctl("kill", job)
    assert again.returncode == 1
    assert "already killed" in again.stderr
    # From the kill on: each task's end in its order (the tasks' ends may interleave), the job's last.
    events = daemon.events(job)
    kill_at = max(i for i, event in enumerate(events) if event["type"] == "KillRequested")
    after = events[kill_at:]
    ends: dict[str | None, list[str]] = {}
    for event in after:
        ends.setdefault(event["task"], []).append(event["type"])
    assert ends == KILLED[kind]
    assert (after[0]["type"], after[-1]["type"]) == ("KillRequested", "JobKilled")
    assert daemon.ctl("audit", "verify", job).returncode == 0


def test_kill_of_unknown_job_is_refused(daemon: Daemon):
    result = daemon.ctl("kill", "01NOSUCHJOB0000000000000000")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no job" in result.stderr


def log_bytes(daemon: Daemon, job: str, kind: str = "single-task") -> bytes:
    """What the first task's agent printed so far in its first attempt."""
    path = daemon.state_dir / "runs" / job / ("t1" if kind == "single-task" else "a") / "attempt-1.log"
    return path.read_bytes() if path.exists() else b""


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
