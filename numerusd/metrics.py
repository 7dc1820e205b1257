"""The daemon's Prometheus metrics, and the opt-in HTTP endpoint that serves them on `/metrics`.

Each daemon has its own `Metrics` (its own registry, not the process-wide default, so that tests running several
daemons in one process never mix their figures). Two kinds of figures:

- measured as they happen, one call at the place they happen: events appended and how long each append took to
  be durable (`event_store.py`), each WAL fdatasync (`wal.py`), each agent spawn (`supervisor.py`), dead letters
  by source and reason (`dead_letters.py`), NATS disconnects and reconnects (the daemon's connection callbacks);
- read at scrape time from what the daemon already holds (`JobCollector`): jobs and tasks by state, tokens by
  kind and their cost at the configured prices, the queue and the agent slots. Nothing keeps a second count of
  them that could drift from the job book.

The endpoint (`serve`, setting `metrics_address`, flag `numerusd --metrics ADDR`) is off unless asked for, and
listens on 127.0.0.1 when only a port is given. It runs on the daemon's event loop (the collector reads job
states, immutable values, as the command service's thread does) and answers GET or HEAD of `/metrics` and
nothing else; a client that sends no request within a few seconds, or a request head over 16 KiB, is
disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from numerusd import domain
from numerusd.config import parse_address
from numerusd.errors import ConfigError
from numerusd.protocol.commands import JobStatus, TaskStatus

log = logging.getLogger(__name__)

#: Latencies of a disk sync or of an append (WAL group commit included): from a tenth of a millisecond to seconds.
_DISK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: An agent's start: a fork and exec, in a sandbox or not.
_SPAWN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: How long a scrape client may take to send its request, and the most its request head may hold.
_REQUEST_TIMEOUT_S = 5.0
_MAX_REQUEST_HEAD = 16 * 1024


class Metrics:
    """One daemon's metrics, in a registry of its own; the instruments are called where things happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.events_appended = Counter(
            "numerus_events_appended", "Events appended (sealed and sent to the WAL).", registry=registry
        )
        self.append_seconds = Histogram(
            "numerus_append_seconds",
            "Seconds from an append to its events being durable in the WAL.",
            buckets=_DISK_BUCKETS,
            registry=registry,
        )
        self.wal_fsync_seconds = Histogram(
            "numerus_wal_fsync_seconds",
            "Seconds each fdatasync of the write-ahead log took.",
            buckets=_DISK_BUCKETS,
            registry=registry,
        )
        self.agent_spawn_seconds = Histogram(
            "numerus_agent_spawn_seconds",
            "Seconds to start an agent process (in its sandbox and PTY).",
            buckets=_SPAWN_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "numerus_dead_letters",
            "Inputs rejected and kept on numerus.dlq.<source>.<reason>.",
            ["source", "reason"],
            registry=registry,
        )
        self.nats_disconnects = Counter(
            "numerus_nats_disconnects", "Times the daemon lost its NATS connection.", registry=registry
        )
        self.nats_reconnects = Counter(
            "numerus_nats_reconnects", "Times the daemon reconnected to NATS.", registry=registry
        )

    def watch(self, source: WatchedDaemon) -> None:
        """Figures read at scrape time from `source` (jobs, tasks, tokens, cost, queue, slots)."""
        self.registry.register(JobCollector(source))

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format, as a scrape gets it."""
        return generate_latest(self.registry)


@dataclass(frozen=True)
class WatchedDaemon:
    """What the collector reads, each a function so it sees the daemon as it is at each scrape: the jobs, the
    agent slots (in use, in all, agents waiting), and a job's cost at the prices configured now (None: unknown;
    `status` computes it the same way)."""

    jobs: Callable[[], Iterable[domain.JobState]]
    slots: Callable[[], tuple[int, int, int]]
    cost: Callable[[domain.JobState], float | None]


class JobCollector(Collector):
    """Jobs and tasks by state, tokens, cost, queue and slots: computed from the job book at each scrape."""

    def __init__(self, source: WatchedDaemon) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        jobs_by_state = dict.fromkeys(get_args(JobStatus), 0)
        tasks_by_state = dict.fromkeys(get_args(TaskStatus), 0)
        tokens = {"input": 0, "cached_input": 0, "output": 0}
        cost = 0.0
        queued = 0
        for job in list(self.source.jobs()):  # a copy: the loop may fold events between two scrapes, not during
            jobs_by_state[domain.shown_status(job)] += 1
            queued += job.queued
            for counted in (job, *job.tasks.values()):
                tokens["input"] += counted.input_tokens
                tokens["cached_input"] += counted.cached_input_tokens
                tokens["output"] += counted.output_tokens
            for task in job.tasks.values():
                tasks_by_state[task.status] += 1
            cost += self.source.cost(job) or 0.0
        yield _by_label(
            GaugeMetricFamily("numerus_jobs", "Jobs by state (as status shows it).", labels=["state"]), jobs_by_state
        )
        yield _by_label(
            GaugeMetricFamily("numerus_tasks", "Tasks of all jobs by state.", labels=["state"]), tasks_by_state
        )
        yield _by_label(
            CounterMetricFamily(
                "numerus_tokens", "Tokens agents used, by kind (cached_input is part of input).", labels=["kind"]
            ),
            tokens,
        )
        yield GaugeMetricFamily("numerus_cost", "What the tokens of all jobs cost at the configured prices.", cost)
        yield GaugeMetricFamily("numerus_jobs_queued", "Jobs waiting for a first agent slot of the daemon.", queued)
        used, total, waiting = self.source.slots()
        yield GaugeMetricFamily("numerus_agent_slots_used", "Agent slots of the daemon in use (max_agents).", used)
        yield GaugeMetricFamily("numerus_agent_slots", "Agent slots of the daemon in all (max_agents).", total)
        yield GaugeMetricFamily("numerus_agents_waiting", "Agents waiting for a slot of the daemon.", waiting)


def _by_label(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]) -> Metric:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


class MetricsServer:
    """The HTTP endpoint serving `/metrics` on the daemon's loop; `start` then `close`."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self.metrics = metrics
        self.host, self.port = parse_address(address)
        self.address = address
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; the URL it serves (with the port chosen when 0 was asked). ConfigError when it cannot."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_REQUEST_HEAD)
        except OSError as e:
            raise ConfigError(
                f"metrics_address {self.address!r}: cannot listen on {self.host}:{self.port}: {e.strerror or e}",
                setting="metrics_address",
            ) from e
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    async def close(self) -> None:
        """Stop listening and end the connections being served."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # too slow, too long, or gone: nothing to answer
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif path != "/metrics":
                status, body, kind = "404 Not Found", b"metrics are on /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", self.metrics.exposition(), CONTENT_TYPE_LATEST
            header = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close"
            writer.write(header.encode() + b"\r\n\r\n" + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass  # the scraper went away mid-answer
        except Exception:  # a scrape must never take the daemon down
            log.exception("metrics scrape failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
