"""The lean stream reader: every message once, in order, from any start, filtered, caught up or following."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.js.api import StreamConfig

from numerusd.errors import StoreError
from numerusd.stream_reader import StreamMessage, StreamReader, last_sequence, read_stream
from tests.conftest import eventually, restartable


@pytest.fixture
async def js(nc):
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="READ", subjects=["read.>"]))
    return js


async def fill(js, n: int, start: int = 0) -> None:
    futures = []
    for i in range(start, start + n):
        # Every other message carries a header, as events do (Nats-Msg-Id).
        headers = {"Nats-Msg-Id": f"m{i}"} if i % 2 else None
        futures.append(
            await js.publish_async(f"read.{'even' if i % 2 == 0 else 'odd'}.{i}", b"%d" % i, headers=headers)
        )
    await asyncio.gather(*futures)


async def collect(nc, **options) -> tuple[list[StreamMessage], int]:
    out: list[StreamMessage] = []
    batches = 0
    async for batch in read_stream(nc, "READ", **options):
        batches += 1
        out.extend(batch)
    return out, batches


async def test_reads_everything_once_in_order(nc, js):
    await fill(js, 3000)
    before = time.time_ns()
    messages, batches = await collect(nc, batch=500)
    assert [m.seq for m in messages] == list(range(1, 3001))
    assert [m.data for m in messages] == [b"%d" % i for i in range(3000)]
    assert messages[7].subject == "read.odd.7"
    assert batches > 1
    assert all(before - 120 * 10**9 < m.time_ns <= time.time_ns() for m in messages[:10])
    assert await last_sequence(js, "READ") == 3000


async def test_starts_anywhere_and_filters(nc, js):
    await fill(js, 200)
    messages, _ = await collect(nc, start_seq=151)
    assert [m.seq for m in messages] == list(range(151, 201))
    evens, _ = await collect(nc, filter_subjects=["read.even.>"])
    assert [m.data for m in evens] == [b"%d" % i for i in range(0, 200, 2)]
    both, _ = await collect(nc, start_seq=100, filter_subjects=["read.even.>", "read.odd.>"])
    assert [m.seq for m in both] == list(range(100, 201))


async def test_nothing_to_read_ends_at_once(nc, js):
    started = time.monotonic()
    assert await collect(nc) == ([], 0)
    await fill(js, 5)
    assert await collect(nc, start_seq=6) == ([], 0)
    assert time.monotonic() - started < 2
    assert await last_sequence(js, "READ") == 5


async def test_follow_delivers_what_comes_later(nc, js):
    await fill(js, 10)
    seen: list[int] = []
    reader = StreamReader(nc, "READ", follow=True, expires=1.0)

    async def follow() -> None:
        async for batch in reader:
            seen.extend(m.seq for m in batch)

    task = asyncio.create_task(follow())
    await eventually(lambda: len(seen) == 10)
    await fill(js, 25, start=10)
    await eventually(lambda: len(seen) == 35)
    assert seen == list(range(1, 36))
    assert reader.last_seq == 35
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await reader.close()


async def test_unknown_stream_is_a_store_error(nc, js):
    with pytest.raises(StoreError, match="NOPE"):
        await collect_stream(nc, "NOPE")


async def collect_stream(nc, stream: str) -> None:
    async for _ in read_stream(nc, stream):
        pass


@pytest.mark.slow
async def test_follow_survives_a_server_restart(nats_server):
    nc = await nats.connect(
        nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        reconnect_time_wait=0.05,
        max_reconnect_attempts=-1,
    )
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="READ", subjects=["read.>"]))
    await fill(js, 10)
    seen: list[int] = []
    reader = StreamReader(nc, "READ", follow=True, expires=0.5)

    async def follow() -> None:
        async for batch in reader:
            seen.extend(m.seq for m in batch)

    task = asyncio.create_task(follow())
    with restartable(nats_server) as (stop_server, start_server):
        await eventually(lambda: len(seen) == 10)
        await stop_server()
        await start_server()
        await eventually(lambda: stream_ready(js))  # until then the server drops publishes unanswered
        await fill(js, 5, start=10)
        await eventually(lambda: len(seen) >= 15, timeout=8)  # the lost in-memory consumer is re-created after seq 10
        assert seen == list(range(1, 16))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()
        await nc.close()


async def stream_ready(js) -> bool:
    try:
        await asyncio.wait_for(js.stream_info("READ"), 0.5)
    except Exception:
        return False
    return True
