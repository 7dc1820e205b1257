"""Remote workers end to end: a real numerusd and two real `numerusd worker` processes in separate directories,
sharing nothing but the bus, run a planned job's executors; one is SIGKILLed in the middle of a task.

Every agent is the scripted fake `codex exec`; the daemon and the workers read the same numerus.toml (its
profiles), as a team would deploy it. The workers log in as the bus user `worker` with the daemon's worker.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from numerusd.protocol import work
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git, git_repo
from tests.test_hostile_sandbox import command_outputs

pytestmark = pytest.mark.slow  # a daemon, two workers and a planned job of six tasks

TASKS = [f"t{n}" for n in range(1, 7)]
PLAN = {
    "summary": "Six notes",
    "tasks": [
        {
            "id": task,
            "title": task.upper(),
            "instructions": f"Write {task}.md.",
            "intents": [{"path": f"{task}.md", "mode": "create"}],
            **({"deps": ["t1"]} if task == "t6" else {}),
        }
        for task in TASKS
    ],
}


def scenario(slow_s: float) -> dict:
    """The planner answers PLAN; each executor writes its note, then works `slow_s` seconds (t1 twice that, so a
    worker can be killed in the middle of it)."""
    work_steps = [{"write": "{task}.md", "content": "{task}, attempt {attempt}\n"}, {"say": "Done."}]
    return {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": PLAN}]},
            {"match": {"role": "executor", "task": "t1"}, "steps": [{"sleep": 2 * slow_s}, *work_steps]},
            {"match": {"role": "executor"}, "steps": [{"sleep": slow_s}, *work_steps]},
        ]
    }


class Worker:
    """One `numerusd worker` process in its own directory; stopped by its pid only."""

    def __init__(self, daemon: Daemon, name: str, directory: Path, *, pool: str = "team", slots: int = 2) -> None:
        self.name = name
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        argv = [
            str(BIN / "numerusd"),
            "--log-level",
            "debug",
            "worker",
            "--name",
            name,
            "--pool",
            pool,
            "--slots",
            str(slots),
            "--dir",
            str(directory),
            "--connection",
            str(daemon.state_dir / "worker.json"),
            "--config",
            str(daemon.state_dir / "numerus.toml"),
            "--heartbeat-s",
            "0.5",
        ]
        self.log = open(directory.parent / f"{name}.stderr", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=self.log, cwd=directory)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture
def team(tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    repo = git_repo(tmp_path / "repo")
    config = 'claims = "plan"\nreview = false\ndefault_agent = "team"\nworker_lease_s = 3\nbackoff_s = [0.2]\n'
    with Daemon(tmp_path / "state", agents={"team": scenario(1.0)}, config=config).start() as daemon:
        yield daemon, repo


def test_two_workers_run_a_planned_job_and_one_killed_mid_task_loses_its_attempt(team, tmp_path: Path) -> None:
    daemon, repo = team
    first = Worker(daemon, "w1", tmp_path / "hosts" / "one")
    second = Worker(daemon, "w2", tmp_path / "hosts" / "two")
    try:
        asyncio.run(_two_workers(daemon, repo, first, second))
    finally:
        first.stop(signal.SIGKILL)
        second.stop()


async def _two_workers(daemon: Daemon, repo: Path, first: Worker, second: Worker) -> None:
    job = daemon.ctl("run", "six notes", "--repo", str(repo), "--pool", "team", "--parallel", "4", check=True)
    job_id = job.stdout.strip()
    async with daemon.client() as client:
        # t1 (the slowest) runs on a worker: the test kills the worker that runs it.
        view = await client.wait_for(
            job_id, lambda v: any(t["id"] == "t1" and t["worker"] and t["status"] == "running" for t in v["tasks"])
        )
        (t1,) = [t for t in view["tasks"] if t["id"] == "t1"]
        victim = first if t1["worker"] == first.name else second
        offered = [e for e in await client.events(job_id) if e["type"] == "TaskOffered" and e["task"] == "t1"]
        lost_lease = offered[-1]["data"]["lease"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)

        view = await client.wait_for(job_id, lambda v: v["status"] in ("completed", "failed"), timeout=90)
        assert view["status"] == "completed", view
        events = await client.events(job_id)

    # The attempts the killed worker held (t1, maybe one more) are recorded lost, not failed, once each, and ran
    # again on the other worker.
    lost = {e["task"]: (e["data"]["worker"], e["data"]["lease"]) for e in events if e["type"] == "TaskLost"}
    assert lost["t1"] == (victim.name, lost_lease)
    assert {worker for worker, _ in lost.values()} == {victim.name}
    assert len(lost) == len([e for e in events if e["type"] == "TaskLost"])
    assert not [e for e in events if e["type"] in ("TaskFailed", "TaskRetryScheduled")]
    taken = {e["task"]: e["data"]["worker"] for e in events if e["type"] == "TaskTaken"}  # the last taker of each
    survivor = second if victim is first else first
    assert {task: taken[task] for task in lost} == dict.fromkeys(lost, survivor.name)
    assert set(taken) == set(TASKS)
    # Every task's work merged exactly once, and its file says which attempt wrote it.
    merged = [e["task"] for e in events if e["type"] == "TaskMerged"]
    assert sorted(merged) == TASKS
    integration = f"numerus/{job_id}.integration"
    merges = git(repo, "log", "--merges", "--format=%s", integration).splitlines()
    assert sorted(line.split(":")[0].removeprefix("Merge ") for line in merges) == TASKS
    for task in TASKS:
        note = git(repo, "show", f"{integration}:{task}.md")
        assert note.startswith(f"{task}, attempt"), note
    assert git(repo, "show", f"{integration}:t1.md").strip() == "t1, attempt 2"
    assert daemon.ctl("audit", "verify", job_id).returncode == 0
    # What the agents printed on the workers reached the daemon's logs as a local agent's output does.
    logs = daemon.ctl("logs", job_id, "t2", check=True).stdout
    assert "Done." in logs

    # The killed worker's late result, sent again as it would have been: refused, recorded nowhere.
    before = len(events)
    refusal = await _late_result(daemon, lost_lease)
    assert refusal.ok is False and "no attempt holds lease" in refusal.reason
    async with daemon.client() as client:
        assert len(await client.events(job_id)) == before
    # The dead letter names the refused lease.
    assert await _dead_letter(daemon, "numerus.dlq.worker.stale_lease")

    listed = daemon.ctl_json("workers")["workers"]
    by_name = {w["name"]: w for w in listed}
    assert by_name[survivor.name]["pools"] == ["team"] and not by_name[survivor.name]["lost"]
    await eventually(lambda: {w["name"]: w for w in daemon.ctl_json("workers")["workers"]}[victim.name]["lost"], 10)


async def _late_result(daemon: Daemon, lease: str) -> work.ReportReply:
    """A Finished report under `lease`, sent as the worker user would send it."""
    login = json.loads((daemon.state_dir / "worker.json").read_text())
    nc = await nats.connect(login["url"], user=login["user"], password=login["password"], inbox_prefix="_INBOX_worker")
    try:
        report = work.Report(lease=lease, seq=99, body=work.Finished(commit="0" * 40))
        reply = await nc.request(work.worker_subject("w1", "report"), work.encoder.encode(report), timeout=10)
        return msgspec.json.decode(reply.data, type=work.ReportReply)
    finally:
        await nc.close()


async def _dead_letter(daemon: Daemon, subject: str) -> bool:
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        js = nc.jetstream()
        message = await js.get_last_msg("NUMERUS_DLQ", subject)
        return bool(message.data)
    finally:
        await nc.close()


def test_a_job_without_a_pool_runs_on_the_daemon_even_with_workers_up(team, tmp_path: Path) -> None:
    daemon, repo = team
    worker = Worker(daemon, "w1", tmp_path / "hosts" / "one")
    try:
        job_id = daemon.ctl("run", "six notes", "--repo", str(repo), check=True).stdout.strip()

        async def done() -> dict:
            async with daemon.client() as client:
                return await client.wait_for(job_id, lambda v: v["status"] in ("completed", "failed"), timeout=60)

        view = asyncio.run(done())
        assert view["status"] == "completed"
        assert all(t["worker"] is None for t in view["tasks"])
        assert not [e for e in daemon.events(job_id) if e["type"] == "TaskOffered"]
    finally:
        worker.stop()


def test_pool_names_are_checked_and_no_plan_cannot_go_to_a_pool(team) -> None:
    daemon, repo = team
    bad = daemon.ctl("run", "x", "--repo", str(repo), "--pool", "a.b")
    assert bad.returncode != 0 and "is not a pool name" in bad.stderr and len(bad.stderr.splitlines()) == 1
    in_place = daemon.ctl("run", "x", "--repo", str(repo), "--pool", "team", "--no-plan")
    assert in_place.returncode != 0 and "--no-plan works in the repository itself" in in_place.stderr
    assert daemon.alive
    assert os.path.exists(daemon.state_dir / "worker.json")


def test_a_workers_hostile_agent_is_contained_there_and_its_escapes_named_by_the_daemon(tmp_path: Path) -> None:
    """The trust suite's escapes, tried by an agent on a worker: it reads nothing of the worker's login, cache or
    the daemon's state, and what it left in its worktree (a symlink out, a file outside its claim, a write it
    reported through `..`) comes back to the daemon's gate, which names each as it does for a local agent."""
    repo = git_repo(tmp_path / "repo")
    state = tmp_path / "state"
    host = tmp_path / "hosts" / "one"
    attacks = {
        "login": f"cat {state}/worker.json",
        "cache": f"ls {host}/repos",
        "keys": f"cat {state}/keys.json",
    }
    plan = {
        "summary": "one",
        "tasks": [{"id": "a", "title": "A", "instructions": "a", "intents": [{"path": "A.md", "mode": "create"}]}],
    }
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "executor"},
                "steps": [
                    *({"run": command} for command in attacks.values()),
                    {"write": "A.md", "content": "a\n"},
                    {"write": "OTHER.md", "content": "not claimed\n"},
                    {"run": "ln -s /etc/passwd link.txt"},
                    {"write": "../../x", "content": "escaped\n"},
                ],
            },
        ]
    }
    config = 'claims = "plan"\nreview = false\ndefault_agent = "team"\nmax_attempts = 1\nmax_replans = 0\n'
    with Daemon(state, agents={"team": team}, config=config).start() as daemon:
        worker = Worker(daemon, "w1", host)
        try:
            result = daemon.ctl("run", "one", "--repo", str(repo), "--pool", "team", "--wait", timeout=120)
            job = result.stdout.splitlines()[0].strip()
            view = daemon.status(job)
            events = daemon.events(job)
            log = daemon.ctl("logs", job, "a", check=True).stdout
            password = json.loads((state / "worker.json").read_text())["password"]
            assert worker.process.poll() is None and daemon.alive
        finally:
            worker.stop()
    (task,) = view["tasks"]
    assert task["status"] == "failed" and task["worker"] == "w1", task
    (violated,) = [e["data"]["violations"] for e in events if e["type"] == "ClaimViolated"]
    named = {v.split(": ")[0] for v in violated}
    assert {"../../x", "link.txt", "OTHER.md"} <= named, violated
    assert password not in log
    (exited,) = [e for e in events if e["type"] == "TaskExited"]
    ran = command_outputs(Path(exited["data"]["log_path"]))  # the daemon's copy of what the worker's agent printed
    for attack in ("login", "keys"):
        code, out = ran[attacks[attack]]
        assert code != 0 and ("No such file or directory" in out or "Permission denied" in out), (attack, out)
    # Of the worker's caches it sees only its own job's, read-only (its worktree's git directory), as a local
    # agent sees its job's mirror.
    assert ran[attacks["cache"]] == (0, f"{job}.git\n")
    assert not (tmp_path / "x").exists() and not (host.parent / "x").exists()
    assert git(repo, "for-each-ref", "refs/heads/numerus/").count("integration") == 1
