"""Under systemd (Type=notify), numerusd says READY=1 once it answers commands, pings the watchdog, says STOPPING=1."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon


def test_ready_watchdog_and_stopping_notifications(tmp_path: Path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        daemon = Daemon(tmp_path / "state", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}).start()
        try:
            messages = []
            while not any(m.startswith("READY=1") for m in messages):
                messages.append(sock.recv(4096).decode())
            ready = next(m for m in messages if m.startswith("READY=1"))
            assert f"MAINPID={daemon.process.pid}" in ready  # type: ignore[union-attr]
            assert daemon.ctl("status").returncode == 0  # ready means it answers
            pings = 0
            while pings < 2:  # every 0.2 s: half of WATCHDOG_USEC
                pings += sock.recv(4096) == b"WATCHDOG=1"
        finally:
            assert daemon.stop() == 0
        rest = []
        sock.settimeout(0.5)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest


#: The highest `systemd-analyze security` exposure each unit may have (issue 14).
EXPOSURE_LIMITS = {"numerusd.service": 3.5, "nats-server.service": 4.0, "numerus-worker.service": 3.5}
UNITS = Path(__file__).parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMITS))
def test_unit_exposure_is_within_its_limit(unit: str):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", result.stdout)
    assert match, f"no exposure figure in systemd-analyze's output:\n{result.stdout}\n{result.stderr}"
    assert float(match.group(1)) <= EXPOSURE_LIMITS[unit], result.stdout


def unit_settings(unit: str) -> dict[str, list[str]]:
    """Each setting of a unit file, by name, every value in order (continued lines joined, comments left out)."""
    text = re.sub(r"\\\n\s*", " ", (UNITS / unit).read_text())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


@pytest.mark.parametrize("unit", ["numerusd.service", "numerus-worker.service"])
def test_units_running_agents_allow_exactly_the_namespaces_bwrap_makes(unit: str):
    """bubblewrap (numerusd/sandbox.py) needs these namespaces; any other is refused by the unit."""
    (namespaces,) = unit_settings(unit)["RestrictNamespaces"]
    assert sorted(namespaces.split()) == sorted(["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"])


def test_worker_unit_logs_in_with_its_credential_and_drains_before_it_is_killed():
    settings = unit_settings("numerus-worker.service")
    (start,) = settings["ExecStart"]
    argv = start.split()
    assert argv[1:4] == ["worker", "--name", "%H"]  # named after its host in `numerusctl workers`
    # The login is a systemd credential (out of the agents' sight), passed by the path systemd gives it.
    (credential,) = settings["LoadCredential"]
    name, _, source = credential.partition(":")
    assert argv[argv.index("--connection") + 1] == f"%d/{name}" and source == "/etc/numerus/worker.json"
    assert "$NUMERUS_WORKER_ARGS" in argv  # its pools and slots, from /etc/numerus/worker.env
    # SIGTERM to the worker alone, which drains its agents: systemd waits longer than the drain before killing.
    assert (settings["KillSignal"], settings["KillMode"], settings["Restart"]) == (
        ["SIGTERM"],
        ["mixed"],
        ["on-failure"],
    )
    drain_s = float(argv[argv.index("--drain-s") + 1])
    assert float(settings["TimeoutStopSec"][0]) >= drain_s + 15
