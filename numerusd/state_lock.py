"""One daemon per state directory: an exclusive flock on `<state>/numerusd.pid`, which also names its pid."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from numerusd.errors import StateLocked

LOCK_FILE = "numerusd.pid"


def take(state_dir: Path) -> int:
    """Lock the state directory for this process (the returned fd holds it until exit), or StateLocked."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = path.read_text().strip() or "?"
        raise StateLocked(
            f"another numerusd (pid {other}) uses {state_dir}; stop it or pick another --state-dir",
            pid=other,
            state_dir=str(state_dir),
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def held(state_dir: Path) -> bool:
    """Whether a running daemon holds the state directory."""
    path = state_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
