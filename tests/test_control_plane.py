"""The control plane stays responsive: `status` and submissions are answered while other clients' commands are
under way, many clients submitting at once all get their jobs, and a client flooding the daemon with requests
does not keep other clients' commands from being answered nor the daemon from running jobs.

Real `numerusd`, real NATS, the scripted agent; requests go through numerusctl's own connection module
(`numerusctl.connection`), as `numerusctl status` and `run` send them. Timings live in bench/bench_control.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest

from numerusctl.connection import connect, decode_reply, read_connection_file, request
from numerusd.protocol.commands import JOB_DONE, GetStatus, RunJob, RunReply, StatusReply
from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo

CLIENTS = 20


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose `quick` agent says one line and ends, and whose git waits, for one repository only
    (`slow`), until the test creates the file `open` beside it: a submission held up in its git calls, as one for
    a huge repository is."""
    real_git = shutil.which("git")
    assert real_git is not None
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    slow, gate = tmp_path / "slow", tmp_path / "open"
    (wrappers / "git").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-C" ] && [ "$2" = "{slow}" ]; then\n'
        f"  touch {tmp_path}/entered\n"
        f"  while [ ! -e {gate} ]; do sleep 0.02; done\n"
        "fi\n"
        f'exec {real_git} "$@"\n'
    )
    (wrappers / "git").chmod(0o755)
    d = Daemon(
        tmp_path / "state",
        agents={"quick": [{"say": "done"}]},
        config="max_agents = 8\n",
        env={"PATH": f"{wrappers}:{os.environ['PATH']}"},
    )
    yield d.start()
    d.stop()


async def client(daemon: Daemon) -> nats.aio.client.Client:
    """One numerusctl connection (the operator's login, from the daemon's connection file)."""
    return await connect(read_connection_file(daemon.state_dir / "connection.json"), 10)


async def submit(nc: nats.aio.client.Client, repo: Path, *, plan: bool = False) -> str:
    job = RunJob(goal=f"work in {repo.name}", repo=str(repo), agent="quick", plan=plan)
    reply: RunReply = decode_reply("run", await request(nc, "run", job, 60))
    return reply.job


async def status(nc: nats.aio.client.Client, job: str | None = None) -> StatusReply:
    return decode_reply("status", await request(nc, "status", GetStatus(job=job), 10))


async def test_status_and_other_submissions_are_answered_while_a_submission_waits_on_git(daemon, tmp_path):
    slow = git_repo(tmp_path / "slow")
    fast = git_repo(tmp_path / "fast")
    first, second = await client(daemon), await client(daemon)
    try:
        held = asyncio.ensure_future(submit(first, slow, plan=True))
        await eventually(lambda: (tmp_path / "entered").exists(), timeout=30)
        # The first submission is in its git calls, and stays there until the gate opens: meanwhile another
        # client is answered, and its own submission accepted and run.
        assert (await status(second)).jobs == []
        job = await submit(second, fast)
        assert [view.id for view in (await status(second)).jobs] == [job]

        async def ended() -> bool:
            return (await status(second, job)).jobs[0].status in JOB_DONE

        await eventually(ended, timeout=60, interval=0.1)
        assert (await status(second, job)).jobs[0].status == "completed"
        assert not held.done()
        (tmp_path / "open").touch()
        slow_job = await held
        assert slow_job != job
        assert {view.id for view in (await status(second)).jobs} == {job, slow_job}
    finally:
        (tmp_path / "open").touch()
        await first.close()
        await second.close()


async def test_twenty_clients_submitting_at_once_get_twenty_jobs_and_none_is_lost(daemon, tmp_path):
    repos = [git_repo(tmp_path / f"repo{n}") for n in range(CLIENTS)]
    clients = [await client(daemon) for _ in repos]
    watcher = await client(daemon)
    seen: list[int] = []
    submitting = True

    async def watch() -> None:
        # `status` answers all along, and the count of jobs it gives never goes back.
        while submitting:
            seen.append((await status(watcher)).total)
            await asyncio.sleep(0.01)

    try:
        watching = asyncio.ensure_future(watch())
        ids = await asyncio.gather(*(submit(nc, repo) for nc, repo in zip(clients, repos, strict=True)))
        submitting = False
        await watching
        assert len(set(ids)) == CLIENTS
        assert seen == sorted(seen) and seen[-1] <= CLIENTS

        async def all_ended() -> bool:
            listed = (await status(watcher)).jobs
            return len(listed) == CLIENTS and all(view.status in JOB_DONE for view in listed)

        await eventually(all_ended, timeout=120, interval=0.2)
        listed = {view.id: view for view in (await status(watcher)).jobs}
        assert set(listed) == set(ids)
        assert {view.status for view in listed.values()} == {"completed"}
        assert {view.repo for view in listed.values()} == {str(repo) for repo in repos}
        async with daemon.client() as reader:  # and the stream has each, submitted once
            for job in ids:
                types = [event["type"] for event in await reader.events(job)]
                assert types.count("JobSubmitted") == 1 and types[-1] == "JobCompleted"
    finally:
        for nc in [*clients, watcher]:
            await nc.close()


async def test_a_client_flooding_the_daemon_does_not_keep_others_from_being_answered_nor_jobs_from_running(
    daemon, tmp_path
):
    """Hostile: one client sends hundreds of requests at once (status, submissions the daemon refuses, bytes that
    are no request); meanwhile another client submits a job, asks its status and sees it complete."""
    repo = git_repo(tmp_path / "repo")
    connection = daemon.connection()
    flooder = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    other = await client(daemon)
    try:
        bad_run = msgspec.json.encode(RunJob(goal="flood", repo="relative/path", agent="quick", plan=False))
        flood = [flooder.request("numerus.cmd.status", b"{}", timeout=60) for _ in range(300)]
        flood += [flooder.request("numerus.cmd.run", bad_run, timeout=60) for _ in range(100)]
        flood += [flooder.request("numerus.cmd.run", b'{"goal": ', timeout=60) for _ in range(100)]
        flooding = asyncio.ensure_future(asyncio.gather(*flood))
        job = await submit(other, repo)

        async def ended() -> bool:
            return (await status(other, job)).jobs[0].status in JOB_DONE

        await eventually(ended, timeout=60, interval=0.1)
        assert (await status(other, job)).jobs[0].status == "completed"
        replies = await flooding
        assert all(not reply.headers for reply in replies[:300])
        listed = [decode_reply("status", reply.data).jobs for reply in replies[:300]]
        assert all(view.id == job for views in listed for view in views)
        refused = [reply.headers.get("Nats-Service-Error-Code") for reply in replies[300:]]
        assert refused == ["400"] * 200
        assert [view.id for view in (await status(other)).jobs] == [job]
        assert daemon.alive
    finally:
        await flooder.close()
        await other.close()
