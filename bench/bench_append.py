"""How much the event store costs over raw JetStream publishing, and how fast the stream reads back.

    python bench/bench_append.py [--n 20000] [--callers 64] [--batch 4] [--rounds 3] [--read-n 100000]
                                 [--profile] [--switch-interval 0.001]

In one run, against one embedded nats-server with a fresh store:

(a) raw: nats-py `js.publish_async` of `n` event-sized payloads with `Nats-Msg-Id` headers, every ack awaited;
(b) ours: `EventStore.append` of `n` events from `--callers` concurrent callers, `--batch` events per call:
    signed, chained, in the WAL with fdatasync (group commit), published and acknowledged (`flush`);
(c) read: `StreamReader` over `--read-n` small messages (without headers, as logs are) and over the events
    of (b) (with their `Nats-Msg-Id` header, which nats-py parses per message).

(a) and (b) alternate for `--rounds` rounds; the medians are reported, with the ratio ours/raw (target: at
least 0.8), as a markdown row and a JSON line.

With few events in flight (say 64 callers of one event) the store is bound by latency, not CPU: each group
commit waits for the WAL thread to get the GIL back from a busy event loop, up to Python's switch interval
(5 ms). `--switch-interval 0.001` shows what a daemon that lowers it gains.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Stopwatch, base_parser, connect, embedded_nats, report, run

from numerusd.event_store import EventStore
from numerusd.keys import Keyring
from numerusd.protocol.envelope import seal
from numerusd.protocol.events import AgentMessageReceived
from numerusd.protocol.ids import new_ulid
from numerusd.protocol.subjects import EVENTS
from numerusd.stream_reader import StreamReader
from numerusd.streams import ensure_streams
from numerusd.wal import WriteAheadLog

TEXT = "compiling numerusd/event_store.py and running the tests again after the fix "


def sample_payloads(n: int, jobs: list[str]) -> list[tuple[str, bytes]]:
    """`n` real event envelopes (subject, wire), so the raw baseline publishes the same bytes as the store."""
    key = b"k" * 32
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        job = jobs[i % len(jobs)]
        sealed = seal(
            AgentMessageReceived(text=TEXT),
            id=new_ulid(),
            job=job,
            task="t1",
            time=now,
            actor="bench",
            correlation_id="bench",
            causation_id=None,
            prev="0" * 64,
            kid="kbench",
            key=key,
        )
        out.append((sealed.envelope.subject, sealed.wire))
    return out


async def raw_publish(js, payloads: list[tuple[str, bytes]], tag: str) -> float:
    """(a): msgs/s of js.publish_async with Nats-Msg-Id, all acks awaited."""
    with Stopwatch() as watch:
        futures = []
        for i, (subject, wire) in enumerate(payloads):
            futures.append(await js.publish_async(subject, wire, headers={"Nats-Msg-Id": f"raw-{tag}-{i}"}))
        await asyncio.gather(*futures)
    return len(payloads) / watch.seconds


async def store_append(store: EventStore, n: int, callers: int, batch: int, jobs: list[str]) -> float:
    """(b): msgs/s of EventStore.append from concurrent callers, until every event is acknowledged."""
    calls = n // batch
    per_caller = [calls // callers + (1 if c < calls % callers else 0) for c in range(callers)]
    event = AgentMessageReceived(text=TEXT)

    async def caller(c: int, count: int) -> None:
        job = jobs[c % len(jobs)]
        events = [("t1", event)] * batch
        for _ in range(count):
            await store.append(job, events, correlation_id="bench")

    with Stopwatch() as watch:
        await asyncio.gather(*(caller(c, count) for c, count in enumerate(per_caller)))
        await store.flush(timeout=120)
    return calls * batch / watch.seconds


async def read_all(nc, stream: str, expect: int) -> float:
    """(c): msgs/s of the lean reader over a whole stream."""
    count = 0
    with Stopwatch() as watch:
        async with StreamReader(nc, stream) as reader:
            async for messages in reader:
                count += len(messages)
    assert count == expect, (count, expect)
    return count / watch.seconds


async def main_async(args) -> None:
    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="numerus-bench-state-") as state:
        nc = await connect(server)
        js = nc.jetstream(publish_async_max_pending=args.n + 1)
        await ensure_streams(js)
        await js.add_stream(StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"], duplicate_window=600))
        jobs = [new_ulid() for _ in range(8)]
        payloads = sample_payloads(args.n, jobs)
        raw_subjects = [(f"bench.raw.{subject}", wire) for subject, wire in payloads]
        wal = WriteAheadLog.open(Path(state) / "events.wal")
        store = EventStore(nc, js, wal, Keyring.load_or_create(Path(state) / "keys.json"), actor="bench")
        await store.catch_up()
        await raw_publish(js, raw_subjects[: min(2000, args.n)], "warm")  # warm-ups, not counted
        await store_append(store, min(2000, args.n), args.callers, args.batch, jobs)

        # Rounds alternate raw and ours, and the medians are compared: on a shared machine the load changes
        # from second to second, and this way both sides see the same mix of it.
        raws: list[float] = []
        ours: list[float] = []
        syncs_before = wal.syncs
        profiler = cProfile.Profile() if args.profile else None
        for round_ in range(args.rounds):
            raws.append(await raw_publish(js, raw_subjects, str(round_)))
            if profiler:
                profiler.enable()
            ours.append(await store_append(store, args.n, args.callers, args.batch, jobs))
            if profiler:
                profiler.disable()
        syncs = (wal.syncs - syncs_before) // args.rounds
        await store.close()
        raw, mine = statistics.median(raws), statistics.median(ours)

        await js.add_stream(StreamConfig(name="BENCH_READ", subjects=["bench.read.>"]))
        futures = [await js.publish_async(f"bench.read.{i % 16}", b"x" * 64) for i in range(args.read_n)]
        await asyncio.gather(*futures)
        read_plain = await read_all(nc, "BENCH_READ", args.read_n)
        info = await js.stream_info(EVENTS)
        read_events = await read_all(nc, EVENTS, info.state.messages)
        await nc.close()

    report(
        "append",
        n=args.n,
        callers=args.callers,
        batch=args.batch,
        rounds=args.rounds,
        raw_msgs_per_s=round(raw),
        store_msgs_per_s=round(mine),
        ratio=round(mine / raw, 3),
        fdatasyncs_per_round=syncs,
        read_plain_msgs_per_s=round(read_plain),
        read_events_msgs_per_s=round(read_events),
        switch_interval_ms=round(sys.getswitchinterval() * 1000, 2),
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=64, help="concurrent appenders")
    parser.add_argument("--batch", type=int, default=4, help="events per append call")
    parser.add_argument("--read-n", type=int, default=100_000, help="small messages for the read measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/ours measurements (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile the store's run (slows it down)")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval(s): how soon the WAL's sync thread gets the GIL back from a busy event loop",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    run(lambda: main_async(args), args.loop)


if __name__ == "__main__":
    main()
