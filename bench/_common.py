"""Shared helpers for the benchmarks in `bench/`: a throwaway embedded nats-server, a timer and one result format.

Every benchmark prints its figures twice: as a markdown table row (to paste into `docs/benchmarks.md`) and as
one JSON line (for scripts that compare runs). Usage::

    with embedded_nats() as server:
        nc = await connect(server)
        with Stopwatch() as watch:
            ...
        report("append", n=n, msgs_per_s=n / watch.seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from numerusd.embedded_nats import EmbeddedNats


@contextlib.contextmanager
def embedded_nats(keep: Path | None = None) -> Iterator[EmbeddedNats]:
    """A nats-server with a fresh JetStream store in a temporary directory (or `keep`), stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="numerus-bench-") as tmp:
        server = EmbeddedNats(store_dir=(keep or Path(tmp)) / "nats")
        server.start()
        try:
            yield server
        finally:
            server.stop()


async def connect(server: EmbeddedNats, **options: Any) -> Client:
    """A nats-py connection to `server`, with the options the daemon uses unless overridden."""
    return await nats.connect(server.url, user=server.user, password=server.password, **options)


class Stopwatch:
    """Measures the wall time of a `with` block in `seconds`."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: the message count and the event loop."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=20_000, help="messages per measurement")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (numerusd uses uvloop)"
    )
    return parser


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "uvloop") -> None:
    """Run `main()` on the chosen event loop, the way numerusd would."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def environment() -> dict[str, str]:
    """What the figures depend on, recorded beside them."""
    return {"python": platform.python_version(), "machine": platform.machine(), "platform": sys.platform}


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest sample that `p` percent of the samples are at or below (`p` in 0-100]."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(len(ranked) * p / 100) - 1)]


def report(name: str, **figures: float | int | str) -> None:
    """Print one result as a markdown table (header and row) and as a JSON line."""
    keys = list(figures)
    cells = [_cell(figures[key]) for key in keys]
    print(f"| bench | {' | '.join(keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    print(f"| {name} | {' | '.join(cells)} |")
    print(json.dumps({"bench": name, **figures, **environment()}))


def _cell(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


#: Where the Numerus programs of this environment are (numerusd, numerusctl).
BIN = Path(sys.executable).parent


def git_repo(path: Path) -> Path:
    """A fresh git repository with one commit."""
    path.mkdir(parents=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "-C", str(path)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (path / "README.md").write_text("# bench repo\n")
    subprocess.run([*git, "add", "README.md"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return path


def scripted_state(where: Path, scenario: object, settings: str = "") -> Path:
    """A fresh state directory `where/state` whose numerus.toml holds `settings` (TOML lines) and one scripted
    agent profile, `bench` (the default agent), playing `scenario`. The scenario lies beside the state directory,
    which the sandboxed agents do not see, and their profile binds it."""
    state, scenarios = where / "state", where / "scenarios"
    state.mkdir(parents=True)
    scenarios.mkdir(parents=True)
    scenario_file = scenarios / "scenario.json"
    scenario_file.write_text(json.dumps(scenario))
    (state / "numerus.toml").write_text(
        f'default_agent = "bench"\n{settings.strip()}\n'
        f'[agents.bench]\nkind = "scripted"\nenv = {{ NUMERUS_SCENARIO = {json.dumps(str(scenario_file))} }}\n'
        f"binds = [{json.dumps(str(scenarios))}]\n"
    )
    return state


def start_numerusd(state: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The real numerusd on `state`, its log appended to `state/numerusd.stderr`; returns once it answers (its
    connection file is written), or exits naming why it did not start."""
    (state / "connection.json").unlink(missing_ok=True)
    with open(state / "numerusd.stderr", "ab") as log:  # the child keeps its own descriptor
        daemon = subprocess.Popen(
            [str(BIN / "numerusd"), "--state-dir", str(state), "--log-level", "warning"],
            stdout=log,
            stderr=log,
            env=None if env is None else {**os.environ, **env},
        )
    deadline = time.monotonic() + 60
    while not (state / "connection.json").exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = (state / "numerusd.stderr").read_text(errors="replace")[-2000:]
            raise SystemExit(f"numerusd did not start (exit {daemon.poll()}):\n{tail}")
        time.sleep(0.02)
    return daemon


def stop_numerusd(daemon: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s; waits for it."""
    daemon.terminate()
    try:
        daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
