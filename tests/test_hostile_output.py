"""Hostile agents and clients, item 7 and 8 of issue 14: anything printed or sent is survivable.

Each test runs one attack against a real daemon and checks what a user would: the daemon keeps answering, the
job ends as it should, what was too big is recorded cut with its size and hash (or refused in one line), and
what an agent printed cannot drive the operator's terminal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from numerusd.keys import Keyring
from numerusd.protocol.events import JobKilled, JobSubmitted
from tests.daemon_harness import Daemon, git_repo
from tests.test_projections import Chain

pytestmark = pytest.mark.slow  # real daemons fed megabytes

FLOOD_BYTES = 64 << 20
#: 64 MB with no newline, straight to the agent's terminal (not through the scripted agent's JSON).
FLOOD = [{"run": f"head -c {FLOOD_BYTES} /dev/zero | tr '\\0' x > /dev/tty"}, {"say": "flooded"}]
BIG_MESSAGE = "m" * 9_000_000
#: Clears the screen, sets the window title, rings the bell, and hides a line behind a carriage return.
#: Jobs whose list (goals cut to 1,000 characters) is more than half the embedded server's 8 MB max_payload.
JOBS = 4000
ESCAPES = "\x1b[2J\x1b]0;pwned\x07ok\rhidden \x9b31m"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile-output")
    agents = {
        "flood": FLOOD,
        "big": [{"say": BIG_MESSAGE}, {"say": "after the big one"}],
        "escapes": [{"print": ESCAPES + "\n"}, {"say": ESCAPES}],
        "quiet": [{"say": "ok"}],
    }
    d = Daemon(root / "state", agents=agents)
    d.start()
    yield d
    assert d.stop() == 0, d.stderr()


async def connect(daemon: Daemon) -> Client:
    connection = daemon.connection()
    return await nats.connect(connection["url"], user=connection["user"], password=connection["password"])


async def ask(nc: Client, verb: str, body: bytes) -> tuple[str | None, dict]:
    """The error code of the reply (None when it is not an error) and its JSON."""
    reply = await nc.request(f"numerus.cmd.{verb}", body, timeout=10)
    code = (reply.headers or {}).get("Nats-Service-Error-Code")
    return code, json.loads(reply.data)


def submit(daemon: Daemon, repo: Path, agent: str) -> str:
    result = daemon.ctl("run", "--no-plan", "Do it", "--repo", str(repo), "--agent", agent, check=True)
    return result.stdout.strip()


async def test_a_64_mb_line_without_a_newline_keeps_the_daemon_responsive(daemon: Daemon, tmp_path: Path):
    job = submit(daemon, git_repo(tmp_path / "repo"), "flood")
    nc = await connect(daemon)
    try:
        slowest, view = 0.0, {}
        deadline = time.monotonic() + 120
        while view.get("status") not in ("completed", "failed") and time.monotonic() < deadline:
            started = time.monotonic()
            code, reply = await ask(nc, "status", json.dumps({"job": job}).encode())
            slowest = max(slowest, time.monotonic() - started)
            assert code is None, reply
            (view,) = reply["jobs"]
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert view["status"] == "completed", view
    assert slowest < 1.0, f"status took {slowest:.2f} s while the agent flooded its terminal"
    (task,) = view["tasks"]
    assert Path(task["log_path"]).stat().st_size > FLOOD_BYTES  # all of it kept in the run log


async def test_a_9_mb_agent_message_is_recorded_cut_with_its_size_and_hash(daemon: Daemon, tmp_path: Path):
    job = submit(daemon, git_repo(tmp_path / "repo"), "big")
    events = daemon.events(job)
    for _ in range(600):
        if events[-1]["type"] in ("JobCompleted", "JobFailed"):
            break
        await asyncio.sleep(0.1)
        events = daemon.events(job)
    assert events[-1]["type"] == "JobCompleted", [e["type"] for e in events]
    messages = [e["data"] for e in events if e["type"] == "AgentMessageReceived"]
    assert messages[-1]["text"] == "after the big one"
    big = messages[0]
    whole = BIG_MESSAGE.encode()
    assert big["truncated"] == [{"field": "text", "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}]
    assert BIG_MESSAGE.startswith(big["text"].split(" [numerus: truncated")[0])
    assert len(json.dumps(big)) <= 256 * 1024
    assert "AgentMessageReceived" in daemon.ctl("events", job, check=True).stdout
    (task,) = daemon.status(job)["tasks"]
    assert BIG_MESSAGE.encode() in Path(task["log_path"]).read_bytes()  # the run log has all of it


async def test_huge_requests_are_refused_in_one_line_and_status_and_events_still_answer(daemon: Daemon, tmp_path):
    repo = git_repo(tmp_path / "repo")
    nc = await connect(daemon)
    try:
        huge = json.dumps({"goal": "g" * 7_800_000, "repo": str(repo), "plan": False}).encode()
        code, reply = await ask(nc, "run", huge)
        assert code == "413" and reply["code"] == "too_large"
        assert reply["message"].startswith(f"the run request is {len(huge)} bytes, over the limit of 1048576 bytes")
        large = json.dumps({"goal": "g" * 200_000, "repo": str(repo), "plan": False}).encode()
        code, reply = await ask(nc, "run", large)
        assert code == "400" and "the goal is 200000 bytes, over the limit of 131072 bytes" in reply["message"]
        goal = "g" * 100_000  # under the goal limit: accepted, shown whole for the job, cut in a list of jobs
        body = {"goal": goal, "repo": str(repo), "plan": False, "agent": "quiet"}
        code, reply = await ask(nc, "run", json.dumps(body).encode())
        assert code is None, reply
        code, reply = await ask(nc, "status", json.dumps({"job": reply["job"]}).encode())
        assert code is None and reply["jobs"][0]["goal"] == goal
        code, reply = await ask(nc, "status", b"{}")
        assert code is None, reply
        assert reply["jobs"][0]["goal"] == "g" * 1000 + " [numerus: truncated]"
        code, reply = await ask(nc, "events", json.dumps({"limit": 5000}).encode())
        assert code is None, reply
    finally:
        await nc.close()
    assert daemon.ctl("status", check=True).returncode == 0
    assert daemon.ctl("events", check=True).returncode == 0


async def test_garbage_requests_leave_dead_letters_bounded_in_bytes(daemon: Daemon):
    nc = await connect(daemon)
    try:
        js = nc.jetstream()
        before = (await js.stream_info("NUMERUS_DLQ")).state.bytes
        for n in range(15):
            code, reply = await ask(nc, "status", bytes([n]) * 8_000_000)
            assert (code, reply["code"]) == ("413", "too_large")
        info = await js.stream_info("NUMERUS_DLQ")
        assert info.config.max_bytes == 64 << 20 and info.config.max_msg_size == 128 << 10
        assert info.state.bytes - before < 15 * (128 << 10), "each dead letter is cut to the message cap"
        last = await js.get_last_msg("NUMERUS_DLQ", "numerus.dlq.cmd.too_large")
        assert last.headers["Numerus-Size"] == "8000000"
        assert last.headers["Numerus-Sha256"] == hashlib.sha256(bytes([14]) * 8_000_000).hexdigest()
    finally:
        await nc.close()


def ctl_bytes(daemon: Daemon, *args: str) -> bytes:
    """numerusctl's stdout as bytes, exactly (text mode would turn a bare carriage return into a newline)."""
    result = subprocess.run(daemon.ctl_argv(*args), capture_output=True, timeout=60, check=True)
    return result.stdout


async def test_escape_sequences_an_agent_prints_are_shown_escaped_unless_raw(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = submit(daemon, repo, "escapes")
    progress = ctl_bytes(daemon, "run", "--no-plan", "Do it", "--repo", str(repo), "--agent", "escapes", "--wait")
    # The message as progress lines (a line per line of it), as an event summary, and the terminal output.
    assert b"t1> \\x1b[2J\\x1b]0;pwned\\x07ok\nt1> hidden \\x9b31m\n" in progress
    events = ctl_bytes(daemon, "events", job)
    logs = ctl_bytes(daemon, "logs", job)
    assert b"\\x1b[2J\\x1b]0;pwned\\x07ok hidden \\x9b31m" in events  # a summary is one line: whitespace collapsed
    assert b"\\x1b[2J\\x1b]0;pwned\\x07ok\\x0dhidden \\x9b31m" in logs
    for output in (progress, events, logs):
        assert not any(control in output for control in (b"\x1b", b"\x07", b"\r", "\x9b".encode())), output
    raw = ctl_bytes(daemon, "logs", job, "--raw")
    assert ESCAPES.encode() in raw  # as the agent printed it


async def test_a_list_of_jobs_too_long_for_one_message_comes_in_pages(tmp_path: Path):
    daemon = Daemon(tmp_path / "state").start()
    try:
        keyring = Keyring.load(daemon.state_dir / "keys.json")
        nc = await connect(daemon)
        try:
            js = nc.jetstream(publish_async_max_pending=2000)
            for n in range(JOBS):  # all created at the same instant: the cursor's tie-break is the id
                chain = Chain(f"J{n:05d}", keyring.current_kid, keyring.current_key)
                for event in (chain(JobSubmitted(goal=f"{n} " + "g" * 1500, repo="/r", agent="a")), chain(JobKilled())):
                    await js.publish_async(event.envelope.subject, event.wire)
            await js.publish_async_completed()
        finally:
            await nc.close()
        daemon.stop()
        daemon.start()
        nc = await connect(daemon)
        try:
            reply = await nc.request("numerus.cmd.status", b"{}", timeout=10)
            page = json.loads(reply.data)
            assert page["next"] == page["jobs"][-1]["id"] and len(page["jobs"]) < JOBS
            assert len(reply.data) <= nc.max_payload // 2 + 1024
        finally:
            await nc.close()
        listed = daemon.ctl_json("status", "--all")["jobs"]
        assert [job["id"] for job in listed] == [f"J{n:05d}" for n in reversed(range(JOBS))]  # each once, in order
        assert len(daemon.ctl_json("status", "--limit", str(JOBS - 5))["jobs"]) == JOBS - 5
    finally:
        daemon.stop()
