"""The workers' bus user, against a real daemon and its embedded server: worker.json (0600) logs `numerusd worker`
in as `worker`, which may do what a worker does (pull an offer of a pool, acknowledge it, get and put git bundles,
ask the daemon) and is refused by the NATS server everything else: no event, log chunk, dead letter, snapshot,
command, lease or offer published, no stream or consumer created, deleted, purged or updated, no message deleted,
no other stream read, no subscription outside its own inbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.client import JetStreamContext

from numerusd.bus_roles import WORKER_ROLE
from numerusd.embedded_nats import EmbeddedNats
from numerusd.lease import BUCKET as LEASE_BUCKET
from numerusd.protocol import work
from numerusd.protocol.connection import inbox_prefix
from numerusd.protocol.subjects import CHECKPOINT, DLQ, EVENTS, LOGS, SNAPSHOTS, command, job_event
from tests.daemon_harness import Daemon, refused

pytestmark = pytest.mark.slow  # one real daemon for the module

POOL = "roles"
OBJ_STREAM = f"OBJ_{work.BUNDLES_BUCKET}"
#: Larger than the daemon's chunks and than what the ordered consumer of a get receives before its flow control.
BASE_BUNDLE = os.urandom(3 * 1024 * 1024)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on its embedded server; once stopped, its worker.json (whose passwords died with it) is gone."""
    daemon = Daemon(tmp_path_factory.mktemp("workers") / "state").start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0
    assert not (daemon.state_dir / "worker.json").exists()


def worker_file(daemon: Daemon) -> dict:
    return json.loads((daemon.state_dir / "worker.json").read_text())


async def as_daemon(daemon: Daemon) -> Client:
    own = daemon.connection()
    return await nats.connect(own["url"], user=own["user"], password=own["password"])


async def as_worker(daemon: Daemon, refusals: list[str]) -> Client:
    """Logged in as worker.json says, as `numerusd worker` does: its own inbox prefix, refusals recorded."""

    async def record(error: Exception) -> None:
        if "permissions violation" in str(error).lower():
            refusals.append(str(error))

    info = worker_file(daemon)
    return await nats.connect(
        info["url"],
        user=info["user"],
        password=info["password"],
        error_cb=record,
        inbox_prefix=inbox_prefix(WORKER_ROLE),
    )


async def offer_work(js: JetStreamContext, base: str) -> work.WorkOffer:
    """What the daemon's side does for a pool (made here where missing, as the daemon makes them): the work stream,
    the pool's durable consumer, the bundles' bucket with the task's base in it; then one offer."""
    with contextlib.suppress(nats.js.errors.BadRequestError):  # the daemon's own, if it made it already
        await js.add_stream(
            StreamConfig(name=work.WORK_STREAM, subjects=list(work.WORK_SUBJECTS), retention=RetentionPolicy.WORK_QUEUE)
        )
    await js.add_consumer(
        work.WORK_STREAM,
        ConsumerConfig(
            durable_name=work.pool_consumer(POOL), filter_subject=work.work_subject(POOL), ack_policy=AckPolicy.EXPLICIT
        ),
    )
    try:
        bundles = await js.object_store(work.BUNDLES_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        bundles = await js.create_object_store(work.BUNDLES_BUCKET)
    await bundles.put(base, BASE_BUNDLE)
    offer = work.WorkOffer(
        job="01JWORKERROLEJOB0000000000",
        task="t1",
        attempt=1,
        lease="lease-" + os.urandom(8).hex(),
        pool=POOL,
        agent="codex",
        prompt="Do the task",
        base_sha="0" * 40,
        bundles=(base,),
        branch="numerus/t1",
        commit_message="t1",
        result_object=f"result-{os.urandom(4).hex()}",
    )
    await js.publish(work.work_subject(POOL), work.encoder.encode(offer))
    return offer


@pytest.fixture
async def admin(daemon: Daemon) -> AsyncIterator[Client]:
    client = await as_daemon(daemon)
    yield client
    await client.close()


def test_worker_json_is_private_and_holds_the_workers_login_only(daemon: Daemon):
    path = daemon.state_dir / "worker.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    info = worker_file(daemon)
    clients = json.loads((daemon.state_dir / "connection.json").read_text())
    assert (info["url"], info["user"], info["roles"]) == (clients["url"], "worker", {})
    assert info["password"] and info["password"] not in {
        daemon.connection()["password"],
        *(login["password"] for login in clients["roles"].values()),
    }
    assert "worker" not in clients["roles"]  # a client's file gives no worker login, nor the other way round


async def test_the_worker_does_what_a_worker_does(daemon: Daemon, admin: Client):
    admin_js = admin.jetstream()
    offer = await offer_work(admin_js, base=f"base-{os.urandom(4).hex()}")
    asked: list[tuple[str, bytes]] = []

    async def answer(msg: nats.aio.msg.Msg) -> None:  # the daemon's side of the requests, here
        asked.append((msg.subject, msg.data))
        await msg.respond(work.encoder.encode(work.ReportReply(ok=True)))

    await admin.subscribe(work.WORKER_REQUESTS, cb=answer)
    await admin.flush()
    refusals: list[str] = []
    worker = await as_worker(daemon, refusals)
    try:
        # A get whose flow control is refused stalls rather than fails: bounded, so it fails here.
        async with asyncio.timeout(30):
            js = worker.jetstream(timeout=5)
            pull = await js.pull_subscribe_bind(work.pool_consumer(POOL), stream=work.WORK_STREAM)
            (message,) = await pull.fetch(1, timeout=5)
            assert work.decoder(work.WorkOffer).decode(message.data) == offer
            await message.ack_sync()

            bundles = await js.object_store(work.BUNDLES_BUCKET)
            (base,) = offer.bundles
            assert (await bundles.get_info(base)).size == len(BASE_BUNDLE)
            assert (await bundles.get(base)).data == BASE_BUNDLE
            await bundles.put(offer.result_object, b"the task's commits, as a bundle")

            for kind, body in (
                ("take", work.Take(lease=offer.lease, job=offer.job, task=offer.task, attempt=1, host="w1-host")),
                ("report", work.Report(lease=offer.lease, seq=1, body=work.Started(pid=42, start_ticks=1))),
                ("heartbeat", work.Heartbeat(pools=(POOL,), capacity=2, leases=(offer.lease,))),
            ):
                reply = await worker.request(work.worker_subject("w1", kind), work.encoder.encode(body), timeout=5)
                assert work.decoder(work.ReportReply).decode(reply.data).ok
            await worker.flush()
    finally:
        await worker.close()
    assert refusals == []
    assert [subject for subject, _ in asked] == [
        work.worker_subject("w1", kind) for kind in ("take", "report", "heartbeat")
    ]
    # The offer was taken off the work queue by the acknowledgement; the result is there for the daemon.
    assert (await admin_js.stream_info(work.WORK_STREAM)).state.messages == 0
    result = await (await admin_js.object_store(work.BUNDLES_BUCKET)).get(offer.result_object)
    assert result.data == b"the task's commits, as a bundle"


async def test_the_worker_is_refused_everything_else(daemon: Daemon, admin: Client):
    """From the hostile side: whatever a worker's host (or an agent that read worker.json) tries beyond its job."""
    admin_js = admin.jetstream()
    offer = await offer_work(admin_js, base=f"base-{os.urandom(4).hex()}")
    before = {stream: (await admin_js.stream_info(stream)).state for stream in (EVENTS, LOGS, DLQ)}
    work_config = (await admin_js.stream_info(work.WORK_STREAM)).config
    refusals: list[str] = []
    worker = await as_worker(daemon, refusals)
    try:
        js = worker.jetstream(timeout=0.5)
        forged_job = "01FORGEDJOBFORGEDJOBFORGED"
        for attempt in (
            # publish what only the daemon writes, or sends
            lambda: worker.publish(job_event(forged_job, "JobSubmitted"), b"forged"),
            lambda: js.publish(job_event(forged_job, "JobSubmitted"), b"forged"),
            lambda: worker.publish(f"numerus.log.{forged_job}.t1", b"forged output"),
            lambda: worker.publish("numerus.dlq.worker.noise", b"noise"),
            lambda: worker.publish(CHECKPOINT, b"forged"),
            lambda: worker.publish(f"$KV.{LEASE_BUCKET}.{EVENTS}", b"mine"),
            lambda: worker.request(command("status"), b"{}", timeout=0.5),
            lambda: worker.request(command("kill"), b"{}", timeout=0.5),
            lambda: worker.publish(f"numerus.input.{forged_job}.t1", b"typed"),
            # offer work: only the daemon does
            lambda: worker.publish(work.work_subject(POOL), work.encoder.encode(offer)),
            lambda: js.publish(work.work_subject("other"), work.encoder.encode(offer)),
            # administer streams and consumers
            lambda: js.add_stream(name="NUMERUS_SHADOW", subjects=["shadow.>"]),
            lambda: js.delete_stream(work.WORK_STREAM),
            lambda: js.delete_stream(OBJ_STREAM),
            lambda: js.purge_stream(work.WORK_STREAM),
            lambda: js.purge_stream(OBJ_STREAM),  # the whole bucket
            lambda: js.purge_stream(OBJ_STREAM, subject=f"$O.{work.BUNDLES_BUCKET}.C.>"),  # an overwrite's purge
            lambda: js.update_stream(StreamConfig(name=work.WORK_STREAM, subjects=["numerus.work.>", "shadow.>"])),
            lambda: js.add_consumer(work.WORK_STREAM, ConsumerConfig(durable_name="mine", ack_policy=AckPolicy.NONE)),
            lambda: js.add_consumer(work.WORK_STREAM, ConsumerConfig(name="mine", filter_subject="numerus.work.>")),
            lambda: js.delete_consumer(work.WORK_STREAM, work.pool_consumer(POOL)),
            lambda: js.delete_msg(work.WORK_STREAM, 1),
            lambda: js.delete_msg(OBJ_STREAM, 1),
            # read the job's history, its logs, its snapshots
            lambda: js.add_consumer(EVENTS, ConsumerConfig(ack_policy=AckPolicy.NONE)),
            lambda: js.get_msg(EVENTS, 1),
            lambda: js.get_msg(SNAPSHOTS, 1, direct=True),
            lambda: js.stream_info(LOGS),
            # listen where it must not: the daemon's requests, the workers' requests, other inboxes
            lambda: worker.subscribe("numerus.>"),
            lambda: worker.subscribe(work.WORKER_REQUESTS),
            lambda: worker.subscribe(work.work_subject(POOL)),
            lambda: worker.subscribe("_INBOX.>"),
            lambda: worker.subscribe(f"{inbox_prefix('operator')}.>"),
        ):
            await refused(worker, refusals, attempt)
    finally:
        await worker.close()
    # Nothing of it happened: no stream lost a message or changed, the offer and the pool's consumer are there.
    for stream, was in before.items():
        now = (await admin_js.stream_info(stream)).state
        assert (now.first_seq, now.messages >= was.messages) == (was.first_seq, True), (stream, was, now)
    assert (await admin_js.stream_info(work.WORK_STREAM)).config.subjects == work_config.subjects
    assert (await admin_js.stream_info(work.WORK_STREAM)).state.messages == 1
    assert (await admin_js.consumer_info(work.WORK_STREAM, work.pool_consumer(POOL))).num_pending == 1
    assert (await (await admin_js.object_store(work.BUNDLES_BUCKET)).get(offer.bundles[0])).data == BASE_BUNDLE
    with pytest.raises(nats.js.errors.NotFoundError):
        await admin_js.stream_info("NUMERUS_SHADOW")
    for stream, subject in ((EVENTS, job_event(forged_job, "JobSubmitted")), (DLQ, "numerus.dlq.worker.noise")):
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin_js.get_last_msg(stream, subject)
    assert daemon.ctl("status").returncode == 0 and forged_job not in daemon.ctl("status", "--all").stdout


def test_with_an_external_server_no_worker_json_is_written(nats_server: EmbeddedNats, tmp_path: Path):
    """The operator provisions the workers' user on a shared server (deploy/nats-server.conf): the daemon has no
    worker login to give."""
    env = {
        "NUMERUS_NATS_URL": nats_server.url,
        "NUMERUS_NATS_USER": nats_server.user,
        "NUMERUS_NATS_PASSWORD": nats_server.password,
    }
    external = Daemon(tmp_path / "state", env=env).start()
    try:
        assert (external.state_dir / "connection.json").exists()
        assert not (external.state_dir / "worker.json").exists()
    finally:
        assert external.stop() == 0
