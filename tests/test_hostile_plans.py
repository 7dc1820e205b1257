"""Hostile planners and claimers: plans and claims that name paths out of the repository (`../`, absolute, under
`.git`), in a real daemon. Each is refused by name, the job says why, and the user's repository is untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, claim, git_repo
from tests.test_pipeline import by_type, task

pytestmark = pytest.mark.slow  # real daemons run planned jobs

OUT_OF_REPO = ("../outside.md", "/etc/passwd", ".git/hooks/post-merge")


def repository_state(repo: Path) -> tuple[str, str, list[str]]:
    """The user's branch, its status and every file of its `.git` but the job's own fetched branches
    (`numerus/...`, which Numerus adds by design): what a refused job must leave as it was."""
    git = ["git", "-C", str(repo)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    files = (str(path.relative_to(repo)) for path in (repo / ".git").rglob("*"))
    return head, status, sorted(name for name in files if "/numerus" not in name)


@pytest.mark.parametrize("path", OUT_OF_REPO)
def test_a_plan_naming_a_path_out_of_the_repository_is_refused_by_name(tmp_path: Path, path: str):
    plan = {"summary": "escape", "tasks": [task("a", (path, "create"))]}
    team = {"cases": [{"match": {"role": "planner"}, "steps": [{"answer": plan}]}]}
    repo = git_repo(tmp_path / "repo")
    before = repository_state(repo)
    with Daemon(tmp_path / "state", agents={"team": team}, config="plan_attempts = 1\n").start() as daemon:
        result = daemon.ctl("run", "escape", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        job = result.stdout.splitlines()[0]
        view = daemon.status(job)
        events = daemon.events(job)
    assert result.returncode == 1 and view["status"] == "failed", view
    rejected = by_type(events, "PlanRejected")
    assert rejected and any(path in error for error in rejected[0]["data"]["errors"]), rejected
    assert not by_type(events, "TaskStarted")
    assert repository_state(repo) == before


@pytest.mark.parametrize("path", OUT_OF_REPO)
def test_a_claim_naming_a_path_out_of_the_repository_is_refused_by_name(tmp_path: Path, path: str):
    plan = {"summary": "one task", "tasks": [task("a", ("A.md", "create"))]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": claim(("A.md", "create"), (path, "modify"))}]},
            {"match": {"role": "executor"}, "steps": [{"write": "A.md", "content": "a\n"}]},
        ]
    }
    repo = git_repo(tmp_path / "repo")
    before = repository_state(repo)
    config = "review = false\nclaim_attempts = 1\nmax_replans = 0\n"
    with Daemon(tmp_path / "state", agents={"team": team}, config=config).start() as daemon:
        result = daemon.ctl("run", "escape", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        job = result.stdout.splitlines()[0]
        view = daemon.status(job)
        events = daemon.events(job)
    assert result.returncode == 1 and view["status"] == "failed", view
    (task_view,) = view["tasks"]
    assert path in task_view["reason"], task_view
    assert not by_type(events, "ClaimGranted") and not by_type(events, "TaskStarted")
    assert repository_state(repo) == before
