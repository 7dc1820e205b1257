"""`numerusctl ping`, the container image's health check, against a real daemon: it answers 0 with the daemon's
service id while numerusd serves, and one line with a non-zero exit when it is stopped, killed or frozen; no client
login can answer for the daemon, and an answer that is not numerusd's is refused."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.micro
import pytest
from nats.aio.msg import Msg

from numerusd import __version__
from numerusd.embedded_nats import EmbeddedNats
from numerusd.protocol.connection import inbox_prefix
from numerusd.protocol.exit_codes import CtlExit
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon

PING = "$SRV.PING.numerus"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with Daemon(tmp_path / "state").start() as running:
        yield running


def one_line(text: str) -> str:
    """The only line of `text` (it must be one)."""
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


async def test_ping_answers_as_a_viewer_with_the_daemons_own_service(daemon: Daemon):
    result = daemon.ctl("--role", "viewer", "ping", timeout=30)
    assert result.returncode == 0, result.stderr
    assert one_line(result.stdout).startswith(f"numerusd {__version__} answered in ")

    pong = json.loads(daemon.ctl("--role", "viewer", "--json", "ping", timeout=30).stdout)
    own = daemon.connection()
    nc = await nats.connect(own["url"], user=own["user"], password=own["password"])
    try:
        info = json.loads((await nc.request("$SRV.INFO.numerus", b"", timeout=5)).data)
    finally:
        await nc.close()
    assert (pong["name"], pong["id"], pong["version"]) == ("numerus", info["id"], __version__)
    assert 0 < pong["round_trip_ms"] < 5000


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_ping_fails_with_one_line_once_the_daemon_is_gone(daemon: Daemon, how: signal.Signals):
    assert daemon.ctl("--role", "viewer", "ping", timeout=30).returncode == 0
    daemon.stop(how)  # SIGKILL leaves connection.json behind, naming a dead pid and a server that died with it
    result = daemon.ctl("--role", "viewer", "--timeout", "1", "ping", timeout=30)
    assert result.returncode == CtlExit.UNREACHABLE
    assert result.stdout == ""
    assert one_line(result.stderr).startswith("numerusctl: ")


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_a_frozen_daemon_is_unhealthy_and_no_client_can_answer_for_it(daemon: Daemon, role: str):
    """The daemon stopped (SIGSTOP) while its server runs: the ping times out; a client login that serves a
    `numerus` service of its own is refused by the server, so it cannot make the health check pass."""
    login = json.loads((daemon.state_dir / "connection.json").read_text())
    refused: list[str] = []

    async def record(error: Exception) -> None:
        if "permissions violation" in str(error).lower():
            refused.append(str(error))

    impostor = await nats.connect(
        login["url"],
        user=login["roles"][role]["user"],
        password=login["roles"][role]["password"],
        inbox_prefix=inbox_prefix(role),
        error_cb=record,
    )
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        service = await nats.micro.add_service(impostor, name="numerus", version="6.6.6")
        await eventually(lambda: any(PING.lower() in error.lower() for error in refused), timeout=10)
        ping = await asyncio.create_subprocess_exec(
            *daemon.ctl_argv("--role", "viewer", "--timeout", "1", "--json", "ping"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ping.communicate(), 30)
        assert ping.returncode == CtlExit.UNREACHABLE, out
        assert out == b""
        error = json.loads(one_line(err.decode()))["error"]
        assert error["message"] == f"numerusd did not answer {PING} within 1 s"
        await service.stop()
    finally:
        daemon.process.send_signal(signal.SIGCONT)
        await impostor.close()
    assert daemon.ctl("--role", "viewer", "ping", timeout=30).returncode == 0  # healthy again once it runs


@pytest.mark.parametrize(
    "answer",
    [
        b"\x1b]0;pwned\x07\x1b[2J" * 20_000,  # not JSON: terminal controls, and large
        json.dumps(
            {"type": "io.nats.micro.v1.ping_response", "name": "imp\x1b[2Jostor" * 100, "id": "x", "version": "1"}
        ),
        json.dumps({"type": "io.nats.micro.v1.info_response", "name": "numerus", "id": "x", "version": "1"}),
    ],
    ids=["garbage", "another-service", "not-a-ping"],
)
async def test_an_answer_that_is_not_numerusds_is_refused_with_one_short_line(
    nats_server: EmbeddedNats, answer: bytes | str
):
    """On a server that lets anyone subscribe (not the embedded one), whatever answers the ping is checked."""
    nc = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)

    async def respond(msg: Msg) -> None:
        await msg.respond(answer.encode() if isinstance(answer, str) else answer)

    await nc.subscribe(PING, cb=respond)
    await nc.flush()
    try:
        ping = await asyncio.create_subprocess_exec(
            *[str(BIN / "numerusctl"), "--nats-url", nats_server.url, "--nats-user", nats_server.user],
            *["--nats-password", nats_server.password, "--timeout", "5", "ping"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(ping.communicate(), 30)
    finally:
        await nc.close()
    assert ping.returncode == CtlExit.FAILED
    assert out == b""
    line = one_line(err.decode())
    assert line.startswith(f"numerusctl: what answered {PING} is not ")
    assert len(line) < 300 and "\x1b" not in line
