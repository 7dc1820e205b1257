"""`numerusctl attach`: a running agent's terminal in the user's, through a real PTY and a real daemon.

What is typed reaches the agent and is recorded as `AgentInputSent` (size and hash, never the bytes); Ctrl-]
detaches with exit 0 and the user's terminal is as it was; `--read-only` sends nothing; and from the hostile side:
a viewer cannot publish input, nor can an operator reach a task that is not running, another job's task, a
wildcard subject, or send more than 64 KiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from numerusctl.attach import TerminalFilter
from numerusd import domain
from numerusd.domain.observations import InputSent
from numerusd.errors import CommandRefused
from numerusd.keys import Keyring
from numerusd.protocol.attach import MAX_INPUT_BYTES
from numerusd.protocol.events import AgentInputSent
from tests import test_domain
from tests.conftest import eventually
from tests.daemon_harness import Daemon

pytestmark = pytest.mark.slow  # a real daemon runs agents that wait for input

#: An agent that asks for a line, says it back, and then works on for a while (so a detach finds it running).
TALK = [{"read": "name? "}, {"sleep": 300}]


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", agents={"talk": TALK}, env={"NUMERUS_KILL_GRACE_S": "1"}).start()
    yield d
    d.stop()


def started_job(daemon: Daemon, tmp_path: Path) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    result = daemon.ctl("run", "--no-plan", "--agent", "talk", "--repo", str(work), "talk to me", check=True)
    return result.stdout.strip()


async def agent_asking(daemon: Daemon, job: str) -> None:
    """Until the job's agent has printed its question (it is running, reading its terminal)."""

    async def asking() -> bool:
        async with daemon.client() as client:
            view = await client.status(job)
        log = view["tasks"][0].get("log_path")
        return view["tasks"][0]["status"] == "running" and bool(log) and b"name? " in _read(Path(log))

    await eventually(asking, timeout=30, interval=0.1)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


class Pty:
    """`numerusctl attach` in a real pseudo-terminal, as a user's shell would run it: its output collected."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.process = subprocess.Popen(
            argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env, start_new_session=True
        )
        self.output = bytearray()
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self.output += os.read(self.master, 65536)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    async def shows(self, text: bytes, timeout: float = 20) -> None:
        try:
            await eventually(lambda: text in self.output, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} never shown; the terminal shows {bytes(self.output)!r}") from None

    async def exit_code(self, timeout: float = 20) -> int:
        await eventually(lambda: self.process.poll() is not None, timeout=timeout)
        return self.process.returncode

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@contextlib.asynccontextmanager
async def attached(daemon: Daemon, *args: str) -> AsyncIterator[Pty]:
    pty = Pty(daemon.ctl_argv(*args), {**os.environ, **daemon.env})
    try:
        yield pty
    finally:
        pty.close()


def inputs(daemon: Daemon, job: str) -> list[dict]:
    return [e["data"] for e in daemon.events(job) if e["type"] == "AgentInputSent"]


async def test_a_typed_line_reaches_the_agent_is_recorded_by_size_and_hash_and_ctrl_bracket_detaches(daemon, tmp_path):
    job = started_job(daemon, tmp_path)
    await agent_asking(daemon, job)
    async with attached(daemon, "attach", job[-6:], "t1") as pty:
        await pty.shows(b"Ctrl-] detaches")
        await pty.shows(b"name? ")  # printed before the attach: the last chunk is shown
        pty.type(b"Ada Lovelace\r")
        await pty.shows(b"read: Ada Lovelace")
        recorded = inputs(daemon, job)
        key = Keyring.load(
            daemon.state_dir / "keys.json"
        ).current_key  # the keys tell what was typed; events alone do not
        typed = hmac.new(key, b"Ada Lovelace\r", hashlib.sha256).hexdigest()
        assert recorded == [{"size": 13, "mac": typed, "by": recorded[0]["by"]}]
        assert hashlib.sha256(b"Ada Lovelace\r").hexdigest() not in json.dumps(daemon.events(job))
        assert recorded[0]["by"].endswith("(operator)")
        # The bytes typed are in no event but what the agent itself chose to say back.
        said = [e for e in daemon.events(job) if e["type"] != "AgentMessageReceived"]
        assert "Ada Lovelace" not in json.dumps(said)
        pty.type(b"\x1d")  # Ctrl-]
        assert await pty.exit_code() == 0
        await pty.shows(b"detached")
        assert termios.tcgetattr(pty.slave) == pty.before  # raw mode undone
    daemon.ctl("kill", job, check=True)


async def test_read_only_sends_nothing_and_a_viewer_is_read_only(daemon, tmp_path):
    job = started_job(daemon, tmp_path)
    await agent_asking(daemon, job)
    for args in (("attach", "--read-only", job, "t1"), ("--role", "viewer", "attach", job, "t1")):
        async with attached(daemon, *args) as pty:
            await pty.shows(b"read-only; Ctrl-] detaches")
            await pty.shows(b"name? ")
            pty.type(b"secret\r")
            pty.type(b"\x1d")
            assert await pty.exit_code() == 0, bytes(pty.output)
            assert termios.tcgetattr(pty.slave) == pty.before
    assert inputs(daemon, job) == []
    assert daemon.status(job)["tasks"][0]["status"] == "running"  # still waiting for its line
    # The first line the agent reads is the one typed now, read-write: nothing of "secret" reached it.
    async with attached(daemon, "attach", job, "t1") as pty:
        await pty.shows(b"Ctrl-] detaches")
        pty.type(b"Ada\r")
        await pty.shows(b"read: Ada")
        assert b"read: secret" not in bytes(pty.output)
        pty.type(b"\x1d")
        assert await pty.exit_code() == 0
    daemon.ctl("kill", job, check=True)


async def test_a_task_that_is_not_running_is_refused_in_one_line(daemon, tmp_path):
    job = started_job(daemon, tmp_path)
    await agent_asking(daemon, job)
    daemon.ctl("kill", job, check=True)
    async with daemon.client() as client:
        await client.wait_for(job, lambda v: v["status"] == "killed")
    result = daemon.ctl("attach", job, "t1", timeout=20)
    assert result.returncode == 1
    assert result.stderr.strip() == f"numerusctl: task t1 of job {job} is killed: only a running agent can be attached"
    nope = daemon.ctl("attach", job, "t9", timeout=20)
    assert (nope.returncode, nope.stderr.strip()) == (1, f"numerusctl: job {job} has no task t9")


async def test_hostile_input_is_refused_and_nothing_recorded(daemon, tmp_path):
    job = started_job(daemon, tmp_path)
    await agent_asking(daemon, job)
    info = json.loads((daemon.state_dir / "connection.json").read_text())

    # A viewer's publish on numerus.input.> is refused by the server itself.
    refused: list[str] = []

    async def noted(error: Exception) -> None:
        refused.append(str(error))

    viewer = info["roles"]["viewer"]
    nc = await nats.connect(
        info["url"], user=viewer["user"], password=viewer["password"], inbox_prefix="_INBOX_viewer", error_cb=noted
    )
    try:
        await nc.publish(f"numerus.input.{job}.t1", b"rm -rf /\r")
        await nc.flush()
        await eventually(lambda: any("permissions violation" in e for e in refused), timeout=10)
    finally:
        await nc.close()

    operator = info["roles"]["operator"]
    nc = await nats.connect(
        info["url"], user=operator["user"], password=operator["password"], inbox_prefix="_INBOX_operator"
    )

    async def answer(subject: str, data: bytes) -> str:
        reply = await nc.request(subject, data, timeout=10)
        assert reply.headers and "Nats-Service-Error-Code" in reply.headers, reply.data
        return json.loads(reply.data)["message"]

    try:
        # Another job's task id, a task of no job, a subject with more parts or a wildcard, too many bytes.
        assert "no job" in await answer("numerus.input.01JXNOTAJOB0000000000000000.t1", b"x")
        assert "no such task" in await answer(f"numerus.input.{job}.t2", b"x")
        assert "one id each" in await answer(f"numerus.input.{job}.t1.more", b"x")
        assert "one id each" in await answer(f"numerus.input.{job}.*", b"x")
        too_big = await answer(f"numerus.input.{job}.t1", b"y" * (MAX_INPUT_BYTES + 1))
        assert f"over the limit of {MAX_INPUT_BYTES} bytes" in too_big
    finally:
        await nc.close()
    assert inputs(daemon, job) == []
    assert daemon.alive
    daemon.ctl("kill", job, check=True)


def test_control_strings_are_dropped_even_cut_between_chunks_and_colours_pass():
    shown = TerminalFilter()
    chunks = [b"a\x1b[31mred\x1b[0m", b"\x1b]52;c;ZXZpbA==", b"\x07b\x1b", b"]0;title\x1b", b"\\c\x1bP+q\x1b\\d"]
    assert b"".join(shown.feed(chunk) for chunk in chunks) == b"a\x1b[31mred\x1b[0mbcd"
    # The same strings opened by their C1 characters (UTF-8 `\xc2\x9d` is OSC), even cut after the lead byte; UTF-8
    # text whose continuation bytes have those values (`✝` is e2 9c 9d) passes whole.
    c1 = TerminalFilter()
    chunks = ["e✝f".encode(), b"\xc2\x9d0;title\x07g\xc2", b"\x90+q\x1b\\h \xc2\xb0"]
    # (the lead byte went out with its chunk before the opener came: a stray byte, never a control string)
    assert b"".join(c1.feed(chunk) for chunk in chunks) == "e✝fg".encode() + b"\xc2h " + "°".encode()


def test_the_domain_records_input_only_for_a_running_task_and_never_its_bytes():
    typed = InputSent(task="t1", size=4, mac="ab" * 32, by="alice (operator)")
    running = test_domain.started_job()
    assert domain.decide(running, typed) == [("t1", AgentInputSent(size=4, mac="ab" * 32, by="alice (operator)"))]
    assert test_domain.decide(running, typed).tasks["t1"] == running.tasks["t1"]  # recorded, and no state of its own
    with pytest.raises(CommandRefused, match="is completed: only a running agent takes input"):
        domain.decide(test_domain.exit_with(running, 0), typed)
