"""Reading a stream in a child process: the same messages as reading it here, clear errors, no process left."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client

from numerusd.config import NatsAddress
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import NatsUnavailable, StoreError
from numerusd.stream_pump import head_started_stream, pumped_stream
from numerusd.stream_reader import read_stream
from numerusd.streams import ensure_stream, stream_specs

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


async def test_a_head_started_stream_hands_over_to_the_child_with_no_gap_and_no_repeat(
    nc: Client, nats_address: NatsAddress
):
    await fill(nc, 2500)
    here = [(m.seq, m.subject, m.data) async for batch in read_stream(nc, EVENTS, start_seq=11) for m in batch]
    got = []
    async for batch in head_started_stream(nats_address, EVENTS, start_seq=11, batch=300):
        got += [(m.seq, m.subject, m.data) for m in batch]
        await asyncio.sleep(0.15)  # a slow fold: the child is reading long before this process is done
    assert got == here
    assert pump_children() == []


async def test_a_small_stream_read_here_to_its_end_leaves_no_child(nc: Client, nats_address: NatsAddress):
    await fill(nc, 40)
    got = [m.seq async for batch in head_started_stream(nats_address, EVENTS) for m in batch]
    assert got == list(range(1, 41))
    assert pump_children() == []


async def test_a_head_started_stream_whose_child_cannot_start_is_read_here_to_its_end(
    nc: Client, nats_address: NatsAddress, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    await fill(nc, 2500)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits at once, saying nothing
    got = []
    async for batch in head_started_stream(nats_address, EVENTS, batch=300):
        got += [m.seq for m in batch]
        await asyncio.sleep(0.05)  # time for the child to have failed before the stream's end
    assert got == list(range(1, 2501))
    assert "reading stream NUMERUS_EVENTS here: its reading process failed: the process reading stream" in caplog.text
    assert pump_children() == []
