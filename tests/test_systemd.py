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
EXPOSURE_LIMITS = {"numerusd.service": 3.5, "nats-server.service": 4.0}
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


def test_numerusd_unit_allows_exactly_the_namespaces_bwrap_makes():
    """bubblewrap (numerusd/sandbox.py) needs these namespaces; any other is refused by the unit."""
    lines = (UNITS / "numerusd.service").read_text().splitlines()
    (namespaces,) = [line.partition("=")[2].split() for line in lines if line.startswith("RestrictNamespaces=")]
    assert sorted(namespaces) == sorted(["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"])
