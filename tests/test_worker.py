"""`numerusd worker` as a process, against a real nats-server, with the test playing the daemon's side.

The test makes what the daemon makes (the work-queue stream NUMERUS_WORK and a pool's durable consumer, the bundle
bucket and a job's base bundle), publishes a `WorkOffer`, and answers the worker's take, report and heartbeat
requests with plain nats-py (numerusd/protocol/work.py). The agent is the scripted one, playing a scenario file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.object_store import ObjectStore

from numerusd import bundles
from numerusd.embedded_nats import EmbeddedNats
from numerusd.protocol import work
from numerusd.protocol.connection import ConnectionInfo, encode_connection
from tests.conftest import eventually, restartable
from tests.daemon_harness import BIN, git, git_repo, write_scenario

JOB = "01JWORKERTESTJOB0000000000"
POOL = "gpu"
NAME = "w1"


@dataclass
class FakeDaemon:
    """The daemon's side of the protocol, as the test plays it: what the worker asked, and what it is answered."""

    nc: Client
    store: ObjectStore
    repo: Path
    base: str = ""
    #: Whether a Take is granted.
    grant: bool = True
    takes: list[work.Take] = field(default_factory=list)
    heartbeats: list[work.Heartbeat] = field(default_factory=list)
    #: Every report, in the order it came, by lease.
    reports: dict[str, list[work.Report]] = field(default_factory=dict)
    #: Leases the next heartbeat replies cancel.
    cancel: set[str] = field(default_factory=set)
    #: Leases whose reports are refused (`ok = False`: a stale lease).
    stale: set[str] = field(default_factory=set)
    #: Reports (lease, seq) left unanswered the first time they come, as if the daemon were restarting.
    unanswered: set[tuple[str, int]] = field(default_factory=set)

    async def answer(self, msg: Msg) -> None:
        kind = work.worker_request(msg.subject)
        assert kind is not None and kind[0] == NAME, msg.subject
        if kind[1] == "take":
            self.takes.append(msgspec.json.decode(msg.data, type=work.Take))
            await msg.respond(work.encoder.encode(work.TakeReply(ok=self.grant, reason="" if self.grant else "taken")))
        elif kind[1] == "report":
            report = msgspec.json.decode(msg.data, type=work.Report)
            self.reports.setdefault(report.lease, []).append(report)
            if (report.lease, report.seq) in self.unanswered:
                self.unanswered.discard((report.lease, report.seq))
                return
            ok = report.lease not in self.stale
            await msg.respond(work.encoder.encode(work.ReportReply(ok=ok, reason="" if ok else "stale lease")))
        elif kind[1] == "heartbeat":
            self.heartbeats.append(msgspec.json.decode(msg.data, type=work.Heartbeat))
            await msg.respond(work.encoder.encode(work.HeartbeatReply(cancel=tuple(self.cancel))))

    def bodies(self, lease: str) -> list[work.ReportBody]:
        return [report.body for report in self.reports.get(lease, [])]

    def output(self, lease: str) -> bytes:
        return b"".join(body.data for body in self.bodies(lease) if isinstance(body, work.Output))

    def ended(self, lease: str) -> bool:
        return any(isinstance(body, work.Finished | work.HandedBack) for body in self.bodies(lease))

    async def offer(self, task: str, attempt: int = 1, agent: str = "scripted", **more: object) -> work.WorkOffer:
        """Publish an offer of `task` on the pool, based on the repository's HEAD."""
        names = await bundles.offer_base(self.store, self.repo, JOB, self.base, self.base)
        offer = work.WorkOffer(
            job=JOB,
            task=task,
            attempt=attempt,
            lease=f"lease-{task}-{attempt}",
            pool=POOL,
            agent=agent,
            prompt=f"Numerus role: executor · job {JOB} · task {task} · attempt {attempt}\nDo {task}.",
            base_sha=self.base,
            bundles=names,
            branch=f"numerus/{JOB}/{task}",
            commit_message=f"{task}: the work\n\nNumerus job {JOB}",
            result_object=bundles.result_object(JOB, task, attempt),
            **more,  # type: ignore[arg-type]
        )
        await self.nc.jetstream().publish(work.work_subject(POOL), work.encoder.encode(offer))
        return offer


@pytest.fixture
async def daemon(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[FakeDaemon]:
    """The stream, the pool's consumer, the bucket and a repository, as the daemon makes them; answering."""
    nc = await nats.connect(nats_server.url, user=nats_server.user, password=nats_server.password)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=work.WORK_STREAM, subjects=list(work.WORK_SUBJECTS), retention=RetentionPolicy.WORK_QUEUE)
    )
    await js.add_consumer(
        work.WORK_STREAM,
        ConsumerConfig(
            durable_name=work.pool_consumer(POOL),
            filter_subject=work.work_subject(POOL),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
        ),
    )
    store = await bundles.ensure_bucket(js)
    repo = git_repo(tmp_path / "repo")
    fake = FakeDaemon(nc=nc, store=store, repo=repo, base=git(repo, "rev-parse", "HEAD").strip())
    await nc.subscribe(work.WORKER_REQUESTS, cb=fake.answer)
    yield fake
    await nc.close()


@dataclass
class WorkerProcess:
    """A `numerusd worker` process, stopped by its pid."""

    process: subprocess.Popen[bytes]
    log: Path
    dir: Path
    connection: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the worker and wait for it to exit (the test's daemon side answering meanwhile); its exit code."""
        self.process.send_signal(sig)
        await eventually(lambda: self.process.poll() is not None, timeout=timeout)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def start_worker(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Callable[..., WorkerProcess]]:
    """Start `numerusd worker` with one scripted profile (`scripted`) playing `steps` (its sandbox binding `binds`
    writable too); stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(steps: list[dict], *args: str, binds: tuple[Path, ...] = ()) -> WorkerProcess:
        scenarios = tmp_path / "scenarios"
        scenarios.mkdir(exist_ok=True)
        scenario = write_scenario(scenarios / "executor.json", steps)
        config = tmp_path / "worker.toml"
        config.write_text(
            "[agents.scripted]\n"
            'kind = "scripted"\n'
            f"env = {{ NUMERUS_SCENARIO = {json.dumps(str(scenario))} }}\n"
            f"binds = {json.dumps([str(scenarios), *map(str, binds)])}\n"
        )
        connection = tmp_path / "worker.json"
        info = ConnectionInfo(url=nats_server.url, user=nats_server.user, password=nats_server.password)
        connection.write_bytes(encode_connection(info))
        connection.chmod(0o600)
        log = tmp_path / "worker.log"
        argv = [
            str(BIN / "numerusd"), "--log-level", "debug", "worker", "--name", NAME, "--pool", POOL,
            "--slots", "2", "--dir", str(tmp_path / "worker"), "--connection", str(connection),
            "--config", str(config), "--heartbeat-s", "0.2", *args,
        ]  # fmt: skip
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out)
        worker = WorkerProcess(process, log, tmp_path / "worker", connection)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


async def test_a_worker_runs_an_offer_and_sends_its_work_back(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]
) -> None:
    # Its second pool has no consumer (no daemon made it yet): waited for quietly, while the first one serves.
    worker = start_worker(
        [
            {"say": "writing HELLO.md for {task}"},
            {"write": "HELLO.md", "content": "# Hello from the worker\n"},
            {"usage": {"input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 5}},
        ],
        "--pool",
        "cpu",
    )
    # An offer that is not one comes first: dropped, and the next one is taken.
    await daemon.nc.jetstream().publish(work.work_subject(POOL), b'{"job": 1}')
    offer = await daemon.offer("t1", checks=("test -f HELLO.md", "grep -q Hello HELLO.md", "false", "true"))
    await eventually(lambda: daemon.ended(offer.lease), timeout=30)

    reports = daemon.reports[offer.lease]
    assert [report.seq for report in reports] == list(range(1, len(reports) + 1))
    kinds = [type(report.body).__name__ for report in reports]
    assert kinds[0] == "Started" and kinds[-2:] == ["Exited", "Finished"], kinds
    assert set(kinds[1:-2]) == {"Output"}, kinds
    started = reports[0].body
    assert isinstance(started, work.Started) and started.pid > 0 and started.start_ticks > 0
    assert b"writing HELLO.md for t1" in daemon.output(offer.lease)
    exited, finished = reports[-2].body, reports[-1].body
    assert exited == work.Exited(exit_code=0, signal=None)
    assert isinstance(finished, work.Finished) and finished.commit is not None and finished.error is None
    # The checks ran in order, up to the first that failed.
    assert [(check.command, check.exit_code) for check in finished.checks] == [
        ("test -f HELLO.md", 0),
        ("grep -q Hello HELLO.md", 0),
        ("false", 1),
    ]
    # The result is the agent's file, committed on the base as Numerus's agent, and fetches into the repository.
    await bundles.receive_result(daemon.store, daemon.repo, offer.result_object, daemon.base, finished.commit)
    assert git(daemon.repo, "show", f"{finished.commit}:HELLO.md") == "# Hello from the worker\n"
    assert git(daemon.repo, "log", "-1", "--format=%an <%ae>|%P|%s", finished.commit) == (
        f"Numerus agent <agent@numerus.invalid>|{daemon.base}|t1: the work\n"
    )
    assert daemon.takes == [work.Take(lease=offer.lease, job=JOB, task="t1", attempt=1, host=os.uname().nodename)]
    # Its worktree is gone, the job's cache kept; it heart-beats its pool and capacity.
    assert not (worker.dir / "work" / JOB / "t1").exists()
    assert (worker.dir / "repos" / f"{JOB}.git" / "HEAD").is_file()
    assert "dropped an offer that does not decode" in worker.stderr()
    beat = daemon.heartbeats[-1]
    assert (beat.pools, beat.capacity, beat.draining) == ((POOL, "cpu"), 2, False)
    assert await worker.stop() == 0
    assert worker.stderr().count("pool cpu: cannot take from consumer pool-cpu") == 1, worker.stderr()
    assert "heartbeat not answered" not in worker.stderr()


async def test_an_agent_that_leaves_nothing_and_a_profile_the_worker_lacks(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker([{"say": "nothing to do"}])
    idle = await daemon.offer("t1")
    missing = await daemon.offer("t2", agent="gpt-nine")
    await eventually(lambda: daemon.ended(idle.lease) and daemon.ended(missing.lease), timeout=30)
    assert daemon.bodies(idle.lease)[-2:] == [work.Exited(exit_code=0, signal=None), work.Finished(commit=None)]
    reason = f"worker {NAME} has no agent profile gpt-nine"
    assert daemon.bodies(missing.lease) == [work.SpawnFailed(reason=reason), work.Finished(commit=None, error=reason)]


async def test_a_refused_take_runs_nothing(daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]) -> None:
    daemon.grant = False
    worker = start_worker([{"write": "HELLO.md", "content": "never\n"}])
    offer = await daemon.offer("t1")
    await eventually(lambda: len(daemon.takes) == 1, timeout=20)
    beats = len(daemon.heartbeats)
    await eventually(lambda: len(daemon.heartbeats) >= beats + 3, timeout=10)  # a few heartbeats later
    assert offer.lease not in daemon.reports
    assert all(beat.leases == () for beat in daemon.heartbeats)
    assert not (worker.dir / "work" / JOB / "t1").exists()
    # The offer was acknowledged: no worker is offered it again.
    info = await daemon.nc.jetstream().consumer_info(work.WORK_STREAM, work.pool_consumer(POOL))
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert len(daemon.takes) == 1


async def test_a_heartbeat_reply_cancelling_the_lease_stops_the_agent(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker([{"say": "working on it"}, {"sleep": 60}, {"write": "LATE.md", "content": "too late\n"}])
    offer = await daemon.offer("t1")
    await eventually(lambda: b"working on it" in daemon.output(offer.lease), timeout=30)
    await eventually(lambda: offer.lease in daemon.heartbeats[-1].leases, timeout=5)
    daemon.cancel.add(offer.lease)
    await eventually(lambda: daemon.ended(offer.lease), timeout=15)
    exited, finished = daemon.bodies(offer.lease)[-2:]
    assert isinstance(exited, work.Exited) and exited.exit_code != 0
    assert finished == work.Finished(commit=None, error="cancelled by the daemon")
    await eventually(lambda: offer.lease not in daemon.heartbeats[-1].leases, timeout=5)


async def test_a_report_refused_stops_the_agent_and_one_unanswered_is_sent_again(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker([{"say": "working on it"}, {"sleep": 60}])
    daemon.stale.add("lease-t1-1")  # a lease the daemon no longer knows: its first report is refused
    daemon.unanswered.add(("lease-t2-1", 2))
    refused = await daemon.offer("t1")
    resent = await daemon.offer("t2")
    await eventually(lambda: "lease-t1-1" in daemon.reports, timeout=30)
    started = daemon.bodies(refused.lease)[0]
    assert isinstance(started, work.Started)
    # The agent is stopped at once, nothing more is reported, and the lease is no longer heart-beaten.
    await eventually(lambda: not Path(f"/proc/{started.pid}").exists(), timeout=10)
    await eventually(lambda: refused.lease not in daemon.heartbeats[-1].leases, timeout=5)
    assert [type(body) for body in daemon.bodies(refused.lease)] == [work.Started]
    assert "given up: the daemon refused report 1: stale lease" in worker.stderr()
    # The report left unanswered came again, the same (seq 2), and the attempt went on.
    await eventually(lambda: len(daemon.reports.get(resent.lease, [])) >= 3, timeout=20)
    first, again = daemon.reports[resent.lease][1:3]
    assert first == again and first.seq == 2 and isinstance(first.body, work.Output)
    daemon.cancel.add(resent.lease)
    await eventually(lambda: daemon.ended(resent.lease), timeout=15)


async def test_a_worker_outlives_its_bus(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess], nats_server: EmbeddedNats
) -> None:
    worker = start_worker([{"write": "HELLO.md", "content": "after the outage\n"}])
    await eventually(lambda: len(daemon.heartbeats) > 0, timeout=20)
    with restartable(nats_server) as (stop, start):
        await stop()
        await eventually(lambda: "NATS: disconnected" in worker.stderr(), timeout=10)
        await start()
        await eventually(lambda: daemon.nc.is_connected, timeout=20)
        offer = await daemon.offer("t1")
        await eventually(lambda: daemon.ended(offer.lease), timeout=30)
        finished = daemon.bodies(offer.lease)[-1]
        assert isinstance(finished, work.Finished) and finished.commit is not None
        assert await worker.stop() == 0


async def test_sigterm_hands_back_what_runs_longer_than_the_drain(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker([{"say": "working on it"}, {"sleep": 60}], "--drain-s", "0.5")
    offer = await daemon.offer("t1")
    await eventually(lambda: b"working on it" in daemon.output(offer.lease), timeout=30)
    assert await worker.stop(signal.SIGTERM, timeout=20) == 0, worker.stderr()
    assert daemon.bodies(offer.lease)[-1] == work.HandedBack(reason=f"worker {NAME} is shutting down")
    assert not any(isinstance(body, work.Exited | work.Finished) for body in daemon.bodies(offer.lease))
    assert any(beat.draining for beat in daemon.heartbeats)
    assert not (worker.dir / "work" / JOB / "t1").exists()


async def test_a_hostile_agent_sees_none_of_the_worker_and_cannot_hurt_it(
    daemon: FakeDaemon, start_worker: Callable[..., WorkerProcess], nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The agent reads the connection file, the worker's configuration and directory (another job's cache), prints
    the bus password it was somehow told, and floods its terminal with 3 MB of binary without a newline: it reads
    nothing of the worker's, the password is redacted, and the worker carries on and sends its work back.

    Its profile binds the whole test directory (where the worker's files lie): only the worker's hiding of its own
    files keeps them from the agent, not the sandbox's private /tmp."""
    other = tmp_path / "worker" / "repos" / "01JOTHERJOB000000000000000.git"
    other.mkdir(parents=True)
    (other / "SECRET").write_text("another job's secret\n")
    (tmp_path / "VISIBLE").write_text("the test directory is bound\n")
    steps = [
        {"run": f"cat {tmp_path}/VISIBLE {tmp_path}/worker.json {tmp_path}/worker.toml; ls {tmp_path}/worker/repos"},
        {"run": f"cat {other}/SECRET"},
        {"print": f"the password is {nats_server.password}"},
        {"run": "head -c 3000000 /dev/urandom > /dev/tty; echo flooded"},
        {"write": "HELLO.md", "content": "still here\n"},
    ]
    start_worker(steps, binds=(tmp_path,))
    offer = await daemon.offer("t1")
    await eventually(lambda: daemon.ended(offer.lease), timeout=60)
    output = daemon.output(offer.lease)
    assert b"the test directory is bound" in output  # what is not the worker's is there, so the rest is hidden
    assert nats_server.password.encode() not in output
    assert b"the password is [REDACTED:nats_password]" in output
    assert nats_server.url.encode() not in output and b"NUMERUS_SCENARIO" not in output  # neither file was read
    assert b"another job's secret" not in output and b"No such file or directory" in output
    assert f"ls {tmp_path}/worker/repos".encode() in output and b"01JOTHERJOB000000000000000.git\\n" not in output
    assert len(output) > 3_000_000 and b"flooded" in output
    finished = daemon.bodies(offer.lease)[-1]
    assert isinstance(finished, work.Finished) and finished.commit is not None
