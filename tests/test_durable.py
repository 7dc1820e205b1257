"""Durable execution: a daemon killed (as `kill -9` would) at each step of a planned job comes back and finishes it,
every task's work merged exactly once, the history whole and verified.

Each test arms one failpoint (`numerusd/failpoints.py`): the daemon dies the first time a task reaches it, with
nothing flushed or cleaned; the next daemon starts without it and resumes the job (`resume = "auto"`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, claim, git, git_repo, session_members

pytestmark = pytest.mark.slow  # real daemons killed mid-job and started again

#: Three tasks, the third after the first: two run at once, each writes its own file.
TEAM = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {
                    "answer": {
                        "summary": "three files",
                        "tasks": [
                            {"id": "t1", "title": "One", "instructions": "write ONE.md", "intents": []},
                            {"id": "t2", "title": "Two", "instructions": "write TWO.md", "intents": []},
                            {"id": "t3", "title": "Three", "instructions": "write THREE.md", "deps": ["t1"]},
                        ],
                    }
                }
            ],
        },
        *(
            {"match": {"role": "claimer", "task": task}, "steps": [{"answer": claim((name, "create"))}]}
            for task, name in (("t1", "ONE.md"), ("t2", "TWO.md"), ("t3", "THREE.md"))
        ),
        *(
            {
                "match": {"role": "executor", "task": task},
                "steps": [{"sleep": 0.3}, {"write": name, "content": f"{task}\n"}, {"say": "done"}],
            }
            for task, name in (("t1", "ONE.md"), ("t2", "TWO.md"), ("t3", "THREE.md"))
        ),
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["ok"]}}]},
    ]
}
CONFIG = 'checks = ["test -n \\"$(ls)\\""]\nbackoff_s = [0.2]\n'

#: Where the daemon dies: a claim arbitrated, a worktree made, an agent running, a check run (mid-gate), a merge
#: made in git but not recorded.
FAILPOINTS = ("after-claim", "after-worktree", "agent-running", "after-check", "after-merge")


@pytest.mark.parametrize("failpoint", FAILPOINTS)
async def test_a_daemon_killed_mid_job_resumes_it_and_every_task_merges_exactly_once(tmp_path: Path, failpoint: str):
    repo = git_repo(tmp_path / "repo")
    daemon = Daemon(
        tmp_path / "state", agents={"team": TEAM}, config=CONFIG, env={"NUMERUS_FAILPOINTS": failpoint}
    ).start()
    try:
        job = daemon.ctl("run", "three files", "--repo", str(repo), "--agent", "team", check=True).stdout.strip()
        process = daemon.process
        assert process is not None
        await eventually(lambda: process.poll() is not None, timeout=60, interval=0.05)
        assert process.returncode == 137, daemon.stderr()[-2000:]
        daemon.stop()
        daemon.env = {}
        daemon.start()
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["status"] in ("completed", "failed", "killed"), timeout=90)
        assert view["status"] == "completed", (view, daemon.stderr()[-3000:])

        events = daemon.events(job)
        types = [event["type"] for event in events]
        assert "JobInterrupted" in types and types[types.index("JobInterrupted") + 1] == "JobResumed"
        merged = [event["task"] for event in events if event["type"] == "TaskMerged"]
        assert sorted(merged) == ["t1", "t2", "t3"], "a task merged twice, or not at all"
        integration = f"numerus/{job}.integration"
        assert len(git(repo, "rev-list", "--merges", integration).split()) == 3
        assert git(repo, "show", f"{integration}:ONE.md") == "t1\n"
        assert git(repo, "show", f"{integration}:THREE.md") == "t3\n"
        # A check that passed is not run again on the same commit, after a crash in the middle of the gate.
        checked = [event["task"] for event in events if event["type"] == "CheckCompleted"]
        assert sorted(checked) == ["t1", "t2", "t3"]
        # What the crash left of an agent is ended, however much of its sandbox outlived the daemon.
        cut = types.index("JobInterrupted")
        spawned = [event["data"]["pid"] for event in events[:cut] if event["type"] == "AgentSpawned"]
        await eventually(lambda: not any(session_members(pid) for pid in spawned), timeout=10)
        # No attempt failed for the crash: an interruption is not a failure.
        assert "TaskRetryScheduled" not in types and "TaskFailed" not in types
        audit = daemon.ctl("audit", "verify", job, "--finished")
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        daemon.stop()


#: An executor that names its thread with what would be an option of `codex exec resume`, then works for long.
HOSTILE_THREAD = {
    "thread_id": "--dangerously-bypass-approvals-and-sandbox",
    "steps": [{"say": "working"}, {"run": "sleep 300"}],
}


async def test_a_thread_id_an_agent_chose_to_be_an_option_is_never_put_on_a_resume_command_line(tmp_path: Path):
    """The thread id comes from the agent's own output: after a crash, such an attempt is made again rather than
    resumed with the agent's words in the command line."""
    repo = git_repo(tmp_path / "repo")
    with Daemon(
        tmp_path / "state", agents={"sly": HOSTILE_THREAD}, env={"NUMERUS_KILL_GRACE_S": "1"}
    ).start() as daemon:
        job = daemon.ctl_json("run", "--no-plan", "work", "--repo", str(repo), "--agent", "sly")["job"]
        async with daemon.client() as client:
            await client.wait_for(job, lambda v: v["tasks"][0]["thread_id"] is not None and v["tasks"][0]["pid"])
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        daemon.start()
        async with daemon.client() as client:
            view = await client.wait_for(job, lambda v: v["tasks"][0]["attempt"] == 2 and v["tasks"][0]["pid"])
        started = [event["data"] for event in daemon.events(job) if event["type"] == "TaskStarted"]
        assert [(s["attempt"], s["resumes"]) for s in started] == [(1, None), (2, None)]
        assert not any(arg.startswith("--dangerously") for s in started for arg in s["argv"])
        assert view["status"] == "running"
