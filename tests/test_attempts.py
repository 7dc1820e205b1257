"""Attempts: every failed attempt of a task counts, whether or not its agent had started.

The real daemon, git and the scripted agent. A task whose worktree cannot be made (its branch already exists,
at a commit that does not contain the job's base) fails its attempt before any agent starts; after
`max_attempts` such attempts the task fails and the job ends, instead of retrying for ever.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, git, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs a job

PLAN = {"summary": "one", "tasks": [{"id": "t1", "title": "T1", "instructions": "t1", "intents": []}]}
#: The planner thinks for a while, long enough for the test to put a branch in the task's way.
TEAM = {"cases": [{"match": {"role": "planner"}, "steps": [{"sleep": 1.5}, {"answer": PLAN}]}]}
CONFIG = 'review = false\nclaims = "plan"\nmax_attempts = 2\nbackoff_s = [0.1]\n'


async def test_a_task_whose_worktree_cannot_be_made_fails_after_its_attempts_instead_of_retrying_for_ever(
    tmp_path: Path,
):
    with Daemon(tmp_path / "state", agents={"team": TEAM}, config=CONFIG).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl("run", "one task", "--repo", str(repo), "--agent", "team", check=True).stdout.strip()
        # While the planner works, a branch of the task's name appears at a commit unrelated to the job's base.
        empty_tree = git(repo, "hash-object", "-t", "tree", "/dev/null").strip()
        stranger = git(repo, "commit-tree", empty_tree, "-m", "unrelated").strip()
        git(repo, "branch", f"numerus/{job}/t1", stranger)

        await eventually(lambda: daemon.status(job)["status"] not in ("planning", "running"), timeout=30, interval=0.2)
        view = daemon.status(job)
        assert view["status"] == "failed", view
        (task,) = view["tasks"]
        assert task["status"] == "failed" and task["reason"].startswith("failed after 2 attempts: git failed")
        events = daemon.events(job)
        retries = [event["data"] for event in events if event["type"] == "TaskRetryScheduled"]
        assert [retry["next_attempt"] for retry in retries] == [2]
        assert not [event for event in events if event["type"] == "TaskStarted"]  # no agent ever ran
        assert daemon.ctl("audit", "verify", job).returncode == 0
