"""The SQLite views: a fold of the stream, committed with their position, rebuilt from the stream identically."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import sqlite3
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from nats.aio.client import Client

from numerusd import domain
from numerusd.config import NatsAddress
from numerusd.errors import StoreError
from numerusd.protocol.envelope import _SIG_MARK, Sealed, _encoder, _Unsigned, seal
from numerusd.protocol.events import (
    AgentMessageReceived,
    AgentSpawned,
    AgentThreadStarted,
    EventData,
    IntegrationBranchCreated,
    JobCompleted,
    JobSubmitted,
    PlanRequested,
    PlanValidated,
    TaskCompleted,
    TaskCreated,
    TaskExited,
    TaskStarted,
    TokensUsed,
    Usage,
)
from numerusd.protocol.plan import Plan, PlannedTask
from numerusd.streams import ensure_stream, stream_specs
from numerusd.views.dump import dump
from numerusd.views.fold import Rejected
from numerusd.views.projector import Projector
from numerusd.views.rebuild import rebuild
from numerusd.views.rows import utc_text
from numerusd.views.schema import FILE_VERSION
from tests.conftest import eventually
from tests.views_reader import event_index, job_state, job_views, rejections

KEYS = {"k1": b"k" * 32}
T0 = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


class Chain:
    """Seals one job's events in order, chaining each to the previous one."""

    def __init__(self, job: str, kid: str = "k1", key: bytes | None = None) -> None:
        self.job = job
        self.kid = kid
        self.key = KEYS[kid] if key is None else key
        self.prev = ""
        self.count = 0

    def __call__(self, data: EventData, task: str | None = None) -> Sealed:
        self.count += 1
        sealed = seal(
            data,
            id=f"{self.job}-e{self.count:04d}",
            job=self.job,
            task=task,
            time=T0 + timedelta(seconds=self.count, microseconds=self.count % 3),
            actor="numerusd",
            correlation_id=self.job,
            causation_id=None,
            prev=self.prev,
            kid=self.kid,
            key=self.key,
        )
        self.prev = sealed.digest
        return sealed


def realistic_job(job: str) -> list[Sealed]:
    """A job's whole life: submitted, one task started, tokens used twice, exited, completed."""
    e = Chain(job)
    return [
        e(JobSubmitted(goal="fix the tests", repo="/repo", agent="codex")),
        e(TaskCreated(title="fix the tests", instructions="make pytest pass", agent="codex"), "t1"),
        e(
            TaskStarted(attempt=1, agent="codex", argv=("codex", "exec"), workdir="/w/t1", log_path="/logs/t1"),
            "t1",
        ),
        e(AgentSpawned(pid=4242, start_ticks=99), "t1"),
        e(AgentThreadStarted(thread_id="th-1"), "t1"),
        e(TokensUsed(input_tokens=100, cached_input_tokens=20, output_tokens=7), "t1"),
        e(AgentMessageReceived(text="done"), "t1"),
        e(TokensUsed(input_tokens=50, cached_input_tokens=5, output_tokens=3), "t1"),
        e(
            TaskExited(exit_code=0, log_path="/logs/t1", log_sha256="ab", log_bytes=10, duration_s=1.5),
            "t1",
        ),
        e(TaskCompleted(), "t1"),
        e(JobCompleted()),
    ]


def planned_job(job: str) -> list[Sealed]:
    """A planned job: the planner's tokens are the job's own, its branch and plan are recorded, a task runs."""
    e = Chain(job)
    plan = Plan(summary="one step", tasks=(PlannedTask(id="t1", title="do it", instructions="do it"),))
    return [
        e(JobSubmitted(goal="do it", repo="/repo", agent="codex", plan=True, parallel=2, base_sha="b" * 40)),
        e(PlanRequested(attempt=1, agent="codex")),
        e(
            PlanValidated(
                version=1, attempt=1, hash="h" * 64, plan=plan, usage=Usage(input_tokens=900, output_tokens=90)
            )
        ),
        e(IntegrationBranchCreated(branch=f"numerus/{job}.integration", base_sha="b" * 40)),
        e(TaskCreated(title="do it", instructions="do it", agent="codex"), "t1"),
        e(TokensUsed(input_tokens=100, cached_input_tokens=20, output_tokens=7), "t1"),
    ]


def messages(events: list[Sealed], first_seq: int = 1) -> list[tuple[int, str, bytes]]:
    return [(first_seq + i, s.envelope.subject, s.wire) for i, s in enumerate(events)]


def interleaved(jobs: int) -> list[Sealed]:
    """Several jobs' events interleaved the way a busy daemon writes them."""
    lives = [realistic_job(f"J{n}") for n in range(jobs)]
    out = []
    for step in range(max(len(life) for life in lives)):
        out.extend(life[step] for life in lives if step < len(life))
    return out


def forged(sealed: Sealed) -> bytes:
    """The same event altered after signing."""
    return sealed.wire.replace(b'"actor":"numerusd"', b'"actor":"mallory!"')


async def project(path: Path, batch: list[tuple[int, str, bytes]], **options: int) -> dict[str, list[tuple]]:
    async with Projector(path, KEYS, **options) as projector:
        await projector.apply(batch)
    return await dump(path)


# --- folding ------------------------------------------------------------------------------------------------


async def test_a_job_read_from_the_views_is_the_job_the_daemon_shows(tmp_path: Path):
    """The planner's tokens, the plan and the branch too, not only what the jobs and tasks columns hold."""
    events = planned_job("J2") + realistic_job("J1")
    path = tmp_path / "views.db"
    async with Projector(path, KEYS) as projector:
        assert await projector.apply(messages(events)) == []
        folded = domain.fold(s.envelope for s in events)
        [j2] = job_views(path, "J2")
        assert j2 == domain.job_view(folded["J2"])
        assert (j2.tokens, j2.plan_version, j2.integration) == (900 + 90 + 100 + 7, 1, "numerus/J2.integration")
        # Newest first; these two were created at the same time, so by id, descending.
        assert job_views(path) == [j2, domain.job_view(folded["J1"])]
        assert job_views(path, "J9") == []


async def test_a_realistic_job_gives_its_job_and_task_rows(tmp_path: Path):
    events = realistic_job("J1")
    path = tmp_path / "views.db"
    async with Projector(path, KEYS) as projector:
        assert await projector.apply(messages(events)) == []
        assert projector.position() == len(events)
        views = await dump(path)
        [job] = job_views(path)
        assert job == domain.job_view(domain.fold(s.envelope for s in events)["J1"])
        assert job_state(path, "J1") == domain.fold(s.envelope for s in events)["J1"]
        assert event_index(path, "J1", type="TokensUsed") == [
            (6, "numerus.job.J1.task.t1.tokens_used"),
            (8, "numerus.job.J1.task.t1.tokens_used"),
        ]
        assert [seq for seq, _ in event_index(path, "J1", after_seq=9)] == [10, 11]

    [(job_id, goal, repo, agent, status, reason, created, updated, count, state)] = views["jobs"]
    assert (job_id, goal, repo, agent, status, reason, count) == (
        "J1",
        "fix the tests",
        "/repo",
        "codex",
        "completed",
        None,
        11,
    )
    assert (created, updated) == ("2026-11-22T09:30:01.000001Z", "2026-11-22T09:30:11.000002Z")
    assert msgspec.json.decode(state, type=domain.JobState).tasks["t1"].output_tokens == 10
    [task] = views["tasks"]
    assert task == (
        "J1", "t1", 0, "fix the tests", "codex", "executor", "completed", 1, 4242, 0, None, "th-1",
        150, 25, 10, "/logs/t1", "2026-11-22T09:30:03.000000Z", "2026-11-22T09:30:09.000000Z",
    )  # fmt: skip
    assert len(views["events"]) == 11
    assert views["events"][0] == (1, "J1-e0001", "J1", None, "JobSubmitted", created, "numerus.job.J1.job_submitted")
    assert views["rejected"] == []
    assert views["position"] == [(11,)]


def test_times_are_fixed_width_utc_text():
    assert utc_text(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"
    assert utc_text(datetime(2026, 1, 2, 3, 4, 5, 7)) == "2026-01-02T03:04:05.000007Z"
    plus_two = datetime(2026, 1, 2, 5, 4, 5, 120000, tzinfo=timezone(timedelta(hours=2)))
    assert utc_text(plus_two) == "2026-01-02T03:04:05.120000Z"
    assert utc_text(None) is None


async def test_resume_after_reopen_skips_what_was_applied(tmp_path: Path):
    batch = messages(interleaved(3))
    path = tmp_path / "views.db"
    async with Projector(path, KEYS) as projector:
        await projector.apply(batch[:10])
    async with Projector(path, KEYS) as projector:
        assert projector.position() == 10
        # The daemon crashed before learning the batch was committed: it is delivered again, whole, with more.
        await projector.apply(batch[:20])
        await projector.apply(batch[5:20])
        await projector.apply(batch[20:])
        assert projector.position() == len(batch)
    assert await dump(path) == await project(tmp_path / "once.db", batch)
    tokens = (await dump(path))["tasks"]
    assert {row[12] for row in tokens} == {150}  # input tokens counted once per TokensUsed, not twice


async def test_a_small_cache_reads_states_back_from_the_file(tmp_path: Path):
    batch = messages(interleaved(4))
    async with Projector(tmp_path / "small.db", KEYS, cache_jobs=1) as projector:
        for at in range(0, len(batch), 3):
            await projector.apply(batch[at : at + 3])
    assert await dump(tmp_path / "small.db") == await project(tmp_path / "once.db", batch)


# --- what is rejected ---------------------------------------------------------------------------------------


async def test_invalid_messages_are_rejected_recorded_and_change_nothing(tmp_path: Path):
    events = realistic_job("J1")
    other = Chain("J2", kid="k1")
    stranger = seal(
        JobSubmitted(goal="g", repo="/r", agent="a"), id="X1", job="J3", task=None, time=T0, actor="x",
        correlation_id="c", causation_id=None, prev="", kid="k9", key=b"z" * 32,
    )  # fmt: skip
    orphan = other(TaskCreated(title="t", instructions="i", agent="a"), "t1")  # J2 never submitted
    good = messages(events)
    bad = [
        (100, events[5].envelope.subject, forged(events[5])),
        (101, "numerus.job.J1.junk", b"\x00not json at all"),
        (102, stranger.envelope.subject, stranger.wire),
        (103, orphan.envelope.subject, orphan.wire),
        (104, "numerus.job.J1.somewhere_else", events[0].wire),
        (105, events[7].envelope.subject, events[7].wire),  # a republished duplicate
        (106, "numerus.job.J1.unknown", events[0].wire.replace(b'"type":"JobSubmitted"', b'"type":"JobDreamed"')),
    ]
    path = tmp_path / "views.db"
    async with Projector(path, KEYS) as projector:
        assert await projector.apply(good) == []
        before = await dump(path)
        rejected = await projector.apply(bad)
        after = await dump(path)
        assert [(r.seq, r.reason) for r in rejected] == [
            (100, "bad_signature"),
            (101, "malformed"),
            (102, "unknown_key"),
            (103, "refused"),
            (104, "wrong_subject"),
            (105, "duplicate"),
            (106, "bad_signature"),  # the type is signed too: changing it breaks the signature first
        ]
        assert [r.wire for r in rejected] == [wire for _, _, wire in bad]
        assert all(r.message for r in rejected)
        assert rejections(path) == [(r.seq, r.subject, r.reason, r.message) for r in rejected]
        assert projector.position() == 106
    for table in ("jobs", "tasks", "events"):
        assert after[table] == before[table]
    assert after["position"] == [(106,)]
    assert [row[:3] for row in after["rejected"]] == [(r.seq, r.subject, r.reason) for r in rejected]


async def test_an_unknown_event_type_correctly_signed_is_rejected(tmp_path: Path):
    body = _encoder.encode(
        _Unsigned(
            id="u1", type="JobDreamed", job="J1", task=None, time=T0, actor="a", correlation_id="c",
            causation_id=None, data={}, prev="", kid="k1",
        )
    )  # fmt: skip
    wire = body[:-1] + _SIG_MARK + hmac.digest(KEYS["k1"], body, "sha256").hex().encode() + b'"}'
    async with Projector(tmp_path / "views.db", KEYS) as projector:
        [rejected] = await projector.apply([(1, "numerus.job.J1.job_dreamed", wire)])
    assert rejected.reason == "unknown_type"


async def test_a_broken_database_is_a_store_error(tmp_path: Path):
    path = tmp_path / "views.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"views\.db"):
        await Projector(path, KEYS).open()


async def test_a_file_of_another_schema_version_is_dropped_and_rebuilt(tmp_path: Path):
    path = tmp_path / "views.db"
    await project(path, messages(realistic_job("J1")))
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 999")
        conn.commit()
    async with Projector(path, KEYS) as projector:
        assert projector.position() == 0
        assert job_views(path) == []


# --- the property: batching does not matter -----------------------------------------------------------------

_EVENTS = interleaved(3)
_MESSAGES = messages(_EVENTS)
# A forged event, a garbage message and a repeat in the middle, to show rejections batch the same way too.
_MESSAGES.insert(7, (0, _EVENTS[12].envelope.subject, forged(_EVENTS[12])))
_MESSAGES.insert(15, (0, "numerus.job.J0.x", b"{}"))
_MESSAGES.insert(22, (0, _EVENTS[20].envelope.subject, _EVENTS[20].wire))  # a republished event
_MESSAGES = [(seq, subject, wire) for seq, (_, subject, wire) in enumerate(_MESSAGES, start=1)]


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="numerus-proj-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def one_batch_views() -> dict[str, list[tuple]]:
    with scratch_dir() as tmp:
        return asyncio.run(project(tmp / "one.db", _MESSAGES))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(_MESSAGES) - 1), unique=True, max_size=12),
    cache_jobs=st.sampled_from([1, 2, 10_000]),
    reopen=st.booleans(),
)
def test_any_split_into_batches_gives_the_same_views(one_batch_views, cuts, cache_jobs, reopen):
    batches = split(_MESSAGES, cuts)

    async def project_split(path: Path) -> dict[str, list[tuple]]:
        projector = await Projector(path, KEYS, cache_jobs=cache_jobs).open()
        for batch in batches:
            await projector.apply(batch)
            if reopen:  # as if the daemon restarted between every two batches
                await projector.close()
                projector = await Projector(path, KEYS, cache_jobs=cache_jobs).open()
        await projector.close()
        return await dump(path)

    with scratch_dir() as tmp:
        assert asyncio.run(project_split(tmp / "split.db")) == one_batch_views


# A bulk load (what `rebuild` does) refuses a repeat that spans two batches (`rebuild` then starts again,
# checking every id: see the stream test below), so its property is shown on the stream without the repeat.
_UNREPEATED = [(seq, subject, wire) for seq, subject, wire in _MESSAGES if seq != 23]


@pytest.fixture(scope="module")
def one_batch_unrepeated() -> dict[str, list[tuple]]:
    with scratch_dir() as tmp:
        return asyncio.run(project(tmp / "one.db", _UNREPEATED))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(_UNREPEATED) - 1), unique=True, max_size=12),
    cache_jobs=st.sampled_from([1, 2, 10_000]),
)
def test_a_bulk_load_in_any_batches_gives_the_same_views(one_batch_unrepeated, cuts, cache_jobs):
    async def bulk(path: Path) -> dict[str, list[tuple]]:
        projector = await Projector(path, KEYS, cache_jobs=cache_jobs).open(bulk=True)
        for batch in split(_UNREPEATED, cuts):
            await projector.apply(batch)
        await projector.finish()
        await projector.close()
        return await dump(path)

    with scratch_dir() as tmp:
        assert asyncio.run(bulk(tmp / "bulk.db")) == one_batch_unrepeated


def split(messages: list[tuple[int, str, bytes]], cuts: list[int]) -> list[list[tuple[int, str, bytes]]]:
    bounds = [0, *sorted(cuts), len(messages)]
    return [messages[a:b] for a, b in itertools.pairwise(bounds)]


async def test_a_bulk_load_left_unfinished_is_dropped_on_open(tmp_path: Path):
    path = tmp_path / "views.db"
    projector = await Projector(path, KEYS).open(bulk=True)
    await projector.apply(messages(realistic_job("J1")))
    await projector.close()  # interrupted: never finished
    async with Projector(path, KEYS) as projector:
        assert projector.position() == 0
        assert await dump(path) == {name: [] for name in ("jobs", "tasks", "events", "rejected")} | {"position": [(0,)]}


# --- against a real stream ----------------------------------------------------------------------------------


async def test_rebuild_from_the_stream_equals_the_live_views(nc: Client, nats_address: NatsAddress, tmp_path: Path):
    js = nc.jetstream()
    await ensure_stream(js, stream_specs()[0])
    events = interleaved(5)
    for sealed in events[:30]:
        await js.publish(sealed.envelope.subject, sealed.wire)
    live_path = tmp_path / "live.db"
    projector = await Projector(live_path, KEYS).open()
    stop = asyncio.Event()
    letters: list[Rejected] = []

    async def dead_letter(rejected: list[Rejected]) -> None:
        # Reported before their batch commits: a crash in between repeats a dead letter rather than losing it.
        [(position,)] = (await dump(live_path))["position"]
        assert position < rejected[0].seq
        letters.extend(rejected)

    live = asyncio.create_task(projector.run(nc, stop, on_rejected=dead_letter))
    await eventually(lambda: projector.position() == 30)
    # Published while the projector follows: it picks them up as they come, a forgery among them.
    await js.publish(events[30].envelope.subject, forged(events[30]))
    for sealed in events[30:]:
        await js.publish(sealed.envelope.subject, sealed.wire)
    await js.publish(events[3].envelope.subject, events[3].wire)  # republished past the duplicate window
    last = len(events) + 2
    await eventually(lambda: projector.position() == last)
    stop.set()
    await asyncio.wait_for(live, 10)
    forgery, repeat = letters
    assert (forgery.reason, forgery.seq) == ("bad_signature", 31)
    assert (repeat.reason, repeat.seq) == ("duplicate", last)
    assert repeat.wire == events[3].wire
    live_views = await dump(live_path)
    await projector.close()

    rebuilt_path = tmp_path / "rebuilt.db"
    report = await rebuild(nats_address, KEYS, rebuilt_path)
    assert (report.messages, report.applied, report.rejected) == (last, last - 2, 2)
    assert (report.jobs, report.tasks, report.last_seq) == (5, 5, last)
    assert await dump(rebuilt_path) == live_views
    assert not Path(f"{rebuilt_path}.rebuild").exists()
    # A rebuild builds the indexes once its rows are in: they are there, and the file says it is whole.
    with contextlib.closing(sqlite3.connect(rebuilt_path)) as db:
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_created", "events_job", "events_type", "events_time"} <= indexes
        assert db.execute("PRAGMA user_version").fetchone()[0] == FILE_VERSION

    # In place of the live file, and again over the rebuilt one: the same rows.
    again = await rebuild(nats_address, KEYS, live_path)
    assert again.messages == last
    assert await dump(live_path) == live_views
    await rebuild(nats_address, KEYS, rebuilt_path)
    assert await dump(rebuilt_path) == live_views
