"""The systemd notify protocol: READY=1 when the daemon answers commands, STOPPING=1, and watchdog pings.

Outside systemd (no NOTIFY_SOCKET) every call does nothing. See sd_notify(3); the unit is `Type=notify`
with `WatchdogSec=`, so a daemon whose event loop is stuck is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send one notification; False when not run by systemd or the socket is gone."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for (WATCHDOG_USEC), or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


async def watchdog(stop: asyncio.Event) -> None:
    """Ping the watchdog from the event loop, so a blocked loop stops the pings and systemd steps in."""
    interval = watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
