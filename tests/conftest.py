"""Shared fixtures: a real nats-server with a fresh JetStream store, on a loopback port it picks itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from numerusd.embedded_nats import EmbeddedNats


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server for one test, stopped by pid afterwards."""
    server = EmbeddedNats(store_dir=tmp_path / "nats")
    server.start()
    yield server
    server.stop()


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
