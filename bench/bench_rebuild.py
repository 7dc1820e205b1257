"""How fast `numerusd rebuild` replays the event stream into SQLite, against the cheapest honest read of it.

    python bench/bench_rebuild.py [--n 100000] [--jobs 2000] [--repeat 9] [--profile]

One embedded nats-server; NUMERUS_EVENTS is filled with `n` realistic signed, chained events (jobs of a few
tasks, each task mostly agent chatter and token counts, jobs interleaved as a busy daemon writes them). Then:

* raw: the lean stream reader reads the whole stream and checks every event's HMAC signature under the key
  its envelope names: the floor any rebuild pays;
* rebuild: `views.rebuild.rebuild`: read (in a child process), verify, decode, fold with `domain.evolve`, write
  the SQLite views into a fresh file (indexes included) and swap it in.

Each is run `--repeat` times, alternating. The figure of merit, `ratio` (target 0.6), is the median of the
pairwise ratios: each rebuild's speed against the raw read just before it. This machine's own speed drifts by
a quarter from one minute to the next (the same raw read took 1.1 to 1.9 s in one series), and a ratio of the
two bests pairs a raw read from a fast minute with a rebuild from a slow one, or the other way round:
`best_ratio` is that figure, kept for comparison with earlier runs. Single pairs of the same code range from
0.48 to 0.91 here, so a median of five moved by ±0.06 from one run to the next (0.577 to 0.70 over one
day); nine pairs (the default) narrow that at the cost of half a minute. The CPU seconds (the process's, every
thread, and the reading process's) show how much of a difference is work rather than waiting.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # for _common when run as a script

from _common import Stopwatch, base_parser, connect, embedded_nats, report, run
from nats.aio.client import Client

from numerusd.config import NatsAddress
from numerusd.protocol.envelope import check_signature, decode_wire, seal
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentFileChanged,
    AgentMessageReceived,
    AgentSpawned,
    AgentThreadStarted,
    EventData,
    JobCompleted,
    JobSubmitted,
    TaskCompleted,
    TaskCreated,
    TaskExited,
    TaskStarted,
    TokensUsed,
)
from numerusd.protocol.ids import new_ulid
from numerusd.protocol.subjects import EVENTS
from numerusd.stream_reader import read_stream
from numerusd.streams import ensure_stream, stream_specs
from numerusd.views.rebuild import rebuild

KID = "bench"
KEYS = {KID: b"numerus-bench-key-0123456789abcdef"}
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def job_life(per_job: int, rng: random.Random) -> Iterator[tuple[str | None, EventData]]:
    """One job's events, about `per_job` of them: three tasks, each mostly agent chatter and token counts."""
    yield None, JobSubmitted(goal="make the flaky integration tests pass", repo="/srv/repo", agent="codex")
    tasks = ["t1", "t2", "t3"]
    for task in tasks:
        yield task, TaskCreated(title=f"part {task}", instructions="fix it " * 20, agent="codex", deps=())
    chatter = max(1, (per_job - 2 - 7 * len(tasks)) // len(tasks))
    for task in tasks:
        yield (
            task,
            TaskStarted(
                attempt=1, agent="codex", argv=("codex", "exec", "--json"), workdir=f"/w/{task}", log_path="/l"
            ),
        )
        yield task, AgentSpawned(pid=rng.randrange(1000, 60000), start_ticks=rng.randrange(1 << 30))
        yield task, AgentThreadStarted(thread_id=new_ulid())
        for i in range(chatter):
            kind = i % 4
            if kind == 0:
                yield task, TokensUsed(input_tokens=1200, cached_input_tokens=800, output_tokens=150)
            elif kind == 1:
                yield task, AgentMessageReceived(text="I looked at the failing test and the fixture it uses.")
            elif kind == 2:
                yield task, AgentCommandExecuted(command="pytest -x tests/test_api.py", exit_code=0)
            else:
                yield task, AgentFileChanged(path=f"src/module_{i}.py", kind="update")
        yield task, TokensUsed(input_tokens=300, cached_input_tokens=0, output_tokens=40)
        yield (
            task,
            TaskExited(exit_code=0, log_path="/l", log_sha256="0" * 64, log_bytes=123456, duration_s=42.5),
        )
        yield task, TaskCompleted()
    yield None, JobCompleted()


def sealed_events(n: int, jobs: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """About `n` signed, chained events of `jobs` jobs, ~50 jobs running at once: (subject, wire)."""
    rng = random.Random(seed)
    per_job = max(30, n // jobs)
    out: list[tuple[str, bytes]] = []
    active: list[tuple[str, Iterator[tuple[str | None, EventData]], list[str]]] = []
    started = 0
    clock = T0
    while len(out) < n:
        while len(active) < 50 and started < jobs * 2:
            job = new_ulid()
            active.append((job, job_life(per_job, rng), [""]))
            started += 1
        if not active:
            break
        at = rng.randrange(len(active))
        job, life, prev = active[at]
        step = next(life, None)
        if step is None:
            active.pop(at)
            continue
        task, data = step
        clock += timedelta(milliseconds=rng.randrange(1, 50))
        sealed = seal(
            data,
            id=new_ulid(),
            job=job,
            task=task,
            time=clock,
            actor="numerusd",
            correlation_id=job,
            causation_id=None,
            prev=prev[0],
            kid=KID,
            key=KEYS[KID],
        )
        prev[0] = sealed.digest
        out.append((sealed.envelope.subject, sealed.wire))
    return out


async def fill(nc: Client, events: list[tuple[str, bytes]]) -> None:
    js = nc.jetstream(publish_async_max_pending=4000)
    await ensure_stream(js, stream_specs()[0])
    for subject, wire in events:
        await js.publish_async(subject, wire)
    await js.publish_async_completed()


def _children_cpu() -> float:
    """CPU seconds of the child processes that have ended (the rebuild's reading process, once it is done)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def raw_read(nc: Client) -> int:
    """Read the whole stream, checking each event's signature under the key its envelope names."""
    keys = KEYS
    count = 0
    async for batch in read_stream(nc, EVENTS):
        for message in batch:
            data = message.data
            check_signature(data, keys, decode_wire(data).kid)
        count += len(batch)
    return count


async def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.set_defaults(n=100_000)
    parser.add_argument("--jobs", type=int, default=0, help="jobs to spread the events over (default n/50)")
    parser.add_argument("--repeat", type=int, default=9, help="pairs of measurements, raw then rebuild")
    parser.add_argument("--profile", action="store_true", help="cProfile one more rebuild, print the top")
    args = parser.parse_args()
    jobs = args.jobs or max(1, args.n // 50)

    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="numerus-rebuild-") as tmp:
        nc = await connect(server)
        address = NatsAddress(url=server.url, user=server.user, password=server.password)
        try:
            with Stopwatch() as sealing:
                events = sealed_events(args.n, jobs)
            with Stopwatch() as filling:
                await fill(nc, events)
            print(
                f"# {len(events):,} events of {jobs:,} jobs sealed in {sealing.seconds:.1f} s, "
                f"published in {filling.seconds:.1f} s",
                file=sys.stderr,
            )
            raw_s, rebuild_s, raw_cpu, rebuild_cpu, reader_cpu, ratios = [], [], [], [], [], []
            db = Path(tmp) / "views.db"
            for _ in range(args.repeat):
                cpu = time.process_time()
                with Stopwatch() as watch:
                    count = await raw_read(nc)
                assert count == len(events), (count, len(events))
                raw_s.append(watch.seconds)
                raw_cpu.append(time.process_time() - cpu)
                cpu, children = time.process_time(), _children_cpu()
                with Stopwatch() as watch:
                    result = await rebuild(address, KEYS, db)
                assert result.messages == len(events) and result.rejected == 0, result
                rebuild_s.append(watch.seconds)
                rebuild_cpu.append(time.process_time() - cpu)
                reader_cpu.append(_children_cpu() - children)
                ratios.append(raw_s[-1] / rebuild_s[-1])
                print(
                    f"# raw {len(events) / raw_s[-1]:,.0f} ev/s ({raw_cpu[-1]:.2f} s CPU), rebuild "
                    f"{len(events) / rebuild_s[-1]:,.0f} ev/s ({rebuild_cpu[-1]:.2f} s CPU, all threads, "
                    f"and {reader_cpu[-1]:.2f} s in the reading process), ratio "
                    f"{ratios[-1]:.3f}, load average {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                )
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await rebuild(address, KEYS, db)
                profiler.disable()
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            db_mb = db.stat().st_size / 1e6
        finally:
            await nc.close()

    raw_rate = len(events) / min(raw_s)
    rebuild_rate = len(events) / min(rebuild_s)
    report(
        "rebuild",
        n=len(events),
        jobs=jobs,
        raw_ev_per_s=round(raw_rate),
        rebuild_ev_per_s=round(rebuild_rate),
        ratio=round(statistics.median(ratios), 3),
        best_ratio=round(rebuild_rate / raw_rate, 3),
        pair_ratios=" ".join(f"{r:.2f}" for r in ratios),
        raw_cpu_s=round(min(raw_cpu), 2),
        rebuild_cpu_s=round(min(rebuild_cpu), 2),
        reader_cpu_s=round(min(reader_cpu), 2),
        db_mb=round(db_mb, 1),
    )


if __name__ == "__main__":
    run(main, base_parser("").parse_known_args()[0].loop)
