"""numerusctl as a user meets it: usage errors, no daemon, error replies, following a job, and `audit verify`.

Against a real nats-server (the `nats_server` fixture). The daemon itself is not started here; the end-to-end
tests with it are in test_run.py, test_kill.py and test_audit_verify.py. The only stand-ins are responders on
`numerus.cmd.<verb>` that record the request and answer as numerusd would, over real NATS request/reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result
from nats.aio.client import Client
from nats.js.api import StreamConfig

from numerusctl.cli import _follow_job, _follow_logs, cli
from numerusctl.render import clean_text, job_detail, jobs_table
from numerusctl.render_events import event_line, summary
from numerusd.config import write_connection_file
from numerusd.embedded_nats import EmbeddedNats
from numerusd.protocol import events as ev
from numerusd.protocol.claims import ClaimedPath, Conflict, Lock
from numerusd.protocol.commands import (
    CleanedJob,
    CleanReply,
    GetPlan,
    JobView,
    PlanReply,
    RunJob,
    RunReply,
    TaskView,
)
from numerusd.protocol.connection import ConnectionInfo, decode_connection, encode_connection
from numerusd.protocol.envelope import Sealed, seal
from numerusd.protocol.plan import FileIntent, Plan, PlannedTask

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


Script = list[tuple[ev.EventData, str | None]]


def chain(job: str, *, tasks: int = 1, end: ev.EventData | None = None) -> list[Sealed]:
    """A job's events, sealed and chained with KEY."""
    script: Script = [(ev.JobSubmitted(goal="say hi", repo="/r", agent="s"), None)]
    for n in range(tasks):
        script += [
            (ev.TaskCreated(title="greet", instructions="say hi", agent="s"), f"t{n}"),
            (ev.TaskStarted(attempt=1, agent="s", argv=("s",), workdir="/w", log_path="/l"), f"t{n}"),
            (ev.AgentMessageReceived(text="hello\nworld"), f"t{n}"),
            (ev.TaskExited(exit_code=0, log_path="/l", log_sha256="0" * 64, log_bytes=6, duration_s=0.5), f"t{n}"),
            (ev.TaskCompleted(), f"t{n}"),
        ]
    script.append((end or ev.JobCompleted(), None))
    return sealed_chain(job, script)


def sealed_chain(job: str, script: Script) -> list[Sealed]:
    """The events of `script` (payload, task) for `job`, sealed and chained with KEY, one second apart."""
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
        (["status", "a.b"], "'a.b' is not an id"),
        (["logs", "J", "--task", ">"], "'>' is not an id"),
        (["audit", "verify", "--expect-head", "ab"], "--expect-head needs a JOB"),
        (["frobnicate"], "No such command"),
        (["run", "g", "--repo", "/", "--role", "bad"], "'bad' is not ROLE=PROFILE (e.g. planner=strong)"),
        (["run", "g", "--repo", "/", "--role", "planner="], "'planner=' is not ROLE=PROFILE"),
        (["run", "g", "--repo", "/", "--role", "boss=x"], "unknown role 'boss'; the roles are planner, queen,"),
        (["run", "g", "--repo", "/", "--role", "queen=a", "--role", "queen=b"], "the queen is given twice (a and b)"),
        (["run", "g", "--repo", "/", "--parallel", "0"], "0 is not in the range 1<=x<=256"),
        (["run", "g", "--repo", "/", "--parallel", "257"], "257 is not in the range 1<=x<=256"),
        (["run", "g", "--repo", "/", "--check", " "], "a check is a shell command; this one is empty"),
        (
            ["run", "g", "--repo", "/", "--no-plan", "--check", "pytest", "--no-review", "--role", "planner=x"],
            "--no-plan runs one agent with no plan, claims, checks or review, so --role planner=..., --check, "
            "--no-review cannot apply",
        ),
        (["plan"], "Missing argument 'JOB'"),
        (["plan", "a.b"], "'a.b' is not an id"),
        (["plan", "J", "--format", "png"], "'png' is not one of 'text', 'dot', 'mermaid'"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], says: str):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert says in one_line_error(result)
    assert "--help')" in result.stderr


def test_version_is_the_installed_packages():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"numerusctl {version('numerus')}\n"


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


def test_connection_file_round_trips_through_the_protocol_struct(tmp_path: Path):
    path = tmp_path / "connection.json"
    write_connection_file(path, "nats://127.0.0.1:4222", "numerus", "s3cret")
    info = decode_connection(path.read_bytes())
    assert info == ConnectionInfo(url="nats://127.0.0.1:4222", user="numerus", password="s3cret", pid=os.getpid())
    assert encode_connection(info) == path.read_bytes()
    assert "s3cret" not in repr(info) and "password=<set>" in repr(info)
    # A member a later numerusd adds is ignored; a file without credentials has none.
    later = decode_connection(b'{"url": "nats://h:1", "user": null, "password": null, "pid": 7, "tls": true}')
    assert later == ConnectionInfo(url="nats://h:1", pid=7)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{not json", "malformed"),
        (b'["nats://127.0.0.1:4222"]', "Expected `object`, got `array`"),
        (b'{"user": "numerus"}', "Object missing required field `url`"),
        (b'{"url": 4222}', "Expected `str`, got `int` - at `$.url`"),
        (b'{"url": "nats://127.0.0.1:4222", "pid": "12"}', "Expected `int | null`, got `str` - at `$.pid`"),
    ],
)
def test_a_bad_connection_file_exits_3_in_one_line(tmp_path: Path, content: bytes, says: str):
    (tmp_path / "connection.json").write_bytes(content)
    result = invoke("--state-dir", str(tmp_path), "status", env={"NUMERUS_NATS_URL": ""})
    assert result.exit_code == 3
    line = one_line_error(result)
    assert line.startswith(f"numerusctl: cannot reach numerusd: {tmp_path / 'connection.json'} is not numerusd's")
    assert says in line
    assert line.endswith("start it with 'numerusd' or pass --state-dir/--nats-url")


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
        assert json.loads(msg.data) == {"job": "01NOSUCHJOB", "limit": None}
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


# --- what run and plan send, and what they print ---------------------------------------------------------------


class Responder:
    """numerusd's side of one verb over real NATS: records each request and answers with `reply` (a reply Struct,
    or `(code, message)` for an error reply)."""

    def __init__(self, nc: Client, verb: str, reply: msgspec.Struct | tuple[int, str]) -> None:
        self.nc, self.verb, self.reply = nc, verb, reply
        self.requests: list[bytes] = []

    async def start(self) -> Responder:
        await self.nc.subscribe(f"numerus.cmd.{self.verb}", cb=self.answer)
        await self.nc.flush()
        return self

    async def answer(self, msg) -> None:
        self.requests.append(msg.data)
        if isinstance(self.reply, tuple):
            code, message = self.reply
            body = json.dumps({"code": "not_found", "message": message}).encode()
            headers = {"Nats-Service-Error": message, "Nats-Service-Error-Code": str(code)}
            await self.nc.publish(msg.reply, body, headers=headers)
        else:
            await self.nc.publish(msg.reply, msgspec.json.encode(self.reply))


async def test_run_sends_the_pipeline_options_as_the_daemon_reads_them(state_dir: Path, nc: Client, tmp_path: Path):
    daemon = await Responder(nc, "run", RunReply(job=JOB, subject=f"numerus.job.{JOB}.>")).start()
    result = await ainvoke(
        "--state-dir", str(state_dir), "run", "add a parser", "--repo", str(tmp_path),
        "--role", "planner=strong", "--role", "reviewer = careful", "--parallel", "3",
        "--check", "pytest -q", "--check", "ruff check", "--no-review", "--claims", "plan",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{JOB}\n"
    result = await ainvoke("--state-dir", str(state_dir), "run", "fix it", "--repo", str(tmp_path), "--no-plan")
    assert result.exit_code == 0, result.output
    args = ("--state-dir", str(state_dir), "run", "fix it", "--repo", str(tmp_path), "--review", "--agent", "fast")
    assert (await ainvoke(*args)).exit_code == 0

    # Decoded as the daemon decodes them: a field it does not know would be refused there.
    sent = [msgspec.json.decode(data, type=RunJob) for data in daemon.requests]
    assert sent == [
        RunJob(
            goal="add a parser",
            repo=str(tmp_path),
            roles={"planner": "strong", "reviewer": "careful"},
            parallel=3,
            checks=("pytest -q", "ruff check"),
            review=False,
            claims="plan",
        ),
        RunJob(goal="fix it", repo=str(tmp_path), plan=False),
        RunJob(goal="fix it", repo=str(tmp_path), agent="fast", review=True),
    ]
    assert sent[2].plan is True and sent[2].parallel is None and sent[2].checks == () and sent[2].roles == {}
    assert sent[2].claims is None  # numerusd's configuration decides


PLAN_TEXT = "Add a parser, then use it.\n2 tasks in 2 waves\n\nwave 1\n  t1  Add the parser\n\nwave 2\n  t2  Use it\n"
PLAN = PlanReply(
    job=JOB,
    version=2,
    hash="1a2b3c4d" + "e" * 56,
    summary="Add a parser, then use it.",
    statuses={"t1": "completed", "t2": "waiting"},
    rendered=PLAN_TEXT,
)


async def test_plan_prints_the_drawing_with_each_tasks_status(state_dir: Path, nc: Client):
    daemon = await Responder(nc, "plan", PLAN).start()
    result = await ainvoke("--state-dir", str(state_dir), "plan", JOB)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"plan v2 of job {JOB} (hash 1a2b3c4d)\n" + PLAN_TEXT + "\nTASK  STATUS\nt1    completed\nt2    waiting\n"
    )

    dot = msgspec.structs.replace(PLAN, rendered='digraph plan {\n  "t1" -> "t2";\n}\n')
    daemon.reply = dot
    result = await ainvoke("--state-dir", str(state_dir), "plan", JOB, "--format", "dot")
    assert result.exit_code == 0 and result.stdout == dot.rendered  # the drawing alone, ready for `dot`
    result = await ainvoke("--state-dir", str(state_dir), "--json", "plan", JOB, "--format", "mermaid")
    assert msgspec.json.decode(result.stdout, type=PlanReply) == dot
    assert [msgspec.json.decode(data, type=GetPlan) for data in daemon.requests] == [
        GetPlan(job=JOB),
        GetPlan(job=JOB, format="dot"),
        GetPlan(job=JOB, format="mermaid"),
    ]


async def test_plan_of_a_job_without_one_prints_the_daemons_sentence_and_exits_1(state_dir: Path, nc: Client):
    message = f"job {JOB} has no plan: it was run with --no-plan"
    await Responder(nc, "plan", (404, message)).start()
    result = await ainvoke("--state-dir", str(state_dir), "plan", JOB)
    assert result.exit_code == 1
    assert one_line_error(result) == f"numerusctl: {message}"
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


@pytest.mark.parametrize(
    ("raw", "shown"),
    [(True, b"\x1b[1mhello\x1b[0m\r\nworld\r\n"), (False, b"t0 | \\x1b[1mhello\\x1b[0m\nt0 | world\n")],
    ids=["raw", "escaped"],
)
async def test_follow_logs_writes_chunks_and_stops_after_the_job_ends(
    streams: Client, capsysbinary: pytest.CaptureFixture[bytes], raw: bool, shown: bytes
):
    js = streams.jetstream()
    events = chain(JOB)
    await publish(streams, events[:3])
    await js.publish(f"numerus.log.{JOB}.t0", b"\x1b[1mhello\x1b[0m\r\n")
    follow = asyncio.create_task(_follow_logs(streams, JOB, None, raw))
    await js.publish(f"numerus.log.{JOB}.t0", b"wor")
    await js.publish(f"numerus.log.{JOB}.t0", b"ld\r")  # a line end cut between its \r and its \n
    await js.publish(f"numerus.log.{JOB}.t0", b"\n")
    await publish(streams, events[3:])
    assert await asyncio.wait_for(follow, 10) == 0
    assert capsysbinary.readouterr().out == shown


# --- rendering ---------------------------------------------------------------------------------------------------


def test_status_table_and_event_lines_are_aligned_plain_text():
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
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
            tasks_total=2,
            tasks_done=1,
            tokens=1700,
        ),
        JobView(
            id="01JBBBBB", goal="g", repo="/r", agent="scripted", status="completed", created=now, updated=now, events=3
        ),
    ]
    assert jobs_table(jobs, now).splitlines() == [
        "JOB       STATUS     AGENT     TASKS  TOKENS  AGE  REPO  GOAL",
        "01JA      running    codex     1/2    1.7k    5m   /r    make the failing test pass please",
        "01JBBBBB  completed  scripted  0/0    0       0s   /r    g",
    ]
    # A list the daemon cut short says so.
    assert jobs_table(jobs, now, total=35).endswith(
        "\n\nthe newest 2 of 35 jobs; 'numerusctl status --all' lists every one"
    )
    line = event_line(12, chain(JOB)[3].wire)
    assert line.split()[0] == "12" and "AgentMessageReceived" in line and line.endswith("t0     hello world")
    assert "not a valid event" in event_line(None, b'{"id": 1}')


# --- a planned job, as `run --wait`, `events` and `status` tell it -------------------------------------------------


def sha(prefix: str) -> str:
    """A commit id starting with `prefix`."""
    return prefix.ljust(40, "0")


def planned_job(job: str) -> Script:
    """A planned job's story: one plan rejected, t1 GO and t2 NO GO on the same file, t1 failing a check and
    then merging, t2 conflicting on merge and changing a file outside its claim until it fails, t3 skipped."""
    intent = FileIntent(path="src/app.py", mode="modify")
    plan = Plan(
        summary="Add a parser, then use it.",
        tasks=(
            PlannedTask(id="t1", title="Add the parser", instructions="…", intents=(intent,)),
            PlannedTask(id="t2", title="Use it", instructions="…"),
            PlannedTask(id="t3", title="Document it", instructions="…", deps=("t2",)),
        ),
    )
    app, tests = ClaimedPath("src/app.py", "file", "modify"), ClaimedPath("tests", "dir", "read")
    base, branch = sha("abc1234"), f"numerus/{job}.integration"
    log = {"log_path": "/l", "log_sha256": "0" * 64, "log_bytes": 6, "duration_s": 0.5}
    run = {"agent": "codex", "argv": ("codex",), "workdir": "/w/t1", "log_path": "/l"}
    output = "E   assert 1 == 2\n1 failed in 0.1s\n"
    check_failed = f"the check `pytest -q` failed with exit code 1:\n{output}"
    return [
        (
            ev.JobSubmitted(
                goal="add a parser",
                repo="/r",
                agent="codex",
                plan=True,
                parallel=2,
                base_sha="abc1234" + "0" * 33,
                uncommitted_count=2,
                uncommitted=("README.md", "draft.txt"),
            ),
            None,
        ),
        (ev.PlanRequested(attempt=1, agent="careful"), None),
        (ev.PlanRejected(attempt=1, errors=("$.tasks[0].deps[0]: unknown task t9", "$.tasks[1].id: twice")), None),
        (ev.PlanRequested(attempt=2, agent="careful"), None),
        (ev.PlanValidated(version=1, attempt=2, hash="1a2b3c4d" + "0" * 56, plan=plan), None),
        (ev.IntegrationBranchCreated(branch=branch, base_sha=base), None),
        (ev.TaskCreated(title="Add the parser", instructions="…", agent="codex"), "t1"),
        (ev.TaskCreated(title="Use it", instructions="…", agent="codex"), "t2"),
        (ev.TaskCreated(title="Document it", instructions="…", agent="codex", deps=("t2",)), "t3"),
        (ev.ClaimProposed(attempt=1, paths=(app, tests), commands=("pytest -q",)), "t1"),
        (ev.ClaimGranted(locks=(Lock("src/app.py", "modify"), Lock("tests/", "read"), Lock("x.cfg", "read"))), "t1"),
        (ev.ClaimProposed(attempt=1, paths=(app,)), "t2"),
        (ev.ClaimDenied(
            locks=(Lock("src/app.py", "modify"),),
            holders=("t1",),
            conflicts=(Conflict(path="src/app.py", holder="t1", holder_mode="modify", holder_path="src/app.py"),),
        ), "t2"),
        (ev.WorktreeCreated(path="/w/t1", branch=f"numerus/{job}/t1", base_sha=base), "t1"),
        (ev.TaskStarted(attempt=1, **run), "t1"),
        (ev.TaskExited(exit_code=0, **log), "t1"),
        (ev.TaskWorkCommitted(commit=sha("c0ffee1"), changes=("modify src/app.py",)), "t1"),
        (ev.CheckCompleted(command="pytest -q", exit_code=1, duration_s=0.4, output=output), "t1"),
        (ev.GateFailed(reasons=(check_failed,)), "t1"),
        (ev.TaskRetryScheduled(next_attempt=2, delay_s=1.0, reasons=(check_failed,)), "t1"),
        (ev.TaskStarted(attempt=2, **run), "t1"),
        (ev.TaskExited(exit_code=0, **log), "t1"),
        (ev.TaskWorkCommitted(commit=sha("d00d1e5"), changes=("modify src/app.py",)), "t1"),
        (ev.CheckCompleted(command="pytest -q", exit_code=0, duration_s=0.25), "t1"),
        (ev.ReviewCompleted(verdict="pass", reasons=("does what t1 asks",)), "t1"),
        (ev.GatePassed(), "t1"),
        (ev.MergeStarted(integration=branch, parent=base, task_sha=sha("d00d1e5")), "t1"),
        (ev.TaskMerged(sha=sha("beef123"), integration=f"numerus/{JOB}.integration"), "t1"),
        (ev.LocksReleased(reason="merged"), "t1"),
        (ev.TaskCompleted(), "t1"),
        (ev.ClaimGranted(locks=(Lock("src/app.py", "modify"),)), "t2"),
        (ev.MergeConflicted(paths=("src/app.py",)), "t2"),
        (ev.ClaimViolated(violations=("modified README.md, which the claim does not cover",)), "t2"),
        (ev.LocksReleased(reason="failed"), "t2"),
        (ev.TaskFailed(reason="failed after 3 attempts: changed outside the claim: modified README.md"), "t2"),
        (ev.ReplanRequested(task="t2", reason="failed after 3 attempts:\nchanged outside the claim"), None),
        (ev.PlanRequested(attempt=1, agent="careful", role="queen"), None),
        (ev.ReplanFailed(reason="no valid plan after 1 attempt: $.tasks: empty"), None),
        (ev.TaskSkipped(reason="depends on t2, which failed"), "t3"),
        (ev.JobFailed(reason="t2 failed; t3 skipped"), None),
    ]  # fmt: skip


async def test_follow_job_tells_a_planned_job_one_line_per_step(streams: Client, capsys: pytest.CaptureFixture[str]):
    await publish(streams, sealed_chain(JOB, planned_job(JOB)))
    assert await asyncio.wait_for(_follow_job(streams, JOB, as_json=False), 10) == 1
    assert capsys.readouterr().out.splitlines() == [
        "plan attempt 1: asking the planner (careful)",
        "plan attempt 1 rejected: $.tasks[0].deps[0]: unknown task t9; $.tasks[1].id: twice",
        "plan attempt 2: asking the planner (careful)",
        "plan v1 accepted: 3 tasks (hash 1a2b3c4d)",
        f"integration branch numerus/{JOB}.integration created at abc1234",
        "task t1 created: Add the parser",
        "task t2 created: Use it",
        "task t3 created: Document it (after t2)",
        "t1 claims modify src/app.py, read tests; runs pytest -q",
        "t1 GO (3 locks)",
        "t2 claims modify src/app.py",
        "t2 NO GO: src/app.py held by t1 (modify)",
        "t1 works in /w/t1, from abc1234",
        "task t1 started (attempt 1, agent codex)",
        "task t1 exited with code 0 after 0.5 s",
        "t1 committed c0ffee1: modify src/app.py",
        "t1 check 'pytest -q' failed (exit 1): 1 failed in 0.1s",
        "t1 gate failed: the check `pytest -q` failed with exit code 1",
        "t1 retry 2 in 1s",
        "task t1 started (attempt 2, agent codex)",
        "task t1 exited with code 0 after 0.5 s",
        "t1 committed d00d1e5: modify src/app.py",
        "t1 check 'pytest -q' passed (0.2 s)",
        "t1 review passed: does what t1 asks",
        "t1 gate passed",
        f"t1 merged into numerus/{JOB}.integration at beef123",
        "task t1 completed",
        "t2 GO (1 lock)",
        "t2 merge conflicts on src/app.py; retried from the new tip",
        "t2 changed outside its claim: modified README.md, which the claim does not cover",
        "task t2 failed: failed after 3 attempts: changed outside the claim: modified README.md",
        "replanning: t2 failed for good (failed after 3 attempts)",
        "plan attempt 1: asking the queen (careful)",
        "no revised plan, going on with the one there is: no valid plan after 1 attempt: $.tasks: empty",
        "task t3 skipped: depends on t2, which failed",
        f"job {JOB} failed: t2 failed; t3 skipped",
    ]


def test_event_lines_of_a_planned_job_say_what_each_step_did():
    lines = {
        s.envelope.type + (s.envelope.task or ""): event_line(1, s.wire) for s in sealed_chain(JOB, planned_job(JOB))
    }

    def says(key: str) -> str:
        return lines[key].split(maxsplit=5)[-1]  # after seq, date, time, type and task (or -)

    assert (
        says("JobSubmitted")
        == "'add a parser' in /r with codex, planned, 2 at once, from abc1234 (2 uncommitted changes left out)"
    )
    assert says("PlanValidated") == "plan v1 accepted: 3 tasks (hash 1a2b3c4d)"
    assert says("ClaimDeniedt2") == "NO GO: src/app.py held by t1 (modify)"
    assert says("TaskRetryScheduledt1") == "retry 2 in 1s: the check `pytest -q` failed with exit code 1"
    assert says("MergeStartedt1") == f"merging d00d1e5 into numerus/{JOB}.integration at abc1234"
    assert says("TaskMergedt1") == f"merged into numerus/{JOB}.integration at beef123"
    assert says("LocksReleasedt2") == "locks released (failed)"
    assert says("TaskSkippedt3") == "depends on t2, which failed"
    assert all(len(line.split(maxsplit=5)[-1]) <= 100 for line in lines.values())
    assert len({line.index(" t1") for key, line in lines.items() if key.endswith("t1")}) == 1  # one task column


def test_status_of_a_planned_job_shows_its_plan_branch_and_where_each_task_stands():
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    check_failed = "the check `pytest -q` failed with exit code 1:\nE   assert 1 == 2"

    def task(id: str, status: str, **fields) -> TaskView:
        return TaskView(id=id, title=f"do {id}", agent="codex", status=status, **fields)

    job = JobView(
        id=JOB, goal="add a parser", repo="/r", agent="codex", status="running", created=now, updated=now, events=40,
        planned=True, plan_version=2, plan_hash="1a2b3c4d" + "0" * 56, integration=f"numerus/{JOB}.integration",
        base_sha="abc1234" + "0" * 33, parallel=4, input_tokens=1000, output_tokens=500, tokens=3500,
        tasks=[
            task("t1", "merging", attempt=1, input_tokens=2000),
            task("t2", "waiting", deps=["t1"], holders=["t1"]),
            task("t3", "retrying", attempt=2, feedback=[check_failed, "the reviewer: tests are missing"]),
            task("t4", "failed", attempt=3, deps=["t1", "t3"], feedback=[check_failed], reason="failed after 3 …"),
            task("t5", "skipped", deps=["t4"], reason="depends on t4, which failed"),
        ],
    )  # fmt: skip
    lines = job_detail(job, now).splitlines()
    fields = dict(line.split(maxsplit=1) for line in lines[: lines.index("")])
    assert fields["plan"] == f"v2, hash 1a2b3c4d ('numerusctl plan {JOB}' draws it)"
    assert fields["branch"] == f"numerus/{JOB}.integration (from abc1234)"
    assert fields["parallel"] == "4"
    assert fields["tokens"] == "3.5k (1.5k planning)"
    assert lines[lines.index("") + 1 :] == [
        "TASK  STATUS          ATTEMPT  AFTER   AGENT  TOKENS  TITLE",
        "t1    merging         1        -       codex  2.0k    do t1",
        "t2    waiting for t1  0        t1      codex  0       do t2",
        "t3    retrying        2        -       codex  0       do t3",
        "t4    failed          3        t1, t3  codex  0       do t4",
        "t5    skipped         0        t4      codex  0       do t5",
        "",
        "t3: retrying: the check `pytest -q` failed with exit code 1 (+1 more)",
        "t4: failed: the check `pytest -q` failed with exit code 1",
        "t5: skipped: depends on t4, which failed",
    ]
    planning = msgspec.structs.replace(
        job, status="planning", plan_version=0, plan_hash=None, integration=None, tasks=[], base_sha="c0ffee" * 6
    )
    text = job_detail(planning, now)
    assert "plan     none yet (the planner is at work)" in text and "branch   not yet created (from c0ffee" in text
    assert text.endswith("\n\nno tasks yet")


def test_status_of_a_single_task_job_is_as_before():
    now = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    task = TaskView(id="t1", title="x", agent="s", status="failed", attempt=1, pid=42, exit_code=1, reason="exit 1")
    job = JobView(id="01JA", goal="g", repo="/r", agent="s", status="failed", created=now, updated=now, events=7)
    text = job_detail(msgspec.structs.replace(job, tasks=[task]), now)
    assert "plan" not in text and "branch" not in text
    assert text.splitlines()[-2:] == [
        "TASK  STATUS           AGENT  ATTEMPT  PID  EXIT  TOKENS  TITLE",
        "t1    failed (exit 1)  s      1        42   1     0       x",
    ]


def test_clean_says_what_it_removed_and_what_it_kept():
    reply = CleanReply(
        jobs=[
            CleanedJob(job="J1", worktrees=["/w/a"], branches=["numerus/J1/a", "numerus/J1/b"], freed_bytes=3 << 20),
            CleanedJob(job="J2", logs=True, freed_bytes=512, kept="numerus/J2.integration"),
            CleanedJob(job="J3", kept="numerus/J3.integration"),
        ]
    )
    assert clean_text(reply).splitlines() == [
        "job J1: removed 1 worktree, 2 branches (3.0 MiB)",
        "job J2: removed the logs (512 bytes); kept its result, branch numerus/J2.integration",
        "job J3: nothing left to remove; kept its result, branch numerus/J3.integration",
    ]
    assert clean_text(CleanReply(jobs=[])) == "no ended job left anything to remove"
    cleaned = ev.JobCleaned(worktrees=("/w/a",), branches=("numerus/J1/a",), logs=True, freed_bytes=5 << 30)
    assert summary("JobCleaned", msgspec.to_builtins(cleaned)) == "removed 1 worktree, 1 branch, the logs (5.0 GiB)"
