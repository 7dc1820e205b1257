"""Reading a stream in a child process: the same messages as reading it here, clear errors, no process left."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from numerusd import stream_pump
from numerusd.config import NatsAddress
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import NatsUnavailable, StoreError
from numerusd.stream_pump import head_started_stream, pumped_stream
from numerusd.stream_reader import StreamMessage, read_stream
from numerusd.streams import ensure_stream, stream_specs
from tests.conftest import eventually

EVENTS = "NUMERUS_EVENTS"


async def fill(nc: Client, count: int) -> None:
    js = nc.jetstream()
    await ensure_stream(js, stream_specs()[0])
    for i in range(count):
        # Some with headers, as the event store publishes them, some without; bytes that are not UTF-8 too.
        headers = {"Nats-Msg-Id": f"m{i}"} if i % 2 else None
        await js.publish_async(f"numerus.job.j{i % 7}.JobSubmitted", b"\xff%d\x00" % i, headers=headers)
    await js.publish_async_completed()


def pump_children() -> list[int]:
    """Pids of this process's children running the pump."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"numerusd.stream_pump" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_pumped_stream_yields_what_reading_it_here_yields(nc: Client, nats_address: NatsAddress):
    await fill(nc, 2500)
    for start in (1, 1001):
        here = [m async for batch in read_stream(nc, EVENTS, start_seq=start, batch=300) for m in batch]
        batches = [batch async for batch in pumped_stream(nats_address, EVENTS, start_seq=start, batch=300)]
        pumped = [m for batch in batches for m in batch]
        assert [(m.seq, m.subject, m.data) for m in pumped] == [(m.seq, m.subject, m.data) for m in here]
        assert pumped[0].seq == start and pumped[-1].seq == 2500
        assert all(m.time_ns > 0 for m in pumped)
        # Batches grow to the size asked (the parent commits one transaction per batch): each but the last at
        # least twice the one before, or whole.
        sizes = [len(batch) for batch in batches]
        assert all(size >= min(300, 2 * before) for before, size in itertools.pairwise(sizes[:-1]))
        assert max(sizes) >= 300
    assert pump_children() == []


async def test_an_empty_stream_yields_nothing(nc: Client, nats_address: NatsAddress):
    await ensure_stream(nc.jetstream(), stream_specs()[0])
    assert [batch async for batch in pumped_stream(nats_address, EVENTS)] == []


@pytest.mark.parametrize("reading", [pumped_stream, head_started_stream])
async def test_a_refused_login_is_one_clear_line(nats_server: EmbeddedNats, reading):
    wrong = NatsAddress(url=nats_server.url, user=nats_server.user, password="not-the-password")
    with pytest.raises(NatsUnavailable) as caught:
        [batch async for batch in reading(wrong, EVENTS)]
    assert str(caught.value).startswith(f"cannot connect to NATS at {nats_server.url}: ")
    assert "\n" not in str(caught.value)
    assert pump_children() == []


async def test_a_missing_stream_is_named(nats_address: NatsAddress):
    with pytest.raises(StoreError, match=r"^cannot create a reader on stream NOT_THERE: .*stream not found"):
        [batch async for batch in pumped_stream(nats_address, "NOT_THERE")]


async def test_stopping_early_stops_the_child(nc: Client, nats_address: NatsAddress):
    await fill(nc, 3000)
    batches = pumped_stream(nats_address, EVENTS, batch=500)
    first = await anext(batches)
    assert first[0].seq == 1
    assert len(pump_children()) == 1
    await batches.aclose()
    assert pump_children() == []


@pytest.fixture
def child_answered(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once the reading child has said whether it is connected (or has failed to): from then on,
    `head_started_stream` hands over (or gives up on the child) at its next batch."""
    answered = asyncio.Event()
    ready = stream_pump._Child.ready

    async def ready_then_tell(child: stream_pump._Child) -> None:
        try:
            await ready(child)
        finally:
            answered.set()

    monkeypatch.setattr(stream_pump._Child, "ready", ready_then_tell)
    return answered


@pytest.fixture
def read_here(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The batches this process reads itself, as their sequences (the child's reading is in its own process)."""
    batches: list[list[int]] = []

    async def recorded(*args, **kwargs) -> AsyncIterator[list[StreamMessage]]:
        async with contextlib.aclosing(read_stream(*args, **kwargs)) as reading:
            async for batch in reading:
                batches.append([m.seq for m in batch])
                yield batch

    monkeypatch.setattr(stream_pump, "read_stream", recorded)
    return batches


async def test_a_head_started_stream_hands_over_to_the_child_with_no_gap_and_no_repeat(
    nc: Client, nats_address: NatsAddress, child_answered: asyncio.Event, read_here: list[list[int]]
):
    await fill(nc, 2500)
    here = [(m.seq, m.subject, m.data) async for batch in read_stream(nc, EVENTS, start_seq=11) for m in batch]
    got = []
    async for batch in head_started_stream(nats_address, EVENTS, start_seq=11, batch=300):
        got += [(m.seq, m.subject, m.data) for m in batch]
        # A slow fold: the child is connected before this process has read far.
        await eventually(child_answered.is_set, timeout=20)
    assert got == here
    # This process read the head, one batch, and the child the rest, from the next message on.
    (head,) = read_here
    assert head == list(range(11, 11 + len(head))) and len(head) < len(got)
    assert pump_children() == []


async def test_a_small_stream_read_here_to_its_end_leaves_no_child(nc: Client, nats_address: NatsAddress):
    await fill(nc, 40)
    got = [m.seq async for batch in head_started_stream(nats_address, EVENTS) for m in batch]
    assert got == list(range(1, 41))
    assert pump_children() == []


async def test_a_head_started_stream_whose_child_cannot_start_is_read_here_to_its_end(
    nc: Client,
    nats_address: NatsAddress,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    child_answered: asyncio.Event,
    read_here: list[list[int]],
):
    await fill(nc, 2500)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits at once, saying nothing
    got = []
    async for batch in head_started_stream(nats_address, EVENTS, batch=300):
        got += [m.seq for m in batch]
        await eventually(child_answered.is_set, timeout=20)  # the child has failed before the stream's end
    assert got == list(range(1, 2501))
    assert [seq for batch in read_here for seq in batch] == got  # all of it read here
    assert "reading stream NUMERUS_EVENTS here: its reading process failed: the process reading stream" in caplog.text
    assert pump_children() == []
