"""Runs the real `numerusd` and `numerusctl` programs as a user would, for the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

from numerusd.embedded_nats import CONFIG_NAME, daemon_login
from numerusd.protocol.connection import server_urls
from tests.conftest import eventually

BIN = Path(sys.executable).parent
SCENARIOS = Path(__file__).parent / "scenarios"


def git_repo(path: Path) -> Path:
    """A fresh git repository with one commit."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("# test repo\n")
    subprocess.run(["git", "-C", str(path), "add", "README.md"], check=True)
    subprocess.run(
        ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"],
        check=True,
    )
    return path


def git(repo: Path, *args: str) -> str:
    """What `git -C repo ARGS...` prints (it must succeed)."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def session_members(sid: int) -> list[int]:
    """The live processes of the session `sid` leads or led (an agent's: numerusd starts each in its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_bytes()
            except OSError:
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
    return members


def claim(*paths: tuple[str, str]) -> dict:
    """A claimer's answer: these (path, mode) files, no commands."""
    return {"paths": [{"path": path, "kind": "file", "mode": mode} for path, mode in paths], "commands": []}


def write_scenario(path: Path, scenario: list[dict] | dict) -> Path:
    """A scenario file for the scripted agent: a list of steps, or a whole scenario (with `cases`)."""
    path.write_text(json.dumps({"steps": scenario} if isinstance(scenario, list) else scenario))
    return path


@dataclass
class Daemon:
    """One numerusd process on its own state directory; stopped by its pid only."""

    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    #: Scripted agent profiles to configure: profile name -> scenario steps (or a whole scenario).
    agents: dict[str, list[dict] | dict] = field(default_factory=dict)
    #: More numerus.toml settings, as TOML text (top-level keys).
    config: str = ""
    #: More settings of some of `agents`' profiles, as TOML lines: profile name -> lines (`sandbox = "none"`).
    profiles: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        connection = self.state_dir / "connection.json"
        connection.unlink(missing_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.agents or self.config:
            self._configure_agents()
        self.log = open(self.state_dir / "numerusd.stderr", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "numerusd"), "--state-dir", str(self.state_dir), "--log-level", "debug"],
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + timeout
        while not connection.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"numerusd exited with {self.process.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"numerusd did not start within {timeout} s:\n{self.stderr()}")
            time.sleep(0.02)
        return self

    def _configure_agents(self) -> None:
        """A numerus.toml with one scripted profile per scenario, as a user would configure them.

        The scenarios lie beside the state directory, which no sandboxed agent sees: each profile binds their
        directory (under the tests' /tmp, which the agent's private /tmp would hide too)."""
        lines = [self.config]
        scenarios = self.scenarios_dir
        scenarios.mkdir(parents=True, exist_ok=True)
        for name, steps in self.agents.items():
            scenario = write_scenario(scenarios / f"scenario-{name}.json", steps)
            lines += [
                f"[agents.{name}]",
                'kind = "scripted"',
                f"env = {{ NUMERUS_SCENARIO = {json.dumps(str(scenario))} }}",
                f"binds = [{json.dumps(str(scenarios))}]",
                self.profiles.get(name, ""),
            ]
        (self.state_dir / "numerus.toml").write_text("\n".join(lines) + "\n")

    @property
    def scenarios_dir(self) -> Path:
        """Where the scenario of each profile of `agents` is written, `scenario-<name>.json`: beside the state
        directory, which no sandboxed agent sees, and bound into each profile's sandbox."""
        return self.state_dir.parent / f"{self.state_dir.name}-scenarios"

    def stderr(self) -> str:
        path = self.state_dir / "numerusd.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Daemon:
        """`with Daemon(...).start() as daemon:` stops it (by pid) however the block ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal our daemon (by pid) and wait for it; returns its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()
        return process.returncode

    def connection(self) -> dict:
        """Where the daemon's bus is and how the daemon itself logs in (every right: for tests that tamper with the
        streams as no client may); with an external server, what connection.json gives."""
        info = json.loads((self.state_dir / "connection.json").read_text())
        if (self.state_dir / "nats" / CONFIG_NAME).exists():  # the embedded server
            user, password = daemon_login(self.state_dir / "nats")
            info |= {"user": user, "password": password}
        return info

    def server_pid(self) -> int:
        """The pid of the embedded nats-server running now (from its ports file, `nats-server_<pid>.ports`)."""
        (ports,) = (self.state_dir / "nats" / "ports").glob("*.ports")
        return int(ports.stem.rpartition("_")[2])

    def ctl_argv(self, *args: str) -> list[str]:
        """The command line of numerusctl against this daemon."""
        return [str(BIN / "numerusctl"), "--state-dir", str(self.state_dir), *args]

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = False, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run numerusctl against this daemon (in `cwd`, by default this process's)."""
        result = subprocess.run(
            self.ctl_argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, **self.env},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"numerusctl {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def ctl_json(self, *args: str) -> dict:
        return json.loads(self.ctl("--json", *args, check=True).stdout)

    def status(self, job: str) -> dict:
        (view,) = self.ctl_json("status", job)["jobs"]
        return view

    def events(self, job: str) -> list[dict]:
        """The job's events as stored, via `numerusctl --json events`."""
        lines = self.ctl("--json", "events", job, check=True).stdout.splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[DaemonClient]:
        """One NATS connection to this daemon (as it runs now) for a test that polls it, closed afterwards."""
        connection = self.connection()
        servers = server_urls(connection["url"])  # a cluster's nodes, comma separated
        nc = await nats.connect(servers, user=connection["user"], password=connection["password"])
        try:
            yield DaemonClient(nc)
        finally:
            await nc.close()


class DaemonClient:
    """Asks a running daemon what `numerusctl --json status JOB` and `--json events JOB` print, by the same requests
    on its public subjects (`numerus.cmd.<verb>`), over one connection: a test polling it starts no process per
    poll and never blocks its event loop."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    async def jobs(self) -> list[dict]:
        """The newest jobs, as `numerusctl --json status` lists them."""
        return (await self._request("status", {}))["jobs"]

    async def status(self, job: str) -> dict:
        """The job's view with its tasks, as `Daemon.status` gives it."""
        (view,) = (await self._request("status", {"job": job}))["jobs"]
        return view

    async def events(self, job: str) -> list[dict]:
        """The job's events as stored, as `Daemon.events` gives them."""
        events: list[dict] = []
        after = 0
        while True:
            page = await self._request("events", {"job": job, "after_seq": after})
            events += page["events"]
            after = page["last_seq"]
            if not page["more"]:
                return events

    async def wait_for(self, job: str, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """The job's view once `predicate(view)` holds; the test fails, showing the last view, after `timeout` s."""
        seen: dict = {}

        async def reached() -> bool:
            seen["view"] = await self.status(job)
            return predicate(seen["view"])

        try:
            await eventually(reached, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"job never reached the expected state in {timeout} s: {seen.get('view')}") from None
        return seen["view"]

    async def _request(self, verb: str, body: dict) -> dict:
        reply = await self._nc.request(f"numerus.cmd.{verb}", json.dumps(body).encode(), timeout=10)
        if reply.headers and "Nats-Service-Error-Code" in reply.headers:
            raise AssertionError(f"numerus.cmd.{verb} {body} was refused: {reply.data.decode(errors='replace')}")
        return json.loads(reply.data)


def login(daemon: Daemon, role: str) -> dict[str, str]:
    """The bus address and the login of one client role (`operator`, `viewer`), as connection.json gives them."""
    return daemon.connection() | json.loads((daemon.state_dir / "connection.json").read_text())["roles"][role]


async def refused(nc: Client, refusals: list[str], attempt) -> None:
    """Run one attempt (a JetStream API call gets no answer when its publish is refused) and wait for the refusal."""
    before = len(refusals)
    with contextlib.suppress(nats.errors.TimeoutError):
        await attempt()
    await nc.flush()
    for _ in range(100):
        if len(refusals) > before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not refused: {attempt}")
