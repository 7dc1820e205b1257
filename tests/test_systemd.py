"""Under systemd (Type=notify), numerusd says READY=1 once it answers commands, pings the watchdog, says STOPPING=1."""

from __future__ import annotations

import socket
from pathlib import Path

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
