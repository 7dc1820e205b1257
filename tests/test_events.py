"""`numerusctl events`: a job's record page by page with stream sequences, and live with -f."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, git_repo
from tests.test_logs import TALKATIVE

pytestmark = pytest.mark.slow  # a real daemon runs a job that talks for a while


def test_events_follow_prints_the_job_as_it_happens(tmp_path: Path):
    daemon = Daemon(tmp_path / "state", agents={"talkative": TALKATIVE}).start()
    try:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl_json("run", "--no-plan", "Build it", "--repo", str(repo), "--agent", "talkative")["job"]
        follower = subprocess.Popen(
            daemon.ctl_argv("--json", "events", job, "-f"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        seen = []
        deadline = time.monotonic() + 30
        assert follower.stdout is not None
        for line in follower.stdout:
            if line.strip():
                seen.append(json.loads(line))
                if seen[-1]["type"] == "JobCompleted" or time.monotonic() > deadline:
                    break
        follower.terminate()
        follower.communicate(timeout=10)
        assert seen[0]["type"] == "JobSubmitted" and seen[-1]["type"] == "JobCompleted"
        assert [event["id"] for event in seen] == [event["id"] for event in daemon.events(job)]

        lines = daemon.ctl("events", job, check=True).stdout.splitlines()
        seqs = [int(line.split()[0]) for line in lines]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == len(seen)
    finally:
        daemon.stop()
