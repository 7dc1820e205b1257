"""How fast numerusd comes back with a long history: restart to `status` answering, and to views caught up.

    python bench/bench_snapshot.py [--ended 1000] [--per-job 1000] [--live 10] [--rounds 3]

Two state directories, each filled before its daemon first starts with signed, chained events (jobs of three
tasks, mostly agent chatter and token counts, ~50 written at once as a busy daemon writes them):

* history: `--ended` jobs that ended (about `--per-job` events each: 1M events by default) and `--live` jobs
  under way (their agents' lives cut in the middle);
* baseline: the same `--live` jobs under way, nothing else.

Each daemon is started once (a whole replay, views loaded in bulk, every job's snapshot written), stopped, and
then restarted `--rounds` times, the two alternating; each restart is timed from the process's start to a
`status` request answered, and to the views caught up with the stream; the daemon's resident memory (VmRSS) is
read then. `resume = "manual"`: the live jobs wait, interrupted, so that no agent runs.

Restarts are measured twice: on a nats-server that outlives the daemon (an operator's server, as in production:
the bench runs it), and with the daemon's embedded server, which restarts with it: that one restores its streams
at every start, in time that grows with the store (nats-server's own "Restored N messages … in T" log line).

Targets (issue 16): history restart to status <= 2 s, views caught up <= 5 s, the history's restart against the
baseline's <= 1.5x (the median of the pairs' ratios), RSS <= 150 MB.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BIN, base_parser, embedded_nats, report, run, stop_numerusd
from bench_rebuild import job_life
from bench_status import projected, rss_mb

from numerusd.embedded_nats import EmbeddedNats, daemon_login
from numerusd.keys import Keyring
from numerusd.protocol import subjects
from numerusd.protocol.connection import decode_connection, inbox_prefix
from numerusd.protocol.envelope import seal
from numerusd.protocol.events import AgentSpawned, EventData
from numerusd.protocol.ids import new_ulid
from numerusd.stream_reader import last_sequence
from numerusd.streams import ensure_streams

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
AT_ONCE = 50


def live_life(per_job: int, rng: random.Random) -> Iterator[tuple[str | None, EventData]]:
    """A job under way: the first half of a job's life, without the agents' pids (no process of this machine)."""
    for n, step in enumerate(job_life(per_job, rng)):
        if n >= per_job // 2:
            return
        if not isinstance(step[1], AgentSpawned):
            yield step


def histories(ended: int, live: int, per_job: int, seed: int = 11) -> Iterator[tuple[str, str | None, EventData]]:
    """(job, task, event) of `ended` whole jobs, AT_ONCE interleaved, then of `live` jobs cut in the middle."""
    rng = random.Random(seed)
    for count, life in ((ended, job_life), (live, live_life)):
        waiting = [(new_ulid(), life(per_job, rng)) for _ in range(count)]
        active: list[tuple[str, Iterator[tuple[str | None, EventData]]]] = []
        while waiting or active:
            while waiting and len(active) < AT_ONCE:
                active.append(waiting.pop())
            at = rng.randrange(len(active))
            job, events = active[at]
            step = next(events, None)
            if step is None:
                active.pop(at)
                continue
            yield job, step[0], step[1]


async def fill(state: Path, server: EmbeddedNats, ended: int, live: int, per_job: int) -> int:
    """Publish the histories into the state directory's stream, signed with its keys; the events written."""
    keyring = Keyring.load_or_create(state / "keys.json")
    nc = await nats.connect(server.url, user=server.user, password=server.password)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_streams(js)
        heads: dict[str, str] = {}
        clock = T0
        count = 0
        for job, task, data in histories(ended, live, per_job):
            clock += timedelta(milliseconds=3)
            sealed = seal(
                data,
                id=new_ulid(),
                job=job,
                task=task,
                time=clock,
                actor="numerusd",
                correlation_id=job,
                causation_id=None,
                prev=heads.get(job, ""),
                kid=keyring.current_kid,
                key=keyring.current_key,
            )
            heads[job] = sealed.digest
            await js.publish_async(sealed.envelope.subject, sealed.wire, headers={"Nats-Msg-Id": sealed.envelope.id})
            count += 1
        await js.publish_async_completed()
        return count
    finally:
        await nc.close()


class Restarted:
    """One start of the daemon on `state`, timed: to `status` answered, and to the views caught up."""

    def __init__(self, state: Path, server: EmbeddedNats | None) -> None:
        self.state = state
        #: The bench's server, which the daemon uses and which outlives it; None: the daemon starts its own.
        self.server = server
        self.status_s = self.views_s = self.rss_mb = 0.0

    async def run(self, timeout: float = 900) -> Restarted:
        connection = self.state / "connection.json"
        connection.unlink(missing_ok=True)
        started = time.perf_counter()
        env = dict(os.environ)
        if self.server is not None:
            env |= {
                "NUMERUS_NATS_URL": self.server.url,
                "NUMERUS_NATS_USER": self.server.user,
                "NUMERUS_NATS_PASSWORD": self.server.password,
            }
        with open(self.state / "numerusd.stderr", "ab") as log:
            daemon = subprocess.Popen(
                [str(BIN / "numerusd"), "--state-dir", str(self.state), "--log-level", "info"],
                stdout=log,
                stderr=log,
                env=env,
            )
        try:
            while not connection.exists():
                if daemon.poll() is not None or time.perf_counter() - started > timeout:
                    tail = (self.state / "numerusd.stderr").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"numerusd did not start (exit {daemon.poll()}):\n{tail}")
                await asyncio.sleep(0.005)
            c = decode_connection(connection.read_bytes())
            options = {"inbox_prefix": inbox_prefix(c.user)} if self.server is None else {}  # a role's own inbox
            nc = await nats.connect(c.url, user=c.user, password=c.password, **options)
            try:
                reply = await nc.request(subjects.command("status"), json.dumps({"limit": 1}).encode(), timeout=30)
                self.status_s = time.perf_counter() - started
                assert not reply.headers, reply.headers
                assert json.loads(reply.data)["total"] > 0
            finally:
                await nc.close()
            if self.server is None:
                user, password = daemon_login(self.state / "nats")
            else:
                user, password = self.server.user, self.server.password
            admin = await nats.connect(c.url, user=user, password=password)
            try:
                last = await last_sequence(admin.jetstream(), subjects.EVENTS)
            finally:
                await admin.close()
            while projected(self.state / "views.sqlite3") < last:
                if time.perf_counter() - started > timeout:
                    raise SystemExit("the views did not catch up")
                await asyncio.sleep(0.01)
            self.views_s = time.perf_counter() - started
            self.rss_mb = rss_mb(daemon.pid)
        finally:
            stop_numerusd(daemon)
        return self


async def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ended", type=int, default=1000)
    parser.add_argument("--per-job", type=int, default=1000)
    parser.add_argument("--live", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the filled state directories here, and use them if there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="numerus-bench-snapshot-") as tmp:
        where = args.keep or Path(tmp)
        states = {"history": where / "history", "baseline": where / "baseline"}
        events = {}
        for name, state in states.items():
            state.mkdir(parents=True, exist_ok=True)
            (state / "numerus.toml").write_text('resume = "manual"\n')
            if (state / "filled").exists():
                events[name] = int((state / "filled").read_text())
                continue
            with embedded_nats(keep=state) as server:
                started = time.perf_counter()
                ended = args.ended if name == "history" else 0
                events[name] = await fill(state, server, ended, args.live, args.per_job)
                first = await Restarted(state, server).run()
            print(
                f"{name}: {events[name]} events written in {time.perf_counter() - started - first.views_s:.0f} s; "
                f"first start (whole replay, views in bulk) {first.status_s:.1f} s, views {first.views_s:.1f} s",
                file=sys.stderr,
            )
            (state / "filled").write_text(str(events[name]))
        rounds: dict[tuple[str, bool], list[Restarted]] = {}
        for _ in range(args.rounds):
            for embedded in (False, True):
                for name, state in states.items():
                    if embedded:
                        restarted = await Restarted(state, None).run()
                    else:
                        with embedded_nats(keep=state) as server:
                            restarted = await Restarted(state, server).run()
                    rounds.setdefault((name, embedded), []).append(restarted)
    for embedded in (True, False):  # the figure of merit last: bench/run_all.py reads the last result line
        history, baseline = rounds["history", embedded], rounds["baseline", embedded]
        pairs = list(zip(history, baseline, strict=True))
        ratios = [h.status_s / b.status_s for h, b in pairs]
        report(
            "snapshot, its embedded nats-server restarted too" if embedded else "snapshot",
            events=events["history"],
            live_jobs=args.live,
            status_s=round(statistics.median(r.status_s for r in history), 3),
            status_s_max=round(max(r.status_s for r in history), 3),
            views_s=round(statistics.median(r.views_s for r in history), 3),
            baseline_views_s=round(statistics.median(r.views_s for r in baseline), 3),
            views_ratio=round(
                statistics.median(h.views_s / b.views_s for h, b in zip(history, baseline, strict=True)), 3
            ),
            baseline_status_s=round(statistics.median(r.status_s for r in baseline), 3),
            ratio=round(statistics.median(ratios), 3),
            ratio_spread=f"{min(ratios):.2f}-{max(ratios):.2f}",
            rss_mb=round(max(r.rss_mb for r in history), 1),
            baseline_rss_mb=round(max(r.rss_mb for r in baseline), 1),
        )


if __name__ == "__main__":
    run(main, base_parser("").parse_known_args()[0].loop)
