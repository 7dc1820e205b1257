"""`numerusctl clean`: an ended job's leftover worktrees, branches and logs go; its result and history stay.

The real numerusd and numerusctl, a real nats-server and git; the agents are the scripted fake `codex exec`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from numerusd.git import mirror_path
from tests.daemon_harness import Daemon, claim, git, git_repo

pytestmark = pytest.mark.slow  # real daemons run planned jobs to leave something to clean

#: A planned job of two tasks: `ok` writes its file and merges, `bad` fails for good (one attempt, no replan).
TEAM = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {
                    "answer": {
                        "summary": "two files",
                        "tasks": [
                            {"id": "ok", "title": "OK", "instructions": "write OK.md", "intents": []},
                            {"id": "bad", "title": "BAD", "instructions": "write BAD.md", "intents": []},
                        ],
                    }
                }
            ],
        },
        {"match": {"role": "claimer", "task": "ok"}, "steps": [{"answer": claim(("OK.md", "create"))}]},
        {"match": {"role": "claimer", "task": "bad"}, "steps": [{"answer": claim(("BAD.md", "create"))}]},
        {"match": {"role": "executor", "task": "ok"}, "steps": [{"write": "OK.md", "content": "ok\n"}]},
        {
            "match": {"role": "executor", "task": "bad"},
            "steps": [{"write": "BAD.md", "content": "half done\n"}, {"say": "giving up"}, {"exit": 1}],
        },
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": []}}]},
    ]
}
SLOW = [{"say": "working"}, {"run": "sleep 300"}]
CONFIG = "max_attempts = 1\nreview = false\n"


def branches(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split())


async def test_clean_removes_an_ended_jobs_worktrees_branches_then_logs_and_refuses_a_running_job(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"team": TEAM, "slow": SLOW}, config=CONFIG).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        failed = daemon.ctl("run", "two files", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        assert failed.returncode == 1, failed.stderr
        job = failed.stdout.splitlines()[0].strip()
        view = daemon.status(job)
        assert {t["id"]: t["status"] for t in view["tasks"]} == {"ok": "completed", "bad": "failed"}
        bad_worktree = daemon.state_dir / "worktrees" / job / "bad"
        # The worktree is one of Numerus's mirror of the repository; its branch was fetched into the user's.
        mirror = mirror_path(daemon.state_dir / "repos", repo)
        assert bad_worktree.is_dir() and str(bad_worktree) in git(mirror, "worktree", "list")
        assert str(bad_worktree) not in git(repo, "worktree", "list")
        assert branches(repo) == {"main", f"numerus/{job}.integration", f"numerus/{job}/bad"}
        assert {f"numerus/{job}.integration", f"numerus/{job}/bad"} <= branches(mirror)

        # `status` says what is kept and how to remove it.
        footer = "1 ended job keeps the worktrees of tasks that did not merge; 'numerusctl clean --ended' removes them"
        assert daemon.ctl("status", check=True).stdout.rstrip().endswith(footer)
        kept = f"kept     worktrees and branches of bad ('numerusctl clean {job}' removes them)"
        assert kept in daemon.ctl("status", job, check=True).stdout

        running = daemon.ctl("run", "wait", "--repo", str(repo), "--agent", "slow", "--no-plan", check=True)
        busy = running.stdout.strip()

        # Named with a running job, nothing is removed, and the refusal says what to do.
        refused = daemon.ctl("clean", job, busy)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"numerusctl: job {busy} is running: its tasks still use their worktrees; wait for it to end, or "
            f"'numerusctl kill {busy}' first. Nothing was removed"
        )
        assert bad_worktree.is_dir() and f"numerus/{job}/bad" in branches(repo)

        cleaned = daemon.ctl("clean", job)
        assert cleaned.returncode == 0, cleaned.stderr
        line = cleaned.stdout.strip()
        assert line.startswith(f"job {job}: removed 1 worktree, 1 branch (")
        assert line.endswith(f"); kept its result, branch numerus/{job}.integration")
        assert not bad_worktree.exists() and not (daemon.state_dir / "worktrees" / job).exists()
        assert str(bad_worktree) not in git(mirror, "worktree", "list")
        assert branches(repo) == {"main", f"numerus/{job}.integration"}
        assert f"numerus/{job}/bad" not in branches(mirror)
        assert git(repo, "show", f"numerus/{job}.integration:OK.md") == "ok\n"  # the result stays
        assert "giving up" in daemon.ctl("logs", job, "--task", "bad", check=True).stdout  # logs too, unasked
        [event] = [e for e in daemon.events(job) if e["type"] == "JobCleaned"]
        assert event["data"]["worktrees"] == [str(bad_worktree)]
        assert event["data"]["branches"] == [f"numerus/{job}/bad"]
        assert event["data"]["logs"] is False and event["data"]["freed_bytes"] > 0
        detail = daemon.ctl("status", job, check=True).stdout
        assert "cleaned  worktrees and task branches removed ('numerusctl clean')" in detail
        assert "kept " not in detail and "clean --ended" not in daemon.ctl("status", check=True).stdout

        # Every ended job, logs included: the cleaned job's logs go now; the running job is left alone.
        again = daemon.ctl("--json", "clean", "--ended", "--logs", check=True)
        [reply] = json.loads(again.stdout)["jobs"]
        assert (reply["job"], reply["worktrees"], reply["branches"], reply["logs"]) == (job, [], [], True)
        assert not (daemon.state_dir / "runs" / job).exists()
        assert (daemon.state_dir / "runs" / busy).is_dir()
        logs = daemon.ctl("logs", job)
        assert logs.returncode == 1
        assert "the logs of job" in logs.stderr and "were removed by 'numerusctl clean --logs'" in logs.stderr
        assert daemon.ctl("clean", "--ended", check=True).stdout.strip() == "no ended job left anything to remove"
        assert daemon.status(busy)["status"] == "running"
        assert daemon.ctl("audit", "verify", job).returncode == 0


async def test_clean_is_told_which_jobs(tmp_path: Path):
    with Daemon(tmp_path / "state").start() as daemon:
        for args in ((), ("J1", "--ended")):
            result = daemon.ctl("clean", *args)
            assert result.returncode == 2
            assert result.stderr.strip() == (
                "numerusctl: name the jobs to clean, or clean every ended job with --ended (not both)"
            )
        unknown = daemon.ctl("clean", "J404")
        assert unknown.returncode == 1 and "no job 'J404'" in unknown.stderr
        assert daemon.ctl("clean", "a.b").returncode == 2
        assert daemon.alive


async def test_a_job_whose_repository_was_deleted_is_cleaned_of_what_is_left_in_the_state_directory(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"team": TEAM}, config=CONFIG).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl("run", "two files", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        job = job.stdout.splitlines()[0].strip()
        leftover = daemon.state_dir / "worktrees" / job / "bad"
        assert leftover.is_dir()
        shutil.rmtree(repo)
        cleaned = daemon.ctl("clean", job)
        assert cleaned.returncode == 0, cleaned.stderr
        # Numerus's mirror of the repository outlives it: the task's branch goes from there.
        assert cleaned.stdout.startswith(f"job {job}: removed 1 worktree, 1 branch (")
        assert not (daemon.state_dir / "worktrees" / job).exists()
