"""Snapshots: a start from the snapshots and the stream's tail makes every job what a replay of the whole stream
makes it, whatever the history and wherever the checkpoints fell; snapshots that cannot be trusted are not used."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import hypothesis.strategies as st
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from nats.aio.client import Client

from numerusd import domain, snapshots
from numerusd.book import JobBook
from numerusd.config import NatsAddress
from numerusd.domain.observations import (
    AgentExited,
    AgentReported,
    AgentStarted,
    AgentStarting,
    AttemptFailed,
    ClaimAnswered,
    GateDone,
    Interrupted,
    Kill,
    Merged,
    Pause,
    PlanAnswered,
    Resume,
    Retry,
    Settled,
    Skip,
    Start,
    SubmitJob,
    WorkCommitted,
)
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import NumerusError
from numerusd.event_store import EventStore
from numerusd.keys import Keyring
from numerusd.locks import claim_locks
from numerusd.protocol.claims import Claim, ClaimedPath
from numerusd.protocol.connection import inbox_prefix
from numerusd.protocol.events import JobPaused, TokensUsed
from numerusd.protocol.plan import Plan, PlannedTask
from numerusd.protocol.subjects import CHECKPOINT, EVENTS, SNAPSHOTS, job_snapshot
from numerusd.replay import replay
from numerusd.streams import ensure_streams, stream_specs
from numerusd.wal import WriteAheadLog
from tests.daemon_harness import Daemon, git_repo, login, refused
from tests.test_rebuild import rebuild
from tests.test_run import HELLO
from tests.views_reader import job_views

ROLES = dict.fromkeys(("planner", "queen", "executor", "reviewer"), "scripted")
PATHS = ("a.py", "b.py", "c.py", "docs/d.md")
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


# --- random histories: a random walk over what the daemon may decide, the domain refusing what does not fit ------


def a_plan(rng: random.Random) -> Plan:
    ids = [f"t{i}" for i in range(1, rng.randint(1, 5) + 1)]
    tasks = []
    for at, task_id in enumerate(ids):
        deps = tuple(sorted(rng.sample(ids[:at], k=rng.randint(0, min(2, at)))))
        tasks.append(PlannedTask(id=task_id, title=task_id, instructions=f"do {task_id}", deps=deps))
    return Plan(summary="a plan", tasks=tuple(tasks))


def a_claim(task: str, rng: random.Random, attempt: int) -> ClaimAnswered:
    paths = tuple(ClaimedPath(path, "file", "modify") for path in rng.sample(PATHS, k=rng.randint(1, 2)))
    wanted = claim_locks(Claim(paths=paths, commands=()))
    assert isinstance(wanted, tuple)
    return ClaimAnswered(task=task, attempt=attempt, paths=paths, locks=wanted, max_attempts=2)


def a_move(job: domain.JobState, rng: random.Random) -> object:
    """One message the daemon could decide for `job` now (the domain may still refuse it)."""
    if job.status == "planning":
        return PlanAnswered(role="planner", attempt=job.plan_attempts + 1, plan=a_plan(rng), plan_hash="h" * 64)
    by = rng.choice(["alice (operator)", "numerusd"])
    if not job.tasks or rng.random() < 0.08:
        return rng.choice(
            [Kill(by=by), Pause(by=by), Start(by=by), Interrupted(reason="stopped"), Resume(by=by), Settled()]
        )
    task = rng.choice(sorted(job.tasks))
    state = job.tasks[task]
    attempt = max(1, state.attempt)
    return rng.choice(
        [
            a_claim(task, rng, state.claim_attempts + 1),
            AgentStarting(task=task, argv=("agent", "exec"), workdir=f"/w/{task}", log_path=f"/l/{task}"),
            AgentStarted(task=task, pid=rng.randint(100, 99999), start_ticks=rng.randint(1, 10**6)),
            AgentReported(
                task=task,
                events=(TokensUsed(input_tokens=rng.randint(1, 900), cached_input_tokens=0, output_tokens=7),),
            ),
            AgentExited(
                task=task,
                exit_code=rng.choice([0, 0, 1]),
                signal=None,
                log_path=f"/l/{task}/attempt-{attempt}.log",
                log_sha256="0" * 64,
                log_bytes=rng.randint(0, 5000),
                duration_s=rng.random() * 9,
            ),
            WorkCommitted(task=task, commit=f"{rng.getrandbits(160):040x}", changes=(rng.choice(PATHS),)),
            GateDone(task=task, reasons=rng.choice([(), ("a check failed",)])),
            Merged(task=task, sha=f"{rng.getrandbits(160):040x}", created=rng.random() < 0.5),
            AttemptFailed(task=task, reasons=("the agent gave up",)),
            Kill(by=by, task=task),
            Skip(by=by, task=task),
            Retry(by=by, tasks=(task,)),
        ]
    )


@dataclass
class History:
    """What a random walk left: the jobs as the live book holds them, and how much the checkpoints covered."""

    live: dict[str, domain.JobState]
    heads: dict[str, str]
    decided: int
    checkpoints: int
    position: int


class Held:
    """A lease held under `epoch`, as the store sees numerusd.lease.Lease."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def may_append(self) -> bool:
        return True

    def may_publish(self) -> bool:
        return True


async def walk(
    nc: Client,
    keyring: Keyring,
    wal_path: Path,
    seed: int,
    steps: int,
    checkpoint_every: int,
    last_checkpoint: bool,
    epoch: int = 0,
) -> History:
    """Decide `steps` random messages on a few jobs through a real book and store, with checkpoints in between."""
    rng = random.Random(seed)
    js = nc.jetstream()
    store = EventStore(nc, js, WriteAheadLog.open(wal_path), keyring, lease=Held(epoch) if epoch else None)
    await store.recover()
    book = JobBook(store)
    snapshotter = snapshots.Snapshotter(js, nc, book, store, keyring)
    jobs: list[str] = []
    decided = 0
    try:
        for step in range(steps):
            if not jobs or rng.random() < 0.04:
                job_id = f"J{seed % 1000:03d}{len(jobs):02d}"
                submit = SubmitJob(
                    goal=f"goal {len(jobs)}",
                    repo="/repo",
                    roles=ROLES,
                    parallel=rng.randint(1, 3),
                    max_attempts=rng.randint(1, 3),
                    max_replans=0,
                )
                await book.decide(job_id, submit)
                jobs.append(job_id)
                continue
            job_id = rng.choice(jobs)
            with contextlib.suppress(NumerusError):  # refused: nothing recorded, as in the daemon
                decided += len(await book.decide(job_id, a_move(book.jobs[job_id], rng)))
            if step % checkpoint_every == checkpoint_every - 1:
                # Not after a flush: some events are still in flight, some jobs caught between two of theirs.
                await snapshotter.checkpoint()
        await store.flush()
        if last_checkpoint:
            await snapshotter.checkpoint()
        heads = {job_id: store.chain_head(job_id) for job_id in book.jobs}
        return History(dict(book.jobs), heads, decided, snapshotter.stats["checkpoints"], snapshotter.position)
    finally:
        await store.close()


async def restart(
    nc: Client, address: NatsAddress, keyring: Keyring, wal_path: Path, loaded: snapshots.Loaded
) -> tuple[dict[str, domain.JobState], dict[str, str], int]:
    """What a start makes of the stream from `loaded`: the jobs, their chain heads, the events folded."""
    js = nc.jetstream()
    store = EventStore(nc, js, WriteAheadLog.open(wal_path), keyring)
    book = JobBook(store)
    try:
        folded = await replay(nc, js, address, book, store, keyring.keys, loaded)
        return dict(book.jobs), {job_id: store.chain_head(job_id) for job_id in book.jobs}, folded
    finally:
        await store.close()


async def fresh_streams(nc: Client) -> None:
    js = nc.jetstream()
    for name in (EVENTS, SNAPSHOTS):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    await ensure_streams(js, stream_specs())


@dataclass
class Scratch:
    """Fresh streams on the module's server, a keyring, and a directory for write-ahead logs: one example's bus."""

    nc: Client
    address: NatsAddress
    keyring: Keyring
    tmp: Path

    @property
    def wal_path(self) -> Path:
        return self.tmp / "events.wal"

    async def load(self) -> snapshots.Loaded:
        return await snapshots.load(self.nc, self.nc.jetstream(), self.keyring.keys)

    async def restart(self, loaded: snapshots.Loaded) -> tuple[dict[str, domain.JobState], dict[str, str], int]:
        return await restart(self.nc, self.address, self.keyring, self.wal_path, loaded)


@contextlib.asynccontextmanager
async def scratch(server: EmbeddedNats) -> AsyncIterator[Scratch]:
    address = address_of(server)
    nc = await nats.connect(address.url, user=address.user, password=address.password)
    try:
        await fresh_streams(nc)
        with tempfile.TemporaryDirectory() as tmp:
            yield Scratch(nc, address, Keyring.generate(), Path(tmp))
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    server = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


def address_of(server: EmbeddedNats) -> NatsAddress:
    return NatsAddress(url=server.url, user=server.user, password=server.password)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**31),
    steps=st.integers(min_value=10, max_value=600),
    checkpoint_every=st.integers(min_value=3, max_value=80),
    last_checkpoint=st.booleans(),
)
def test_snapshots_and_tail_give_what_a_whole_replay_gives(server, seed, steps, checkpoint_every, last_checkpoint):
    async def example() -> None:
        async with scratch(server) as bus:
            history = await walk(bus.nc, bus.keyring, bus.wal_path, seed, steps, checkpoint_every, last_checkpoint)
            whole, whole_heads, whole_folded = await bus.restart(snapshots.Loaded())
            loaded = await bus.load()
            resumed, resumed_heads, tail_folded = await bus.restart(loaded)
        assert loaded.ignored is None
        assert whole == history.live, "a replay of the whole stream differs from the live jobs"
        assert resumed == whole, "snapshots and tail differ from a replay of the whole stream"
        assert resumed_heads == whole_heads == history.heads, "the next event of a job would not chain"
        assert loaded.position == history.position
        assert whole_folded == sum(job.events for job in whole.values())
        if last_checkpoint:  # written with nothing in flight: it holds everything, and nothing is replayed
            assert (len(loaded.jobs), tail_folded) == (len(whole), 0)
        else:
            assert tail_folded <= whole_folded

    asyncio.run(example())


# --- snapshots that cannot be trusted -------------------------------------------------------------------------


def test_snapshots_that_cannot_be_trusted_are_not_used(server):
    """Forged, missing, misplaced or out-of-range snapshots make the start replay the whole stream instead."""

    async def example() -> list[str | None]:
        reasons = []
        async with scratch(server) as bus:
            js, keyring = bus.nc.jetstream(), bus.keyring
            history = await walk(bus.nc, keyring, bus.wal_path, 7, 120, 1000, last_checkpoint=True)
            good = await bus.load()
            assert good.ignored is None and len(good.jobs) == len(history.live) > 1
            one, other = sorted(good.jobs)[:2]
            genuine = good.jobs[one]
            checkpoint = snapshots.Checkpoint(position=good.position, jobs=len(good.jobs), written=T0)

            async def tampered(subject: str, data: bytes) -> str | None:
                await js.publish(subject, data)
                loaded = await bus.load()
                jobs, _, _ = await bus.restart(loaded)
                assert jobs == history.live  # whatever was tampered with, the jobs are what the events say
                return loaded.ignored

            stranger = Keyring.generate()
            reasons.append(await tampered(job_snapshot(one), snapshots.seal_snapshot(genuine, stranger)))
            forged = snapshots.seal_snapshot(genuine, keyring)
            reasons.append(await tampered(job_snapshot(one), forged[:-1] + bytes([forged[-1] ^ 1])))
            await js.publish(job_snapshot(one), snapshots.seal_snapshot(genuine, keyring))
            reasons.append(await tampered(job_snapshot(other), snapshots.seal_snapshot(genuine, keyring)))
            await js.publish(job_snapshot(other), snapshots.seal_snapshot(good.jobs[other], keyring))
            more = snapshots.Checkpoint(position=checkpoint.position, jobs=checkpoint.jobs + 1, written=T0)
            reasons.append(await tampered(CHECKPOINT, snapshots.seal_snapshot(more, keyring)))
            beyond = snapshots.Checkpoint(position=10**9, jobs=checkpoint.jobs, written=T0)
            reasons.append(await tampered(CHECKPOINT, snapshots.seal_snapshot(beyond, keyring)))
            await js.publish(CHECKPOINT, snapshots.seal_snapshot(checkpoint, keyring))
            assert (await bus.load()).ignored is None  # all put back: used again
        return reasons

    reasons = asyncio.run(example())
    expected = [
        "signed with unknown key id",
        "signature does not match",
        "is on numerus.snapshot.job.",
        "1 of",
        "the stream ends at",
    ]
    assert len(reasons) == len(expected)
    for reason, words in zip(reasons, expected, strict=True):
        assert reason is not None and words in reason, (reason, words)


# --- a real daemon ----------------------------------------------------------------------------------------------


def finished_jobs(daemon: Daemon, repo: Path, count: int) -> dict[str, dict]:
    jobs = {}
    for n in range(count):
        run = daemon.ctl("run", "--no-plan", f"Greet {n}", "--repo", str(repo), "--agent", "scripted", "--wait")
        assert run.returncode == 0, run.stdout + run.stderr
        job = run.stdout.splitlines()[0].strip()
        jobs[job] = daemon.status(job)
    return jobs


def test_a_daemon_stopped_and_started_again_replays_nothing_and_shows_the_same_jobs(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    with Daemon(tmp_path / "state", agents={"scripted": HELLO}).start() as daemon:
        before = finished_jobs(daemon, repo, 2)
        daemon.stop()
        assert "checkpoint at stream sequence" in daemon.stderr()  # written as it stopped
        daemon.start()
        assert "2 jobs: 2 restored from snapshots, 0 events replayed" in daemon.stderr()
        assert {job: daemon.status(job) for job in before} == before
        after = finished_jobs(daemon, repo, 1)  # and it goes on: a new job, chained and audited like the others
        audit = daemon.ctl("audit", "verify")
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert len(after) == 1


def test_a_daemon_killed_between_checkpoints_starts_from_the_last_one_and_the_tail(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    often = "snapshot_every_events = 5\nsnapshot_every_s = 0.2\n"
    with Daemon(tmp_path / "state", agents={"scripted": HELLO}, config=often).start() as daemon:
        before = finished_jobs(daemon, repo, 3)
        daemon.stop(signal.SIGKILL)  # no last checkpoint: the next start reads the snapshots and the tail
        daemon.start()
        restored = re.findall(r"(\d+) jobs: (\d+) restored from snapshots, (\d+) events replayed", daemon.stderr())
        assert restored and int(restored[-1][1]) >= 1, daemon.stderr()
        assert {job: daemon.status(job) for job in before} == before
        rebuilt = tmp_path / "rebuilt.sqlite3"
        result = rebuild(daemon, "--to", str(rebuilt))
        assert result.returncode == 0, result.stderr
        for job, view in before.items():
            (row,) = job_views(rebuilt, job)
            assert msgspec.to_builtins(row) == view, "status differs from the rebuilt view"


async def test_no_client_login_can_write_or_remove_the_snapshots(tmp_path: Path):
    """A forged snapshot would be refused for its signature anyway; the bus does not even take one, nor a purge or
    a removal of the stream, from any client login: each attempt is refused for its permissions, and the stream is
    as the daemon left it."""

    async def stream_state(daemon: Daemon) -> tuple[int, int]:
        own = daemon.connection()
        admin = await nats.connect(own["url"], user=own["user"], password=own["password"])
        try:
            state = (await admin.jetstream().stream_info(SNAPSHOTS)).state
            return state.messages, state.last_seq
        finally:
            await admin.close()

    repo = git_repo(tmp_path / "repo")
    with Daemon(tmp_path / "state", agents={"scripted": HELLO}).start() as daemon:
        before = finished_jobs(daemon, repo, 1)
        daemon.stop()
        daemon.start()
        kept = await stream_state(daemon)
        assert kept[0] == 2  # the job's snapshot and the checkpoint
        for role in ("operator", "viewer"):
            client_login = login(daemon, role)
            refusals: list[str] = []

            async def record(error: Exception, refusals: list[str] = refusals) -> None:
                if "permissions violation" in str(error):
                    refusals.append(str(error))

            nc = await nats.connect(
                client_login["url"],
                user=client_login["user"],
                password=client_login["password"],
                error_cb=record,
                inbox_prefix=inbox_prefix(role),
            )
            try:
                js = nc.jetstream(timeout=0.5)
                await refused(nc, refusals, functools.partial(nc.publish, CHECKPOINT, b"forged"))
                await refused(nc, refusals, functools.partial(js.purge_stream, SNAPSHOTS))
                await refused(nc, refusals, functools.partial(js.delete_stream, SNAPSHOTS))
            finally:
                await nc.close()
        assert await stream_state(daemon) == kept  # nothing written, purged or removed
        daemon.stop()
        daemon.start()
        assert "1 jobs: 1 restored from snapshots, 0 events replayed" in daemon.stderr().split("numerusd stopped")[-1]
        assert {job: daemon.status(job) for job in before} == before


def test_an_event_of_a_stale_writer_after_the_checkpoint_is_refused_as_by_a_whole_replay(server):
    """The checkpoint carries the writers' epoch: an event a daemon that lost its lease wrote after it is refused
    (`stale_epoch`) from the snapshots as from the whole stream, though it extends its job's chain."""

    async def example() -> tuple[History, dict, dict, snapshots.Loaded]:
        async with scratch(server) as bus:
            history = await walk(bus.nc, bus.keyring, bus.wal_path, 3, 80, 1000, last_checkpoint=True, epoch=2)
            wal = WriteAheadLog.open(bus.tmp / "stale.wal")
            stale = EventStore(bus.nc, bus.nc.jetstream(), wal, bus.keyring, lease=Held(1))
            await stale.catch_up()
            job = sorted(history.live)[0]
            await stale.append(job, [(None, JobPaused(by="a numerusd that lost its lease"))], correlation_id=job)
            await stale.flush()
            await stale.close()
            whole, _, _ = await bus.restart(snapshots.Loaded())
            loaded = await bus.load()
            resumed, _, _ = await bus.restart(loaded)
        return history, whole, resumed, loaded

    history, whole, resumed, loaded = asyncio.run(example())
    assert loaded.epoch == 2 and loaded.jobs
    assert whole == history.live, "the whole replay folded the stale event"
    assert resumed == history.live, "the replay from the snapshots folded the stale event"
