"""Everything numerusd and the programs it starts create in the state directory is its owner's alone (umask 077):
the views, the run logs, the embedded server's log and store, the keys, the worktrees."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs a job


def test_after_a_job_nothing_in_the_state_directory_is_readable_by_others(tmp_path: Path):
    old = os.umask(0o022)  # the usual umask of whoever starts numerusd: it must not matter
    try:
        daemon = Daemon(tmp_path / "state", agents={"quick": [{"say": "hi"}, {"write": "a.txt", "content": "a\n"}]})
        daemon.start()
    finally:
        os.umask(old)
    # What this test's harness wrote itself, with the test's umask: not numerusd's doing.
    ours = {daemon.state_dir / "numerusd.stderr", daemon.state_dir / "numerus.toml"}
    ours |= set(daemon.state_dir.glob("scenario-*.json"))
    try:
        repo = git_repo(tmp_path / "repo")
        run = daemon.ctl("--json", "run", "--no-plan", "Write", "--repo", str(repo), "--agent", "quick", "--wait")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout.splitlines()[0])["job"]
        paths = [p for p in daemon.state_dir.rglob("*") if p not in ours and not p.is_symlink()]
        names = {p.name for p in paths}
        assert {"views.sqlite3", "nats-server.log", "keys.json", "connection.json", "events.wal"} <= names
        assert any(p.suffix == ".log" and job in p.parts for p in paths)  # the run's log
        assert any("jetstream" in p.parts for p in paths)  # the server's store
        wide = {str(p.relative_to(daemon.state_dir)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in paths}
        assert {p: mode for p, mode in wide.items() if int(mode, 8) & 0o077} == {}
    finally:
        assert daemon.stop() == 0
