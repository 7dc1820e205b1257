"""numerusctl as a user meets it: usage errors, no daemon, error replies, following a job, and `audit verify`.

Against a real nats-server (the `nats_server` fixture). The daemon itself is not started here; the end-to-end
tests with it are in test_run.py, test_kill.py and test_audit_verify.py. The only stand-in is a responder on
`numerus.cmd.status` that answers with an error, over real NATS request/reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from nats.aio.client import Client
from nats.js.api import StreamConfig

from numerusctl.cli import _follow_job, _follow_logs, cli
from numerusctl.render import event_line, jobs_table
from numerusd.config import write_connection_file
from numerusd.embedded_nats import EmbeddedNats
from numerusd.protocol import events as ev
from numerusd.protocol.commands import JobView, TaskView
from numerusd.protocol.envelope import Sealed, seal

NUMERUSCTL = str(Path(sys.executable).parent / "numerusctl")
KEY = bytes(range(32))
JOB = "01JTESTJOB0000000000000000"


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def ainvoke(*args: str) -> Result:
    # numerusctl runs its own event loop: in an async test it must run in another thread.
    return await asyncio.to_thread(invoke, *args)


def one_line_error(result: Result | subprocess.CompletedProcess[str]) -> str:
    """The single stderr line numerusctl printed, checked to be one line and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("numerusctl: ")
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chain(job: str, *, tasks: int = 1, end: ev.EventData | None = None) -> list[Sealed]:
    """A job's events, sealed and chained with KEY."""
    script: list[tuple[ev.EventData, str | None]] = [(ev.JobSubmitted(goal="say hi", repo="/r", agent="s"), None)]
    for n in range(tasks):
        script += [
            (ev.TaskCreated(title="greet", instructions="say hi", agent="s"), f"t{n}"),
            (ev.TaskStarted(attempt=1, agent="s", argv=("s",), workdir="/w", log_path="/l"), f"t{n}"),
            (ev.AgentMessageReceived(text="hello\nworld"), f"t{n}"),
            (ev.TaskExited(exit_code=0, log_path="/l", log_sha256="0" * 64, log_bytes=6, duration_s=0.5), f"t{n}"),
            (ev.TaskCompleted(), f"t{n}"),
        ]
    script.append((end or ev.JobCompleted(), None))
    sealed, prev = [], ""
    t0 = datetime(2025, 5, 1, tzinfo=UTC)
    for i, (data, task) in enumerate(script):
        s = seal(
            data,
            id=f"{job[:20]}E{i:05d}",
            job=job,
            task=task,
            time=t0 + timedelta(seconds=i),
            actor="numerusd",
            correlation_id=job,
            causation_id=None,
            prev=prev,
            kid="k1",
            key=KEY,
        )
        sealed.append(s)
        prev = s.digest
    return sealed


@pytest.fixture
def state_dir(tmp_path: Path, nats_server: EmbeddedNats) -> Path:
    """A state directory as numerusd leaves it: connection file and keys (but no daemon)."""
    state = tmp_path / "state"
    write_connection_file(state / "connection.json", nats_server.url, nats_server.user, nats_server.password)
    (state / "keys.json").write_text(json.dumps({"current": "k1", "keys": {"k1": KEY.hex()}}))
    return state


@pytest.fixture
async def streams(nc: Client) -> Client:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="NUMERUS_EVENTS", subjects=["numerus.job.>"], deny_delete=True))
    await js.add_stream(StreamConfig(name="NUMERUS_LOGS", subjects=["numerus.log.>"]))
    return nc


async def publish(nc: Client, events: list[Sealed]) -> list[int]:
    js = nc.jetstream()
    return [(await js.publish(s.envelope.subject, s.wire)).seq for s in events]


# --- usage: exit 2 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run"], "Missing argument 'GOAL'"),
        (["run", "do it", "--repo", "/no/such/dir"], "'/no/such/dir' does not exist"),
        (["run", "do it"], "Missing option '--repo'"),
        (["status", "a.b"], "'a.b' is not an id"),
        (["logs", "J", "--task", ">"], "'>' is not an id"),
        (["audit", "verify", "--expect-head", "ab"], "--expect-head needs a JOB"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], says: str):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert says in one_line_error(result)
    assert "--help')" in result.stderr


def test_repo_must_be_a_directory(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    result = invoke("run", "goal", "--repo", str(tmp_path / "file"))
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_bad_key_file_is_a_usage_error(tmp_path: Path):
    result = invoke("--state-dir", str(tmp_path), "audit", "verify")
    assert result.exit_code == 2
    assert one_line_error(result) == f"numerusctl: no key file at {tmp_path / 'keys.json'}; pass --key-file"
    (tmp_path / "keys.json").write_text('{"keys": {"k1": "not hex"}}')
    assert invoke("--state-dir", str(tmp_path), "audit", "verify").exit_code == 2


# --- no daemon: exit 3, one line, no traceback -----------------------------------------------------------------


def test_no_connection_file_exits_3_with_a_hint(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMERUS_")}
    result = subprocess.run(
        [NUMERUSCTL, "--state-dir", str(tmp_path), "status"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 3
    line = one_line_error(result)
    assert str(tmp_path / "connection.json") in line
    assert line.endswith("start it with 'numerusd' or pass --state-dir/--nats-url")
    assert result.stdout == ""


def test_nothing_listening_exits_3_naming_the_url(tmp_path: Path):
    port = free_port()
    write_connection_file(tmp_path / "connection.json", f"nats://127.0.0.1:{port}", "u", "p")
    result = subprocess.run(
        [NUMERUSCTL, "--state-dir", str(tmp_path), "kill", "J1"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert one_line_error(result) == (
        f"numerusctl: cannot reach numerusd at nats://127.0.0.1:{port} (connection refused); "
        "start it with 'numerusd' or pass --state-dir/--nats-url"
    )
    url = f"nats://someone:secret@127.0.0.1:{port}"
    result = invoke("status", env={"NUMERUS_NATS_URL": url})
    assert result.exit_code == 3 and "secret" not in result.stderr
    assert f"cannot reach numerusd at nats://127.0.0.1:{port} (connection refused)" in one_line_error(result)


async def test_server_without_daemon_or_with_wrong_password_exits_3(state_dir: Path, nats_server: EmbeddedNats):
    result = await ainvoke("--state-dir", str(state_dir), "status")
    assert result.exit_code == 3
    assert "numerusd is not running on nats://127.0.0.1:" in one_line_error(result)
    result = await ainvoke("--nats-url", nats_server.url, "--nats-user", "numerus", "--nats-password", "x", "status")
    assert result.exit_code == 3
    assert "(authorization failed: wrong user, password or credentials)" in one_line_error(result)


# --- an error reply: exit 1, one line ---------------------------------------------------------------------------


async def test_error_reply_prints_its_message_and_exits_1(state_dir: Path, nc: Client):
    async def refuse(msg) -> None:
        assert json.loads(msg.data) == {"job": "01NOSUCHJOB"}
        body = json.dumps({"code": "not_found", "message": "no job '01NOSUCHJOB'; 'numerusctl status' lists the jobs"})
        await nc.publish(
            msg.reply,
            body.encode(),
            headers={"Nats-Service-Error": "no job '01NOSUCHJOB'", "Nats-Service-Error-Code": "404"},
        )

    await nc.subscribe("numerus.cmd.status", cb=refuse)
    await nc.flush()
    result = await ainvoke("--state-dir", str(state_dir), "status", "01NOSUCHJOB")
    assert result.exit_code == 1
    assert one_line_error(result) == "numerusctl: no job '01NOSUCHJOB'; 'numerusctl status' lists the jobs"
    assert result.stdout == ""


# --- audit verify against a real stream --------------------------------------------------------------------------


async def test_audit_verify_passes_then_names_a_forged_event(state_dir: Path, streams: Client):
    other = "01JOTHERJOB000000000000000"
    await publish(streams, chain(JOB, tasks=2))
    await publish(streams, chain(other, end=ev.JobFailed(reason="tests failed")))

    result = await ainvoke("--state-dir", str(state_dir), "audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 19 events in 2 jobs")

    result = await ainvoke("--state-dir", str(state_dir), "--json", "audit", "verify", JOB)
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["problems"] == [] and report["verified"] == 12
    (job,) = report["jobs"]
    assert job["tail"] == "finished" and job["head"] == chain(JOB, tasks=2)[-1].digest

    forged = json.dumps({"id": "01FORGED", "type": "JobCompleted", "job": JOB, "data": {}}).encode()
    ack = await streams.jetstream().publish(f"numerus.job.{JOB}.whatever", forged)
    for args in (["audit", "verify"], ["audit", "verify", JOB]):
        result = await ainvoke("--state-dir", str(state_dir), *args)
        assert result.exit_code == 1, result.output
        (problem,) = [line for line in result.stdout.splitlines() if "01FORGED" in line]
        assert problem.startswith(f"seq={ack.seq} id=01FORGED job={JOB} type=JobCompleted: malformed")
        assert result.stdout.splitlines()[-1].startswith("FAILED: 1 problem(s)")

    # The other job is untouched, and an expected head that is not there shows a truncated history.
    assert (await ainvoke("--state-dir", str(state_dir), "audit", "verify", other)).exit_code == 0
    result = await ainvoke("--state-dir", str(state_dir), "audit", "verify", other, "--expect-head", "ab" * 32)
    assert result.exit_code == 1 and "truncated" in result.stdout


async def test_audit_verify_with_a_wrong_key_names_every_event(state_dir: Path, streams: Client, tmp_path: Path):
    seqs = await publish(streams, chain(JOB, tasks=0))
    keys = tmp_path / "other-keys.json"
    keys.write_text(json.dumps({"current": "k1", "keys": {"k1": "00" * 32}}))
    result = await ainvoke("--state-dir", str(state_dir), "audit", "verify", "--key-file", str(keys))
    assert result.exit_code == 1
    assert [line.split()[0] for line in result.stdout.splitlines()[:-1]] == [f"seq={seq}" for seq in seqs]
    assert all("bad_signature" in line for line in result.stdout.splitlines()[:-1])


async def test_audit_verify_of_an_unknown_job_or_a_missing_stream_fails(state_dir: Path, nc: Client):
    result = await ainvoke("--state-dir", str(state_dir), "audit", "verify", JOB)
    assert result.exit_code == 1
    assert "stream NUMERUS_EVENTS does not exist" in one_line_error(result)
    await nc.jetstream().add_stream(StreamConfig(name="NUMERUS_EVENTS", subjects=["numerus.job.>"]))
    result = await ainvoke("--state-dir", str(state_dir), "audit", "verify", JOB)
    assert result.exit_code == 1 and result.stdout == f"no events of job {JOB} in NUMERUS_EVENTS\n"


# --- following a job (the code behind `run --wait` and `logs -f`) ------------------------------------------------


async def test_follow_job_prints_progress_and_exits_by_outcome(streams: Client, capsys: pytest.CaptureFixture[str]):
    failed = "01JFAILEDJOB00000000000000"
    events = chain(JOB)
    await publish(streams, events[:3])
    follow = asyncio.create_task(_follow_job(streams, JOB, as_json=False))
    await publish(streams, chain(failed, end=ev.JobFailed(reason="tests failed")))
    await publish(streams, events[3:])
    assert await asyncio.wait_for(follow, 10) == 0
    assert capsys.readouterr().out.splitlines() == [
        "task t0 created: greet",
        "task t0 started (attempt 1, agent s)",
        "t0> hello",
        "t0> world",
        "task t0 exited with code 0 after 0.5 s",
        "task t0 completed",
        f"job {JOB} completed",
    ]
    assert await asyncio.wait_for(_follow_job(streams, failed, as_json=True), 10) == 1
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1])["data"] == {"reason": "tests failed"}


async def test_follow_logs_writes_chunks_raw_and_stops_after_the_job_ends(
    streams: Client, capsysbinary: pytest.CaptureFixture[bytes]
):
    js = streams.jetstream()
    events = chain(JOB)
    await publish(streams, events[:3])
    await js.publish(f"numerus.log.{JOB}.t0", b"\x1b[1mhello\x1b[0m\r\n")
    follow = asyncio.create_task(_follow_logs(streams, JOB, None))
    await js.publish(f"numerus.log.{JOB}.t0", b"wor")
    await js.publish(f"numerus.log.{JOB}.t0", b"ld\r\n")
    await publish(streams, events[3:])
    assert await asyncio.wait_for(follow, 10) == 0
    assert capsysbinary.readouterr().out == b"\x1b[1mhello\x1b[0m\r\nworld\r\n"


# --- rendering ---------------------------------------------------------------------------------------------------


def test_status_table_and_event_lines_are_aligned_plain_text():
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    task = TaskView(id="t1", title="x", agent="codex", status="completed", input_tokens=1500, output_tokens=200)
    jobs = [
        JobView(
            id="01JA",
            goal="make the failing test pass\nplease",
            repo="/r",
            agent="codex",
            status="running",
            created=now - timedelta(minutes=5),
            updated=now,
            events=9,
            tasks=[task, TaskView(id="t2", title="y", agent="codex", status="running")],
        ),
        JobView(
            id="01JBBBBB", goal="g", repo="/r", agent="scripted", status="completed", created=now, updated=now, events=3
        ),
    ]
    assert jobs_table(jobs, now).splitlines() == [
        "JOB       STATUS     AGENT     TASKS  TOKENS  AGE  GOAL",
        "01JA      running    codex     1/2    1.7k    5m   make the failing test pass please",
        "01JBBBBB  completed  scripted  0/0    0       0s   g",
    ]
    line = event_line(12, chain(JOB)[3].wire)
    assert line.split()[0] == "12" and "AgentMessageReceived" in line and line.endswith("t0     hello world")
    assert "not a valid event" in event_line(None, b'{"id": 1}')
