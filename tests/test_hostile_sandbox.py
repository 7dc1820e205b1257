"""Hostile agents against the sandbox: executors that try to read the daemon's secrets, write outside their work
directory, read another task's work, leave a process behind, or plant git hooks and config, in a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git_repo
from tests.test_pipeline import by_type, task
from tests.test_sandbox import host_processes_with


def command_outputs(log: Path) -> dict[str, tuple[int | None, str]]:
    """What each shell command the scripted agent ran printed, and its exit code, read from its run log."""
    found = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            item = event.get("item", {})
            if event.get("type") == "item.completed" and item.get("type") == "command_execution":
                found[item["command"]] = (item["exit_code"], item["aggregated_output"])
    return found


async def test_an_executor_cannot_reach_the_state_the_users_repository_another_task_or_git_and_leaves_nothing_running(
    tmp_path: Path,
):
    state, repo = tmp_path / "state", git_repo(tmp_path / "repo")
    token = uuid.uuid4().hex
    host_tmp = Path("/tmp") / f"numerus-hostile-{token}"
    sleeper = f"1000.{uuid.uuid4().int % 10**6}"
    attacks = {
        "secrets": f"cat {state}/keys.json {state}/connection.json",
        "repo": f"echo pwned > {repo}/PLANTED.md && cat {repo}/README.md",
        "tmp": f"echo pwned > {host_tmp}",
        "other task": f"cat {state}/worktrees/*/b/B.md",
        "hook": 'echo "touch /tmp/pwned" > "$(git rev-parse --git-path hooks)/post-merge"',
        "config": "git config core.hooksPath /tmp",
        "background": f"setsid sleep {sleeper} > /dev/null 2>&1 & echo started",
    }
    plan = {"summary": "two tasks", "tasks": [task("a", ("A.md", "create")), task("b", ("B.md", "create"))]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "executor", "task": "a"},
                "steps": [
                    {"sleep": 1.0},  # b's worktree exists by now: b wrote B.md and sleeps
                    *({"run": command} for command in attacks.values()),
                    {"write": "A.md", "content": "a\n"},
                ],
            },
            {
                "match": {"role": "executor", "task": "b"},
                "steps": [{"write": "B.md", "content": "b\n"}, {"sleep": 3.0}],
            },
        ]
    }
    config_before = (repo / ".git" / "config").read_bytes()
    config = 'review = false\nclaims = "plan"\nparallel = 2\n'
    with Daemon(state, agents={"team": team}, config=config).start() as daemon:
        result = daemon.ctl("run", "two", "--repo", str(repo), "--agent", "team", "--wait", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()[-3000:]
        job = result.stdout.splitlines()[0]
        events = daemon.events(job)
        (exited,) = by_type(events, "TaskExited", "a")
        ran = command_outputs(Path(exited["data"]["log_path"]))
        # Where the agent looked, nothing was there; where it wrote, nothing landed.
        code, out = ran[attacks["secrets"]]
        assert code != 0 and out.count("No such file or directory") == 2, out
        code, out = ran[attacks["repo"]]
        assert code != 0 and "README.md: No such file or directory" in out, out
        assert not (repo / "PLANTED.md").exists() and not host_tmp.exists()
        assert (state / "worktrees" / job / "b").exists() or by_type(events, "TaskMerged", "b")
        code, out = ran[attacks["other task"]]
        assert code != 0 and "No such file or directory" in out, out
        for attack in ("hook", "config"):
            code, out = ran[attacks[attack]]
            refused = ("Read-only file system", "could not lock config file", "Directory nonexistent")
            assert code != 0 and any(why in out for why in refused), out
        assert not list((repo / ".git").glob("**/post-merge")) and not list(state.glob("repos/*/**/post-merge"))
        assert (repo / ".git" / "config").read_bytes() == config_before
        # The job went on: the agent's own work was merged.
        assert daemon.status(job)["status"] == "completed"
        assert (
            subprocess.run(
                ["git", "-C", str(repo), "show", f"numerus/{job}.integration:A.md"], capture_output=True, text=True
            ).stdout
            == "a\n"
        )
        # What it left running in the background ended with it.
        assert ran[attacks["background"]] == (0, "started\n")
        await eventually(lambda: not host_processes_with(f"sleep\x00{sleeper}"), timeout=10, interval=0.05)


def test_an_in_place_agent_writes_its_repository_but_not_its_git_directory(tmp_path: Path):
    state, repo = tmp_path / "state", git_repo(tmp_path / "repo")
    steps = [
        {"run": "echo 'touch /tmp/pwned' > .git/hooks/post-merge"},
        {"run": "echo '[core] hooksPath = /tmp' >> .git/config"},
        {"run": f"cat {state}/keys.json"},
        {"write": "HELLO.md", "content": "hello\n"},
    ]
    config_before = (repo / ".git" / "config").read_bytes()
    with Daemon(state, agents={"hostile": steps}).start() as daemon:
        result = daemon.ctl("run", "--no-plan", "greet", "--repo", str(repo), "--agent", "hostile", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.splitlines()[0]
        (exited,) = by_type(daemon.events(job), "TaskExited")
        ran = command_outputs(Path(exited["data"]["log_path"]))
    outputs = list(ran.values())
    assert [code != 0 for code, _ in outputs] == [True, True, True]
    assert "Read-only file system" in outputs[0][1] and "Read-only file system" in outputs[1][1]
    assert "No such file or directory" in outputs[2][1]
    assert (repo / "HELLO.md").read_text() == "hello\n"
    assert not (repo / ".git" / "hooks" / "post-merge").exists()
    assert (repo / ".git" / "config").read_bytes() == config_before


def test_status_warns_of_a_job_whose_agents_run_unsandboxed(tmp_path: Path):
    config = '[agents.unsafe]\nkind = "scripted"\nsandbox = "none"\nenv = { NUMERUS_SCENARIO = "hello" }\n'
    with Daemon(tmp_path / "state", config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "--no-plan", "greet", "--repo", str(repo), "--agent", "unsafe", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.splitlines()[0]
        shown = daemon.ctl("status", job, check=True).stdout
        assert 'warning  no sandbox for the executor: its agent profile says sandbox = "none"' in shown
        assert daemon.status(job)["unsandboxed"] == ["executor"]
        sandboxed = git_repo(tmp_path / "other")
        job = daemon.ctl("run", "--no-plan", "greet", "--repo", str(sandboxed), "--agent", "scripted", "--wait")
        assert "warning" not in daemon.ctl("status", job.stdout.splitlines()[0], check=True).stdout


def test_the_daemon_refuses_to_start_when_bwrap_cannot_run(tmp_path: Path):
    done = subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "NUMERUS_BWRAP": "/bin/false"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("numerusd: cannot run agents in a sandbox (/bin/false exited 1")
    assert line.endswith('set agents.codex.sandbox = "none", agents.scripted.sandbox = "none"'), line
    assert not (tmp_path / "state" / "connection.json").exists()


def test_the_gates_checks_run_the_agents_code_in_its_sandbox(tmp_path: Path):
    state, repo = tmp_path / "state", git_repo(tmp_path / "repo")
    # The executor writes the script the configured check runs: its code, run by the daemon's gate.
    script = f"cat {state}/keys.json || echo no-keys\necho pwned > {repo}/PLANTED.md\necho pwned > {repo}.planted\n"
    plan = {"summary": "one task", "tasks": [task("a", ("check.sh", "create"))]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {"match": {"role": "executor"}, "steps": [{"write": "check.sh", "content": script}]},
        ]
    }
    config = 'review = false\nclaims = "plan"\nchecks = ["sh check.sh"]\n'
    with Daemon(state, agents={"team": team}, config=config).start() as daemon:
        result = daemon.ctl("run", "check", "--repo", str(repo), "--agent", "team", "--wait", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.splitlines()[0]
        (ran,) = by_type(daemon.events(job), "CheckCompleted", "a")
    output = ran["data"]["output"]
    assert "keys.json: No such file or directory" in output and "no-keys" in output, output
    # What it wrote outside its worktree went to the sandbox's own empty directories, and went with it.
    assert not (repo / "PLANTED.md").exists() and not Path(f"{repo}.planted").exists()
    assert "current" not in output  # nothing of keys.json


def test_a_git_file_rewritten_by_an_earlier_attempt_binds_nothing_of_the_state_directory(tmp_path: Path):
    state, repo = tmp_path / "state", git_repo(tmp_path / "repo")
    plan = {"summary": "one task", "tasks": [task("a", ("A.md", "create"))]}
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            # The first attempt tries to point its worktree's .git at the state directory (refused: read-only), then
            # fails; the second, in the same worktree, looks for the keys. Were the rewrite to land, the daemon still
            # binds the git metadata it made, never what a .git says (`JobPipeline.git_dirs`).
            {
                "match": {"role": "executor", "attempt": 1},
                "steps": [{"run": f"printf 'gitdir: {state}\\n' > .git"}, {"exit": 1}],
            },
            {
                "match": {"role": "executor"},
                "steps": [{"run": f"cat {state}/keys.json"}, {"write": "A.md", "content": "a\n"}],
            },
        ]
    }
    config = 'review = false\nclaims = "plan"\nmax_attempts = 2\nbackoff_s = [0.0]\n'
    with Daemon(state, agents={"team": team}, config=config).start() as daemon:
        result = daemon.ctl("run", "poison", "--repo", str(repo), "--agent", "team", "--wait", timeout=120)
        job = result.stdout.splitlines()[0]
        exits = by_type(daemon.events(job), "TaskExited", "a")
    assert len(exits) == 2, result.stdout + result.stderr
    ran = command_outputs(Path(exits[1]["data"]["log_path"]))
    ((code, out),) = ran.values()
    assert code != 0 and "No such file or directory" in out, out
