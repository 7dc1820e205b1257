"""How fast the daemon answers `status` with a long history, and how much memory it holds idle.

    python bench/bench_status.py [--events 100000] [--requests 2000]

Fills a fresh state directory's stream with `--events` signed, chained events (jobs of 50 events each), starts
the real `numerusd` on it (which replays them all), then times `status JOB` requests over NATS, one at a time,
against a baseline measured in the same run: a request to a trivial nats-py responder on the same server, which
is what any reply costs before the daemon does anything. Reports p50/p99 of both and the daemon's resident
memory (VmRSS) once idle. Targets: status p99 <= 5 ms, RSS <= 100 MB.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, percentile, report, run

from numerusd.embedded_nats import EmbeddedNats, daemon_login
from numerusd.keys import Keyring
from numerusd.protocol import events as ev
from numerusd.protocol import subjects
from numerusd.protocol.connection import decode_connection
from numerusd.protocol.envelope import seal
from numerusd.protocol.ids import new_ulid
from numerusd.streams import ensure_streams

EVENTS_PER_JOB = 50


def job_events(job: str) -> list[tuple[str | None, ev.EventData]]:
    """A realistic finished job: submission, one task, its agent's chatter, its exit."""
    head: list[tuple[str | None, ev.EventData]] = [
        (None, ev.JobSubmitted(goal="make the tests pass", repo="/srv/repo", agent="codex")),
        ("t1", ev.TaskCreated(title="make the tests pass", instructions="make the tests pass", agent="codex")),
        ("t1", ev.TaskStarted(attempt=1, agent="codex", argv=("codex", "exec"), workdir="/w", log_path="/w/l")),
        ("t1", ev.AgentSpawned(pid=1234, start_ticks=1)),
        ("t1", ev.AgentThreadStarted(thread_id="thread")),
    ]
    tail: list[tuple[str | None, ev.EventData]] = [
        ("t1", ev.TaskExited(exit_code=0, log_path="/w/l", log_sha256="0" * 64, log_bytes=1, duration_s=1.0)),
        ("t1", ev.TaskCompleted()),
        (None, ev.JobCompleted()),
    ]
    chatter: list[tuple[str | None, ev.EventData]] = []
    while len(head) + len(chatter) + len(tail) < EVENTS_PER_JOB:
        chatter.append(("t1", ev.AgentMessageReceived(text="I ran the tests; two fail, fixing the first now.")))
        chatter.append(("t1", ev.TokensUsed(input_tokens=900, cached_input_tokens=100, output_tokens=40)))
    return (head + chatter)[: EVENTS_PER_JOB - len(tail)] + tail


async def fill(state_dir: Path, count: int) -> str:
    """Publish `count` events into the state directory's own stream; return one job id."""
    keyring = Keyring.load_or_create(state_dir / "keys.json")
    server = EmbeddedNats(store_dir=state_dir / "nats")
    server.start()
    try:
        nc = await nats.connect(server.url, user=server.user, password=server.password)
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_streams(js)
        job = ""
        now = datetime.now(UTC)
        for _ in range(count // EVENTS_PER_JOB):
            job, prev = new_ulid(), ""
            for task, data in job_events(job):
                sealed = seal(
                    data,
                    id=new_ulid(),
                    job=job,
                    task=task,
                    time=now,
                    actor="bench",
                    correlation_id=job,
                    causation_id=None,
                    prev=prev,
                    kid=keyring.current_kid,
                    key=keyring.current_key,
                )
                prev = sealed.digest
                await js.publish_async(
                    sealed.envelope.subject, sealed.wire, headers={"Nats-Msg-Id": sealed.envelope.id}
                )
        await js.publish_async_completed()
        await nc.close()
        return job
    finally:
        server.stop()


def projected(db: Path) -> int:
    """The stream position the daemon's projector has committed."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT seq FROM position").fetchone()[0]
    except sqlite3.Error:
        return 0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def timed_requests(nc: nats.aio.client.Client, subject: str, payload: bytes, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        reply = await nc.request(subject, payload, timeout=5)
        times.append((time.perf_counter() - started) * 1000)
        assert not reply.headers, reply.headers
    return times


async def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="numerus-bench-status-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        job = await fill(state, args.events)
        bin_dir = Path(sys.executable).parent
        started = time.perf_counter()
        daemon = subprocess.Popen(
            [str(bin_dir / "numerusd"), "--state-dir", str(state), "--log-level", "warning"],
            stderr=subprocess.DEVNULL,
        )
        try:
            connection = state / "connection.json"
            while not connection.exists():
                if daemon.poll() is not None:
                    raise SystemExit(f"numerusd exited with {daemon.returncode}")
                await asyncio.sleep(0.05)
            startup_s = time.perf_counter() - started
            while projected(state / "views.sqlite3") < args.events:  # measure the daemon idle, not catching up
                await asyncio.sleep(0.2)
            catch_up_s = time.perf_counter() - started
            c = decode_connection(connection.read_bytes())
            # The daemon's own login: the baseline's echo subject is in no client role's allow list.
            user, password = daemon_login(state / "nats")
            nc = await nats.connect(c.url, user=user, password=password)

            async def respond(msg: nats.aio.msg.Msg) -> None:
                await msg.respond(b"{}")

            echo = await nc.subscribe("bench.echo", cb=respond)
            baseline = await timed_requests(nc, "bench.echo", b"{}", args.requests)
            query = json.dumps({"job": job}).encode()
            status = await timed_requests(nc, subjects.command("status"), query, args.requests)
            await echo.unsubscribe()
            await nc.close()
            await asyncio.sleep(2)  # idle: let the projector finish catching up and the allocator settle
            rss = rss_mb(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(30)
    report(
        "status",
        events=args.events,
        startup_replay_s=round(startup_s, 2),
        views_caught_up_s=round(catch_up_s, 2),
        baseline_p50_ms=round(statistics.median(baseline), 3),
        baseline_p99_ms=round(percentile(baseline, 99), 3),
        status_p50_ms=round(statistics.median(status), 3),
        status_p99_ms=round(percentile(status, 99), 3),
        idle_rss_mb=round(rss, 1),
    )


if __name__ == "__main__":
    run(main, base_parser("").parse_known_args()[0].loop)
