"""Bad input never hurts: every bad command gets one clear line, nothing is lost, and the daemon stays up."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import pytest
from nats.micro import add_service
from nats.micro.request import Request

from numerusd.event_caps import CUT_MARK
from numerusd.protocol.commands import REQUESTS, JobView, StatusReply
from numerusd.service import _respond
from tests.daemon_harness import Daemon, git_repo


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = Daemon(tmp_path_factory.mktemp("service") / "state").start()
    yield d
    assert d.stop() == 0


async def request(daemon: Daemon, subject: str, payload: bytes) -> nats.aio.msg.Msg:
    c = daemon.connection()
    nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
    try:
        return await nc.request(subject, payload, timeout=5)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", "malformed"),
        (b'{"goal": 3, "repo": "/tmp"}', "$.goal"),
        (b'{"goal": "x"}', "missing required field `repo`"),
        (b'{"goal": "x", "repo": "/tmp", "agnet": "codex"}', "unknown field `agnet`"),
    ],
)
async def test_bad_run_requests_get_a_clear_error_naming_the_problem(daemon: Daemon, payload: bytes, expected: str):
    reply = await request(daemon, "numerus.cmd.run", payload)
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    body = json.loads(reply.data)
    assert body["code"] == "bad_request"
    assert expected in body["message"]
    assert "\n" not in body["message"]
    assert daemon.alive
    assert daemon.ctl("status").returncode == 0


async def test_bad_requests_are_kept_in_the_dead_letter_stream(daemon: Daemon):
    await request(daemon, "numerus.cmd.status", b'{"job": ["a list"]}')
    c = daemon.connection()
    nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
    try:
        message = await nc.jetstream().get_last_msg("NUMERUS_DLQ", "numerus.dlq.cmd.bad_request")
        assert message.data == b'{"job": ["a list"]}'
        assert "$.job" in message.headers["Numerus-Reason"]
    finally:
        await nc.close()


def test_run_on_a_missing_repository_is_refused_in_one_line(daemon: Daemon, tmp_path: Path):
    result = daemon.ctl("run", "--no-plan", "goal", "--repo", str(tmp_path / "nowhere"))
    assert result.returncode in (1, 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nowhere" in result.stderr


@pytest.mark.parametrize(
    ("where", "expected"),
    [("/", "is the root directory"), ("state", "numerusd's state directory"), ("inside", "numerusd's state directory")],
)
def test_no_plan_refuses_to_put_an_agent_in_the_root_or_the_state_directory(daemon: Daemon, where: str, expected: str):
    repo = {"/": "/", "state": str(daemon.state_dir.parent), "inside": str(daemon.state_dir / "runs")}[where]
    Path(repo).mkdir(exist_ok=True)
    result = daemon.ctl("run", "--no-plan", "goal", "--repo", repo, "--agent", "scripted")
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert expected in line and "--repo" in line
    assert all(job["repo"] != repo for job in daemon.ctl_json("status", "--all")["jobs"])  # nothing recorded


def test_no_plan_says_that_its_agent_works_on_the_uncommitted_changes_in_place(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    (repo / "draft.md").write_text("not committed\n")
    reply = daemon.ctl_json("run", "--no-plan", "goal", "--repo", str(repo), "--agent", "scripted")
    (note,) = reply["notes"]
    assert note.startswith(f"1 uncommitted change in {repo} (draft.md): with --no-plan the agent works on them")


def test_run_with_an_unknown_agent_names_the_known_ones(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "--no-plan", "goal", "--repo", str(repo), "--agent", "gpt-99")
    assert result.returncode == 1
    assert "unknown agent 'gpt-99'" in result.stderr and "scripted" in result.stderr
    assert [j for j in daemon.ctl_json("status")["jobs"] if j["repo"] == str(repo)] == []  # nothing recorded


async def test_run_with_an_unknown_role_is_refused_by_name(daemon: Daemon, tmp_path: Path):
    # numerusctl checks `--role ROLE=PROFILE` itself; another client's request is checked by the daemon.
    body = json.dumps({"goal": "g", "repo": str(git_repo(tmp_path / "repo")), "roles": {"plannr": "scripted"}})
    reply = await request(daemon, "numerus.cmd.run", body.encode())
    error = json.loads(reply.data)
    assert error["code"] == "bad_request"
    assert error["message"] == "unknown role 'plannr'; the roles are planner, queen, claimer, executor, reviewer"


def test_empty_goal_is_refused(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "--no-plan", "   ", "--repo", str(repo), "--agent", "scripted")
    assert result.returncode == 1
    assert "goal is empty" in result.stderr


def test_status_of_unknown_job_is_not_found(daemon: Daemon):
    result = daemon.ctl("status", "01NOSUCHJOB0000000000000000")
    assert result.returncode == 1
    assert "no job" in result.stderr


async def test_service_is_discoverable_as_a_nats_micro_service(daemon: Daemon):
    reply = await request(daemon, "$SRV.INFO.numerus", b"")
    info = json.loads(reply.data)
    assert info["name"] == "numerus"
    # Every verb of the protocol is an endpoint (a verb without its handler would fail here).
    assert sorted(e["subject"] for e in info["endpoints"]) == [f"numerus.cmd.{verb}" for verb in sorted(REQUESTS)]
    assert {"run", "status", "kill", "resume", "retry", "skip", "pause", "start", "diff", "accept", "approve"} <= set(
        REQUESTS
    )


def test_many_concurrent_bad_and_good_requests_leave_the_daemon_consistent(daemon: Daemon):
    async def flood() -> list[nats.aio.msg.Msg]:
        c = daemon.connection()
        nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
        try:
            bad = [nc.request("numerus.cmd.kill", b"{]", timeout=10) for _ in range(50)]
            good = [nc.request("numerus.cmd.status", b"{}", timeout=10) for _ in range(50)]
            return await asyncio.gather(*bad, *good)
        finally:
            await nc.close()

    replies = asyncio.run(flood())
    assert all(r.headers and r.headers["Nats-Service-Error-Code"] == "400" for r in replies[:50])
    assert all(not r.headers for r in replies[50:])
    assert daemon.alive


async def reply_of(nc: nats.aio.client.Client, reply: msgspec.Struct) -> nats.aio.msg.Msg:
    """What a client receives when the service answers `reply` (through the service's own `_respond`)."""

    async def endpoint(request: Request) -> None:
        await _respond(nc, request, "status", reply)

    service = await add_service(nc, name="fit", version="0.0.1")
    await service.add_endpoint(name="status", subject="test.fit", handler=endpoint)
    try:
        return await nc.request("test.fit", b"{}", timeout=10)
    finally:
        await service.stop()


def job_view(goal: str) -> JobView:
    now = datetime.now(UTC)
    return JobView(id="J", goal=goal, repo="/r", agent="a", status="running", created=now, updated=now, events=1)


async def test_a_reply_too_large_for_the_server_is_cut_or_answered_with_a_small_error(nc, caplog):
    answer = await reply_of(nc, StatusReply(jobs=[job_view("g" * 2 * nc.max_payload)]))
    assert len(answer.data) <= nc.max_payload and not answer.headers
    (view,) = json.loads(answer.data)["jobs"]
    assert view["goal"].endswith(CUT_MARK)
    # Nothing long to cut: too many jobs to list in one message. The client gets one clear line, the log the rest.
    answer = await reply_of(nc, StatusReply(jobs=[job_view("g")] * (nc.max_payload // 100)))
    assert answer.headers["Nats-Service-Error-Code"] == "500"
    error = json.loads(answer.data)
    assert error["code"] == "reply_too_large" and "ask for less" in error["message"]
    assert "reply to status on test.fit (request of 2 bytes, reply of" in caplog.text
