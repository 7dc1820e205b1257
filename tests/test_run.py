"""`numerusctl run`: a job goes from submission to a completed (or failed) agent run, seen from every side."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo

HELLO = [
    {"say": "Writing HELLO.md."},
    {"write": "HELLO.md", "content": "hello from the scripted agent\n"},
    {"run": "cat HELLO.md"},
    {"usage": {"input_tokens": 1000, "cached_input_tokens": 100, "output_tokens": 50}},
    {"say": "Done."},
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("run")
    agents = {
        "scripted": HELLO,
        "failing": [{"say": "cannot do it"}, {"exit": 3}],
        "slow": [{"say": "working on it"}, {"sleep": 60}],
    }
    d = Daemon(root / "state", agents=agents)
    d.start()
    yield d
    assert d.stop() == 0, d.stderr()


def test_run_wait_completes_and_the_agent_changed_the_repository(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "--no-plan", "Write a greeting", "--repo", str(repo), "--agent", "scripted", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "HELLO.md").read_text() == "hello from the scripted agent\n"
    (listed,) = [j for j in daemon.ctl_json("status", "--all")["jobs"] if j["repo"] == str(repo)]
    job = daemon.status(listed["id"])
    assert job["status"] == "completed"
    (task,) = job["tasks"]
    assert (task["status"], task["exit_code"], task["attempt"]) == ("completed", 0, 1)
    assert (task["input_tokens"], task["cached_input_tokens"], task["output_tokens"]) == (1000, 100, 50)
    assert task["thread_id"]


def test_without_repo_a_job_works_in_the_repository_of_the_current_directory(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    (repo / "src").mkdir()
    result = daemon.ctl("run", "--no-plan", "Write a greeting", "--agent", "scripted", "--wait", cwd=repo / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "HELLO.md").read_text() == "hello from the scripted agent\n"  # at the top, not in src/
    # A planned job named by a directory inside the repository works on the repository, as git would.
    job = daemon.ctl("run", "Plan it", "--repo", str(repo / "src"), "--agent", "scripted", check=True).stdout.strip()
    assert daemon.status(job)["repo"] == str(repo)


@pytest.mark.slow
def test_status_lists_the_newest_jobs_one_line_each_and_says_how_many_it_left_out(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"scripted": HELLO}).start() as d:
        jobs = []
        for n in range(3):
            repo = git_repo(tmp_path / f"repo{n}")
            jobs.append(d.ctl("run", "--no-plan", f"greet {n}", "--repo", str(repo), "--agent", "scripted", "--wait"))
        ids = [result.stdout.splitlines()[0] for result in jobs]
        listed = d.ctl_json("status", "--limit", "2")
        assert [j["id"] for j in listed["jobs"]] == ids[:0:-1] and listed["total"] == 3  # newest first
        assert all(
            j["tasks"] == [] and (j["tasks_total"], j["tasks_done"], j["tokens"]) == (1, 1, 1050)
            for j in listed["jobs"]
        )
        text = d.ctl("status", "--limit", "2", check=True).stdout
        assert text.endswith("the newest 2 of 3 jobs; 'numerusctl status --all' lists every one\n")
        assert ids[0] not in text and ids[2] in text
        assert [j["id"] for j in d.ctl_json("status", "--all")["jobs"]] == ids[::-1]
        assert len(d.status(ids[0])["tasks"]) == 1  # one job: with its tasks


def test_terminal_output_is_kept_whole_and_its_hash_recorded(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = daemon.ctl_json("run", "--no-plan", "Write a greeting", "--repo", str(repo), "--agent", "scripted")["job"]
    asyncio.run(wait_done(daemon, job))
    (task,) = daemon.status(job)["tasks"]
    log = Path(task["log_path"])
    assert log.parent == daemon.state_dir / "runs" / job / "t1"
    content = log.read_bytes()
    assert b'"type":"thread.started"' in content and b"\r\n" not in content
    exited = [e for e in daemon.events(job) if e["type"] == "TaskExited"]
    assert exited[0]["data"]["log_sha256"] == hashlib.sha256(content).hexdigest()
    assert exited[0]["data"]["log_bytes"] == len(content)
    logs = daemon.ctl("logs", job, check=True).stdout
    assert "Writing HELLO.md." in logs


def test_a_plain_nats_subscriber_reads_the_job_as_json(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    connection = daemon.connection()

    async def watch() -> list[dict]:
        nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
        seen: list[dict] = []
        done = asyncio.Event()

        async def on_event(msg) -> None:
            event = json.loads(msg.data)
            assert msg.subject.startswith(f"numerus.job.{event['job']}.")
            seen.append(event)
            if event["type"] in ("JobCompleted", "JobFailed"):
                done.set()

        await nc.subscribe("numerus.job.>", cb=on_event)
        await nc.flush()
        run = await asyncio.create_subprocess_exec(
            *daemon.ctl_argv("run", "--no-plan", "Write a greeting", "--repo", str(repo), "--agent", "scripted")
        )
        assert await run.wait() == 0
        await asyncio.wait_for(done.wait(), 30)
        await nc.close()
        return seen

    seen = asyncio.run(watch())
    types = [event["type"] for event in seen]
    assert types[:3] == ["JobSubmitted", "TaskCreated", "TaskStarted"]
    assert {"AgentSpawned", "AgentThreadStarted", "AgentMessageReceived", "AgentCommandExecuted"} <= set(types)
    assert {"AgentFileChanged", "TokensUsed", "TaskExited", "TaskCompleted"} <= set(types)
    assert types[-1] == "JobCompleted"
    assert seen[0]["data"]["goal"] == "Write a greeting"
    assert all(event["sig"] and event["kid"] for event in seen)


def test_agent_that_exits_nonzero_fails_the_job_and_wait_says_so(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "--no-plan", "Impossible", "--repo", str(repo), "--agent", "failing", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    (listed,) = [j for j in daemon.ctl_json("status", "--all")["jobs"] if j["repo"] == str(repo)]
    job = daemon.status(listed["id"])
    assert job["status"] == "failed"
    assert job["tasks"][0]["reason"] == "the agent ended with exit code 3"


def test_missing_agent_binary_refuses_the_job_at_submit_with_the_reason(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    d = Daemon(tmp_path / "state", env={"CODEX_BIN": str(tmp_path / "no-such-codex")}).start()
    try:
        result = d.ctl("run", "--no-plan", "Anything", "--repo", str(repo), "--agent", "codex", "--wait")
        assert result.returncode == 1 and result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert "agent 'codex' (the executor) cannot start" in line and str(tmp_path / "no-such-codex") in line
        assert d.ctl_json("status")["jobs"] == []
    finally:
        d.stop()


async def wait_done(daemon: Daemon, job: str) -> None:
    async def done() -> bool:
        result = await asyncio.to_thread(daemon.ctl, "--json", "status", job)
        return json.loads(result.stdout)["jobs"][0]["status"] != "running"

    await eventually(done, timeout=30, interval=0.1)


def test_ctrl_c_in_run_wait_stops_the_waiting_not_the_job(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    argv = daemon.ctl_argv("run", "--no-plan", "slow", "--repo", str(repo), "--agent", "slow", "--wait")
    # Tests started in the background by a shell without job control have SIGINT ignored, and a child inherits
    # that: the client gets Ctrl-C's default, as a user's terminal gives it.
    argv = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.argv[1], sys.argv[1:])", *argv]  # fmt: skip
    waiting = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **daemon.env}
    )
    try:
        job = waiting.stdout.readline().strip()  # the job's id comes first, then its progress
        deadline = time.monotonic() + 30
        while daemon.status(job)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status(job)["status"] == "running"  # Ctrl-C while the job runs, not before it does
        waiting.send_signal(signal.SIGINT)  # our own child, by its pid
        _, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        f"numerusctl: stopped waiting; job {job} goes on (numerusctl kill {job} stops it)"
    )
    assert daemon.status(job)["status"] == "running"
    assert daemon.ctl("kill", job).returncode == 0
