"""The daemon-wide queue (issue 15, item 5): `max_agents` across all jobs, `queued` with a position, `--priority`,
`pause` and `start`.

First the domain as a state machine (queued -> planning/running, pause/start, positions), then the pool that
hands out the slots, then a real daemon with scripted agents that wait for a file the test writes, so that the
test decides when each agent's slot frees.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from numerusd import domain
from numerusd.agent_pool import AgentPool, Withdrawn
from numerusd.domain.observations import (
    AgentSlotAwaited,
    AgentSlotTaken,
    AgentStarting,
    Interrupted,
    Kill,
    Pause,
    PlanAnswered,
    Stalled,
    Start,
    SubmitJob,
)
from numerusd.errors import CommandRefused
from numerusd.protocol.envelope import Envelope
from numerusd.protocol.plan import Plan, PlannedTask
from numerusd.views.rows import job_row
from tests.conftest import eventually
from tests.daemon_harness import Daemon, DaemonClient, git_repo

T0 = datetime(2026, 12, 7, tzinfo=UTC)
ALICE = "alice (operator)"


class Clock:
    """Event times that move one second per event, so that promotions have an order."""

    def __init__(self) -> None:
        self.now = T0

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def fold(state: domain.JobState | None, job: str, decision: domain.Decision, clock: Clock) -> domain.JobState:
    for number, (task, data) in enumerate(decision):
        event = Envelope(
            id=f"{job}-{number}-{clock.now.timestamp()}",
            type=type(data).__name__,
            job=job,
            task=task,
            time=clock.tick(),
            actor="test",
            correlation_id=job,
            causation_id=None,
            data=data,
            prev="",
            kid="k",
        )
        state = domain.evolve(state, event)
    assert state is not None
    return state


def decide(job: domain.JobState | None, message: object, clock: Clock, job_id: str = "J") -> domain.JobState:
    return fold(job, job.id if job is not None else job_id, domain.decide(job, message), clock)  # type: ignore[arg-type]


def submit(clock: Clock, job_id: str = "J", *, plan: bool = True, priority: int = 0) -> domain.JobState:
    roles = {"executor": "scripted", "planner": "scripted"}
    command = SubmitJob(goal="fix it", repo="/repo", roles=roles, plan=plan, priority=priority)
    return decide(None, command, clock, job_id)


# --- the domain -------------------------------------------------------------------------------------------------


def test_a_planned_job_whose_first_agent_waits_is_queued_then_planning_when_it_gets_a_slot():
    clock = Clock()
    job = decide(submit(clock), AgentSlotAwaited(), clock)
    assert (job.status, domain.shown_status(job), job.queued) == ("planning", "queued", True)
    assert domain.decide(job, AgentSlotAwaited()) == []  # queued once
    job = decide(job, AgentSlotTaken(), clock)
    assert (domain.shown_status(job), job.queued) == ("planning", False)
    assert domain.decide(job, AgentSlotTaken()) == []  # a later agent's slot records nothing


def test_an_unplanned_queued_job_is_running_once_it_gets_its_slot_and_its_agent_starts():
    clock = Clock()
    job = decide(submit(clock, plan=False), AgentSlotAwaited(), clock)
    assert domain.job_view(job).status == "queued"
    job = decide(job, AgentSlotTaken(), clock)
    job = decide(job, AgentStarting(task="t1", argv=("codex",), workdir="/repo", log_path="l"), clock)
    assert domain.job_view(job).status == "running"


def test_pause_and_start_record_who_asked_and_refuse_in_one_line_what_makes_no_sense():
    clock = Clock()
    job = decide(decide(submit(clock), AgentSlotAwaited(), clock), AgentSlotTaken(), clock)
    with pytest.raises(CommandRefused, match=r"^job J is planning, neither paused nor queued: nothing to start$"):
        domain.decide(job, Start(by=ALICE))
    job = decide(job, Pause(by=ALICE), clock)
    assert (domain.shown_status(job), job.paused_by) == ("paused", ALICE)
    with pytest.raises(CommandRefused, match=r"already paused \(by alice \(operator\)\); 'numerusctl start J'"):
        domain.decide(job, Pause(by="bob (operator)"))
    (event,) = domain.decide(job, Start(by="bob (operator)"))
    assert type(event[1]).__name__ == "JobUnpaused" and event[1].by == "bob (operator)"
    job = decide(job, Start(by="bob (operator)"), clock)
    assert (domain.shown_status(job), job.paused_by) == ("planning", None)


def test_a_paused_job_keeps_the_step_it_is_at_and_moves_on_as_its_agents_finish():
    clock = Clock()
    job = decide(decide(submit(clock), AgentSlotAwaited(), clock), AgentSlotTaken(), clock)
    job = decide(job, Pause(by=ALICE), clock)
    plan = Plan(summary="s", tasks=(PlannedTask(id="t1", title="T1", instructions="do"),))
    job = decide(job, PlanAnswered(role="planner", attempt=1, plan=plan, plan_hash="h"), clock)
    assert (job.status, domain.shown_status(job)) == ("running", "paused")
    assert domain.decide(job, Stalled(idle_s=60)) == []  # waiting for the user is no stall: no queen asked
    job = decide(job, Start(by=ALICE), clock)
    assert domain.shown_status(job) == "running"


def test_ended_and_killed_jobs_refuse_pause_and_start():
    clock = Clock()
    job = decide(submit(clock, plan=False), Kill(), clock)
    assert job.status == "killed"
    for message in (Pause(by=ALICE), Start(by=ALICE)):
        with pytest.raises(CommandRefused, match=r"^job J is already killed; nothing to (pause|start)$"):
            domain.decide(job, message)
    planning = decide(decide(submit(clock, "K"), AgentSlotAwaited(), clock), AgentSlotTaken(), clock)
    planning = decide(planning, Kill(), clock)
    assert planning.status == "planning" and planning.kill_requested  # its planner is being stopped
    with pytest.raises(CommandRefused, match=r"^job K is being killed; nothing to pause$"):
        domain.decide(planning, Pause(by=ALICE))


def test_a_kill_ends_a_planned_job_still_in_the_queue_at_once():
    clock = Clock()
    job = decide(decide(submit(clock), AgentSlotAwaited(), clock), Kill(), clock)
    assert domain.shown_status(job) == "killed"


def test_positions_go_by_front_then_priority_then_submission_and_skip_paused_and_ended_jobs():
    clock = Clock()
    jobs = {}
    for job_id, priority in (("A", 0), ("B", 0), ("C", 5), ("D", -3), ("E", 0)):
        jobs[job_id] = decide(submit(clock, job_id, priority=priority), AgentSlotAwaited(), clock)
    order = lambda: [job.id for job in domain.queue_order(jobs.values())]  # noqa: E731
    assert order() == ["C", "A", "B", "E", "D"]
    jobs["E"] = decide(jobs["E"], Start(by=ALICE), clock)  # to the front
    jobs["B"] = decide(jobs["B"], Start(by=ALICE), clock)  # to the front, ahead of E: the latest moved first
    assert order() == ["B", "E", "C", "A", "D"]
    jobs["C"] = decide(jobs["C"], Pause(by=ALICE), clock)
    jobs["A"] = decide(jobs["A"], Kill(), clock)
    assert order() == ["B", "E", "D"]
    jobs["B"] = decide(jobs["B"], AgentSlotTaken(), clock)  # out of the queue: its promotion is spent
    assert order() == ["E", "D"] and jobs["B"].promoted is None


def test_an_interrupted_queued_job_shows_interrupted_not_queued():
    clock = Clock()
    job = decide(decide(submit(clock), AgentSlotAwaited(), clock), Interrupted(reason="numerusd stopped"), clock)
    assert domain.shown_status(job) == "interrupted"
    assert domain.queue_order([job]) == []


# --- the pool ---------------------------------------------------------------------------------------------------


class Book:
    """The job book's two seams the pool uses (`jobs`, `decide`), over the real domain, without a store."""

    def __init__(self, *job_ids: str) -> None:
        self.clock = Clock()
        self.jobs = {job_id: submit(self.clock, job_id) for job_id in job_ids}

    def tell(self, job_id: str, message: object) -> None:
        self.jobs[job_id] = decide(self.jobs[job_id], message, self.clock)

    async def decide(self, job_id: str, message: object) -> list[object]:
        self.tell(job_id, message)
        return []


async def holding(pool: AgentPool, job_id: str, release: asyncio.Event, got: list[str]) -> None:
    """One agent of `job_id`: takes a slot (noted in `got`), holds it until `release` is set."""
    async with pool.seat(job_id).taken():
        got.append(job_id)
        await release.wait()


async def test_a_freed_slot_goes_to_the_job_holding_fewer_then_the_older_and_never_to_a_paused_one():
    book = Book("big", "small", "later")
    pool = AgentPool(2, book)  # type: ignore[arg-type]
    got: list[str] = []
    releases = {name: asyncio.Event() for name in ("big1", "big2", "big3", "small", "later")}
    tasks = [asyncio.create_task(holding(pool, "big", releases[f"big{n}"], got)) for n in (1, 2)]
    await eventually(lambda: got == ["big", "big"])
    tasks.append(asyncio.create_task(holding(pool, "small", releases["small"], got)))
    await eventually(lambda: pool.waiting() == 1)
    assert book.jobs["small"].queued and not book.jobs["big"].queued  # its first agent waits: the job is queued
    tasks.append(asyncio.create_task(holding(pool, "big", releases["big3"], got)))
    tasks.append(asyncio.create_task(holding(pool, "later", releases["later"], got)))
    await eventually(lambda: pool.waiting() == 3)
    book.tell("later", Pause(by=ALICE))
    releases["big1"].set()  # big holds 1 now, small none: small goes first although big asked before it
    await eventually(lambda: len(got) == 3)
    assert got[-1] == "small" and not book.jobs["small"].queued
    releases["small"].set()  # big (1 held) and later (paused): big
    await eventually(lambda: len(got) == 4)
    assert got[-1] == "big"
    releases["big2"].set()
    await eventually(lambda: pool.busy == 1)
    assert pool.waiting("later") == 1  # a free slot, and the paused job does not take it
    book.tell("later", Start(by=ALICE))
    pool.reconsider()
    await eventually(lambda: len(got) == 5)
    assert got[-1] == "later"
    for release in releases.values():
        release.set()
    await asyncio.gather(*tasks)
    assert pool.busy == 0 and not pool.held


async def test_a_job_killed_in_the_queue_leaves_it_and_a_cancelled_waiter_gives_its_place_up():
    book = Book("first", "killed", "cancelled", "last")
    pool = AgentPool(1, book)  # type: ignore[arg-type]
    got: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(holding(pool, "first", release, got))
    await eventually(lambda: got == ["first"])
    killed = asyncio.create_task(holding(pool, "killed", asyncio.Event(), got))
    cancelled = asyncio.create_task(holding(pool, "cancelled", asyncio.Event(), got))
    last = asyncio.create_task(holding(pool, "last", release, got))
    await eventually(lambda: pool.waiting() == 3)
    book.tell("killed", Kill())
    assert book.jobs["killed"].status == "killed"  # a planned job killed in the queue ends at once
    pool.reconsider()
    with pytest.raises(Withdrawn):
        await killed
    cancelled.cancel()
    release.set()
    await asyncio.gather(first, last)
    assert cancelled.cancelled()
    assert got == ["first", "last"] and pool.busy == 0


# --- a real daemon ----------------------------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon of at most 2 agents whose `gated` agent works until the test writes `go-<its goal>` beside its
    scenario (a directory its sandbox binds), and whose `fast` one answers at once."""
    gates = tmp_path / "state-scenarios"
    gated = [{"say": "waiting"}, {"run": f"while [ ! -e {gates}/go-{{prompt}} ]; do sleep 0.05; done"}]
    d = Daemon(tmp_path / "state", agents={"gated": gated}, config="max_agents = 2\n")
    assert d.scenarios_dir == gates
    yield d.start()
    d.stop()


def go(daemon: Daemon, goal: str) -> None:
    """Let the gated agent working on `goal` end."""
    (daemon.scenarios_dir / f"go-{goal}").write_text("")


def submit_gated(daemon: Daemon, repo: Path, goal: str, *flags: str) -> str:
    result = daemon.ctl("run", "--no-plan", goal, "--repo", str(repo), "--agent", "gated", *flags, check=True)
    return result.stdout.strip()


async def types(client: DaemonClient, job: str) -> list[str]:
    return [event["type"] for event in await client.events(job)]


async def until(client: DaemonClient, job: str, status: str) -> dict:
    """Wait until `status JOB` says `status`; the job's view then."""
    return await client.wait_for(job, lambda view: view["status"] == status)


async def test_the_third_job_waits_queued_with_its_position_and_starts_when_a_slot_frees(daemon, tmp_path):
    async with daemon.client() as client:
        repos = [git_repo(tmp_path / name) for name in ("a", "b", "c")]
        a, b = (submit_gated(daemon, repo, repo.name) for repo in repos[:2])
        await until(client, a, "running")
        await until(client, b, "running")
        c = submit_gated(daemon, repos[2], "c")
        view = await until(client, c, "queued")
        assert (view["queue_position"], view["queue_length"]) == (1, 1)
        assert re.search(r"^status\s+queued \(1st of 1\)$", daemon.ctl("status", c, check=True).stdout, re.M)
        listed = daemon.ctl("status", check=True).stdout
        assert "1 job queued for an agent slot" in listed and re.search(rf"^{c}\s+queued 1/1\s", listed, re.M)
        assert "TaskStarted" not in await types(client, c)
        go(daemon, "a")
        await until(client, a, "completed")
        await until(client, c, "running")
        assert daemon.ctl_json("status")["queued"] == 0
        go(daemon, "b")
        go(daemon, "c")
        await until(client, c, "completed")
        assert (await types(client, c))[:4] == ["JobSubmitted", "TaskCreated", "JobQueued", "JobStarted"]
        assert "JobQueued" not in await types(client, a)  # a job that never waited says nothing of a queue


async def test_more_agent_slots_taken_on_sighup_start_the_queued_job_at_once(daemon, tmp_path):
    async with daemon.client() as client:
        repos = [git_repo(tmp_path / name) for name in ("a", "b", "c")]
        a, b = (submit_gated(daemon, repo, repo.name) for repo in repos[:2])
        await until(client, a, "running")
        await until(client, b, "running")
        c = submit_gated(daemon, repos[2], "c")
        await until(client, c, "queued")
        toml = daemon.state_dir / "numerus.toml"
        toml.write_text(toml.read_text().replace("max_agents = 2", "max_agents = 3"))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)  # our own daemon, by its pid
        await until(client, c, "running")  # no slot was freed: the third is the reload's
        for goal in ("a", "b", "c"):
            go(daemon, goal)
        for job in (a, b, c):
            await until(client, job, "completed")


async def test_a_later_job_of_higher_priority_goes_first(daemon, tmp_path):
    async with daemon.client() as client:
        repos = {name: git_repo(tmp_path / name) for name in ("a", "b", "low", "high")}
        _, b = (submit_gated(daemon, repos[name], name) for name in ("a", "b"))
        await until(client, b, "running")
        low = submit_gated(daemon, repos["low"], "low")
        await until(client, low, "queued")
        high = submit_gated(daemon, repos["high"], "high", "--priority", "5")
        view = await until(client, high, "queued")
        assert (view["queue_position"], view["queue_length"], view["priority"]) == (1, 2, 5)
        assert re.search(r"^status\s+queued \(2nd of 2\)$", daemon.ctl("status", low, check=True).stdout, re.M)
        go(daemon, "a")
        await until(client, high, "running")
        assert daemon.status(low)["status"] == "queued"
        for name in ("b", "low", "high"):
            go(daemon, name)
        await until(client, low, "completed")


async def test_pause_keeps_a_job_from_new_agents_and_start_lets_it_go_on(daemon, tmp_path):
    async with daemon.client() as client:
        repos = {name: git_repo(tmp_path / name) for name in ("a", "b", "paused", "after")}
        _, b = (submit_gated(daemon, repos[name], name) for name in ("a", "b"))
        await until(client, b, "running")
        paused = submit_gated(daemon, repos["paused"], "paused")
        await until(client, paused, "queued")
        after = submit_gated(daemon, repos["after"], "after")  # queued behind it
        result = daemon.ctl("pause", paused[-6:], check=True)
        assert result.stdout.startswith(f"job {paused}: paused by ") and "(operator)" in result.stdout
        view = await until(client, paused, "paused")
        assert view["paused_by"].endswith("(operator)") and view["queue_position"] is None
        assert daemon.ctl_json("status", after)["jobs"][0]["queue_position"] == 1  # the paused job holds no place
        refused = daemon.ctl("pause", paused)
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
        assert "already paused" in refused.stderr
        go(daemon, "a")  # the freed slot goes past the paused job, to the one queued behind it
        await until(client, after, "running")
        assert "TaskStarted" not in await types(client, paused)
        result = daemon.ctl("start", paused, check=True)
        assert result.stdout.startswith(f"job {paused}: goes on (started by ")
        go(daemon, "b")  # now the paused job takes the next free slot
        await until(client, paused, "running")
        events = daemon.events(paused)
        (pause,) = [e for e in events if e["type"] == "JobPaused"]
        (unpause,) = [e for e in events if e["type"] == "JobUnpaused"]
        assert pause["data"]["by"] == unpause["data"]["by"] and pause["data"]["by"].endswith("(operator)")
        for name in ("paused", "after"):
            go(daemon, name)
        await until(client, after, "completed")
        await until(client, paused, "completed")


async def test_a_job_killed_in_the_queue_ends_at_once_without_running_an_agent(daemon, tmp_path):
    async with daemon.client() as client:
        repos = {name: git_repo(tmp_path / name) for name in ("a", "b", "planned")}
        _, b = (submit_gated(daemon, repos[name], name) for name in ("a", "b"))
        await until(client, b, "running")
        args = ("run", "never planned", "--repo", str(repos["planned"]), "--agent", "gated")
        planned = daemon.ctl(*args, check=True).stdout.strip()
        await until(client, planned, "queued")
        daemon.ctl("kill", planned, check=True)
        await until(client, planned, "killed")
        go(daemon, "a")
        go(daemon, "b")
        await until(client, b, "completed")
        assert not [line for line in daemon.stderr().splitlines() if "Traceback" in line]
        kinds = await types(client, planned)
        assert kinds[-2:] == ["KillRequested", "JobKilled"] and "PlanValidated" not in kinds
        assert "JobStarted" not in kinds  # it never got a slot


PLAN = {
    "summary": "two steps",
    "tasks": [
        {"id": "t1", "title": "One", "instructions": "one", "intents": [{"path": "ONE.md", "mode": "create"}]},
        {
            "id": "t2",
            "title": "Two",
            "instructions": "two",
            "deps": ["t1"],
            "intents": [{"path": "TWO.md", "mode": "create"}],
        },
    ],
}


async def test_a_paused_running_job_lets_its_agent_finish_and_starts_no_new_one_until_started(tmp_path):
    gates = tmp_path / "state-scenarios"
    scenario = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": PLAN}]},
            {
                "match": {"role": "executor", "task": "t1"},
                "steps": [
                    {"run": f"while [ ! -e {gates}/go-t1 ]; do sleep 0.05; done"},
                    {"write": "ONE.md", "content": "1\n"},
                ],
            },
            {"match": {"role": "executor", "task": "t2"}, "steps": [{"write": "TWO.md", "content": "2\n"}]},
        ]
    }
    with Daemon(tmp_path / "state", agents={"team": scenario}, config="max_agents = 2\n").start() as daemon:
        repo = git_repo(tmp_path / "repo")
        args = ("run", "two steps", "--repo", str(repo), "--agent", "team", "--claims", "plan", "--no-review")
        job = daemon.ctl(*args, check=True).stdout.strip()
        async with daemon.client() as client:
            await client.wait_for(job, lambda view: [t["status"] for t in view["tasks"]][:1] == ["running"])
            daemon.ctl("pause", job, check=True)
            go(daemon, "t1")  # its agent finishes its step: t1 merges
            await client.wait_for(job, lambda view: view["tasks"][0]["status"] == "completed")
            waits = f"job {job}: an agent waits for a slot (paused by"
            await eventually(lambda: waits in daemon.stderr(), timeout=30, interval=0.1)
            view = await client.status(job)
            assert view["status"] == "paused"
            assert [task["status"] for task in view["tasks"]] == ["completed", "granted"]  # no agent for t2
            daemon.ctl("start", job, check=True)
            assert (await until(client, job, "completed"))["tasks_done"] == 2


# --- the hostile side -------------------------------------------------------------------------------------------


def test_a_viewer_cannot_pause_or_start_and_bogus_priorities_are_refused_in_one_line(daemon, tmp_path):
    repo = git_repo(tmp_path / "repo")
    job = submit_gated(daemon, repo, "x")
    for verb in ("pause", "start"):
        result = daemon.ctl("--role", "viewer", verb, job)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "JobPaused" not in [event["type"] for event in daemon.events(job)]
    for priority in ("1001", "-1001", "99999999999999999999999", "1.5", "high"):
        result = daemon.ctl("run", "--no-plan", "y", "--repo", str(repo), "--priority", priority)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    go(daemon, "x")


async def test_a_client_sending_a_bogus_priority_itself_is_refused_and_nothing_is_queued_ahead(daemon, tmp_path):
    repo = git_repo(tmp_path / "repo")
    async with daemon.client() as client:
        for priority in (1001, -(10**6), 10**30, True, "1", 1.0):
            body = json.dumps({"goal": "g", "repo": str(repo), "plan": False, "priority": priority}).encode()
            reply = await client._nc.request("numerus.cmd.run", body, timeout=10)
            assert reply.headers and reply.headers.get("Nats-Service-Error-Code"), (priority, reply.data)
            message = json.loads(reply.data)["message"]
            assert "\n" not in message and "priority" in message, message
    assert daemon.ctl_json("status")["jobs"] == []
    assert daemon.alive


def test_the_views_show_what_status_shows_so_a_rebuild_does_too():
    clock = Clock()
    queued = decide(submit(clock), AgentSlotAwaited(), clock)
    paused = decide(queued, Pause(by=ALICE), clock)
    for job, shown in ((queued, "queued"), (paused, "paused")):
        row = job_row(job)
        assert row[4] == shown == domain.job_view(job).status
        assert msgspec.json.decode(row[-1], type=domain.JobState) == job  # the whole state, flags and all
