"""Shared fixtures: a real nats-server with a fresh JetStream store, on a loopback port it picks itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from nats.aio.client import Client

from numerusd.config import NatsAddress
from numerusd.embedded_nats import EmbeddedNats

# Hypothesis profiles: `default` for `make test` and CI, `fuzz` for `make fuzz` (HYPOTHESIS_PROFILE=fuzz). A test
# that sets max_examples itself keeps its own count; those that leave it (tests/test_fuzz.py) take the profile's.
# The default derandomizes: CI and every developer run the very same examples, so a red CI is red again on any
# machine, with no example database to carry around. `fuzz` draws new examples on each run, to find what the
# fixed ones never try, and keeps each failure in .hypothesis/ so the next run tries it first.
settings.register_profile("default", max_examples=400, derandomize=True, deadline=None, print_blob=True)
# FUZZ_EXAMPLES sets another count for a shorter (or longer) fuzzing run: `make fuzz FUZZ_EXAMPLES=10000`.
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 100_000)),
    # Said outright: a profile without a parent takes the `default` profile's settings, derandomize included.
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="session")
def the_same_environment_wherever_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite runs the same whatever the shell that runs it exports and whatever lies above its directories.

    No NUMERUS_* setting (a scenario for the scripted agent, a NATS URL, a state directory...) nor CODEX_BIN
    reaches this process or the programs the tests start, unless a test sets it: an exported NUMERUS_SCENARIO
    made the scripted agent play it. And no search for a repository (git's, codex's, the scripted agent's) climbs
    out of pytest's base directory: a `.git` that came and went in /tmp on a shared machine made every test's
    directory a repository for a moment.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("NUMERUS_") or name == "CODEX_BIN"]:
            patch.delenv(name)
        patch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server for one test, stopped by pid afterwards."""
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_address(nats_server: EmbeddedNats) -> NatsAddress:
    """Where the test server is and how to log in, for what connects by itself (a rebuild's reading process)."""
    return NatsAddress(url=nats_server.url, user=nats_server.user, password=nats_server.password)


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A plain nats-py connection to the test server."""
    client = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    yield client
    await client.close()


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until `predicate()` is true, failing the test after `timeout` seconds; never a blind sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def restartable(server: EmbeddedNats) -> Iterator[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]]:
    """Yield `(stop, start)`, to await: stop the server, and start it again on the same port and store, as a
    supervisor would after a crash. Neither blocks the event loop meanwhile. The restarted processes are stopped
    (by their pid) afterwards."""
    processes: list[subprocess.Popen[bytes]] = []
    port = int(server.url.rsplit(":", 1)[1])

    async def restart_stopped() -> None:
        conf = server.store_dir / "nats-server.conf"
        text = conf.read_text().replace("127.0.0.1:-1", f"127.0.0.1:{port}")
        fixed = server.store_dir / "restart.conf"
        fd = os.open(fixed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        log = open(server.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            process = subprocess.Popen([server.binary, "-c", str(fixed)], stdout=log, stderr=log)
        processes.append(process)
        ports = server.store_dir / "ports" / f"{Path(server.binary).name}_{process.pid}.ports"

        def listening() -> bool:  # the server writes its ports file once it listens (the file may exist still empty)
            assert process.poll() is None, "nats-server did not restart"
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                assert json.loads(ports.read_text())["nats"][0].endswith(f":{port}")
                return True
            return False

        await eventually(listening, timeout=10, interval=0.01)

    async def stop_current() -> None:
        process = processes[-1] if processes else server.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        await eventually(lambda: process.poll() is not None, timeout=10, interval=0.01)
        if not processes:
            server.stop()  # it has exited: this only tells the fixture so

    try:
        yield stop_current, restart_stopped
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """A test must not leave a non-daemon thread running: pytest would then never exit (CI hangs)."""
    import threading

    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not left, f"threads left running: {[t.name for t in left]}"
