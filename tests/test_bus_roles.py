"""Roles on the bus, against a real daemon: what numerusctl does works under each role, and what a role may not do
is refused by the NATS server itself: a viewer cannot run, kill or clean; no client can delete, purge or update a
stream, delete a message, or publish an event, a log chunk or a dead letter, even one signed with the real key."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from numerusd.keys import Keyring
from numerusd.protocol.connection import inbox_prefix
from numerusd.protocol.envelope import seal
from numerusd.protocol.events import JobSubmitted
from numerusd.protocol.exit_codes import CtlExit
from numerusd.protocol.subjects import DLQ, EVENTS, LOGS, job_event
from tests.daemon_harness import Daemon, git_repo, login, refused

pytestmark = pytest.mark.slow  # one real daemon runs jobs for the whole module

QUICK = [{"say": "hello from the agent"}, {"write": "a.txt", "content": "a\n"}]
SLOW = [{"say": "working"}, {"sleep": 60}]


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, str]]:
    """A daemon, a repository, and a job that completed (run by the operator)."""
    root = tmp_path_factory.mktemp("bus")
    daemon = Daemon(root / "state", agents={"quick": QUICK, "slow": SLOW}).start()
    try:
        repo = git_repo(root / "repo")
        run = daemon.ctl("--json", "run", "--no-plan", "Say hello", "--repo", str(repo), "--agent", "quick", "--wait")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout.splitlines()[0])["job"]
        yield daemon, repo, job
    finally:
        assert daemon.stop() == 0


def as_role(daemon: Daemon, role: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return daemon.ctl("--role", role, *args, timeout=timeout)


def test_connection_file_gives_each_role_its_own_login_never_the_daemons(bus: tuple[Daemon, Path, str]):
    daemon, _, _ = bus
    info = json.loads((daemon.state_dir / "connection.json").read_text())
    own = daemon.connection()["user"]
    assert set(info["roles"]) == {"operator", "viewer"}
    assert {login["user"] for login in info["roles"].values()} == {"operator", "viewer"}
    assert own not in {info["user"], "operator", "viewer"}
    assert (info["user"], info["password"]) == (
        info["roles"]["operator"]["user"],
        info["roles"]["operator"]["password"],
    )
    assert info["roles"]["operator"]["password"] != info["roles"]["viewer"]["password"]


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_every_reading_command_works_under_each_role(bus: tuple[Daemon, Path, str], role: str):
    daemon, _, job = bus
    for args in (
        ("status",),
        ("status", job),
        ("logs", job),
        ("logs", job, "-f"),  # follows NUMERUS_LOGS until the job's end
        ("events", job),
        ("audit", "verify"),
        ("audit", "verify", job, "--finished"),
    ):
        result = as_role(daemon, role, *args)
        assert result.returncode == 0, f"{role}: numerusctl {' '.join(args)}: {result.stderr}"
    assert "hello from the agent" in as_role(daemon, role, "logs", job).stdout
    # The plan request reaches the daemon, which answers (this job was run without a plan).
    assert (
        as_role(daemon, role, "plan", job).stderr == f"numerusctl: job {job} has no plan: it was run with --no-plan\n"
    )
    assert "ok: " in as_role(daemon, role, "audit", "verify").stdout
    # `events -f` follows for ever: what it printed before we stop it (our own child, by its pid) is the history.
    with pytest.raises(subprocess.TimeoutExpired) as following:
        subprocess.run(daemon.ctl_argv("--role", role, "events", "-f"), capture_output=True, text=True, timeout=3)
    assert b"JobCompleted" in following.value.stdout


def test_operator_runs_kills_and_cleans(bus: tuple[Daemon, Path, str]):
    daemon, repo, _ = bus
    run = as_role(daemon, "operator", "--json", "run", "--no-plan", "Work long", "--repo", str(repo), "--agent", "slow")
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)["job"]
    killed = as_role(daemon, "operator", "kill", job)
    assert killed.returncode == 0, killed.stderr
    # The kill is asked; the job ends once its agent has.
    deadline = time.monotonic() + 30
    while daemon.status(job)["status"] != "killed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.status(job)["status"] == "killed"
    cleaned = as_role(daemon, "operator", "clean", job)
    assert cleaned.returncode == 0, cleaned.stderr


def test_viewer_cannot_run_kill_or_clean(bus: tuple[Daemon, Path, str]):
    daemon, repo, _ = bus
    run = as_role(daemon, "operator", "--json", "run", "--no-plan", "Work long", "--repo", str(repo), "--agent", "slow")
    job = json.loads(run.stdout)["job"]
    try:
        jobs_before = len(daemon.ctl_json("status", "--all")["jobs"])
        for verb, args in (
            ("run", ("run", "--no-plan", "Sneak in", "--repo", str(repo), "--agent", "quick")),
            ("kill", ("kill", job)),
            ("clean", ("clean", "--ended")),
        ):
            refused = as_role(daemon, "viewer", *args, timeout=20)
            assert refused.returncode == CtlExit.FAILED, refused.stderr
            assert refused.stderr == (
                f"numerusctl: not allowed: the viewer role may not publish on numerus.cmd.{verb} "
                "(the NATS server refused it)\n"
            )
        assert daemon.status(job)["status"] == "running"  # the kill did not reach the daemon
        assert len(daemon.ctl_json("status", "--all")["jobs"]) == jobs_before  # nor did the run
    finally:
        assert as_role(daemon, "operator", "kill", job).returncode == 0


@pytest.mark.parametrize("role", ["operator", "viewer"])
async def test_no_client_can_administer_the_streams_or_publish_on_them(bus: tuple[Daemon, Path, str], role: str):
    daemon, _, job = bus
    own = daemon.connection()
    admin = await nats.connect(own["url"], user=own["user"], password=own["password"])
    client_login = login(daemon, role)
    refusals: list[str] = []

    async def record(error: Exception) -> None:
        if "permissions violation" in str(error):
            refusals.append(str(error))

    client = await nats.connect(
        client_login["url"],
        user=client_login["user"],
        password=client_login["password"],
        error_cb=record,
        inbox_prefix=inbox_prefix(role),  # as numerusctl does: the only inbox the role may read
    )
    try:
        admin_js = admin.jetstream()
        # Other jobs of the module may still be writing: what is checked is that nothing was deleted or purged
        # (the first message and the count never go back) and that nothing forged was stored.
        before = {stream: (await admin_js.stream_info(stream)).state for stream in (EVENTS, LOGS, DLQ)}
        config = (await admin_js.stream_info(EVENTS)).config
        js = client.jetstream(timeout=0.5)
        keyring = Keyring.load(daemon.state_dir / "keys.json")
        for key in (keyring.current_key, b"not the key" * 4):  # genuine signature or not: publishing is refused
            forged = seal(
                JobSubmitted(goal="forged", repo="/tmp", agent="quick"),
                id="01FORGEDFORGEDFORGEDFORGED",
                job="01FORGEDJOBFORGEDJOBFORGED",
                task=None,
                time=datetime.now(UTC),
                actor="attacker",
                correlation_id="x",
                causation_id=None,
                prev="",
                kid=keyring.current_kid,
                key=key,
            )
            subject = job_event("01FORGEDJOBFORGEDJOBFORGED", "JobSubmitted")
            await refused(client, refusals, lambda s=subject, w=forged.wire: js.publish(s, w))
            await refused(client, refusals, lambda s=subject, w=forged.wire: client.publish(s, w))
        for attempt in (
            lambda: js.delete_stream(EVENTS),
            lambda: js.purge_stream(EVENTS),
            lambda: js.purge_stream(LOGS),
            lambda: js.update_stream(StreamConfig(name=EVENTS, subjects=config.subjects, deny_delete=False)),
            lambda: js.delete_msg(EVENTS, 1),
            lambda: js.add_stream(name="NUMERUS_SHADOW", subjects=["numerus.cmd.>"]),
            lambda: client.publish(f"numerus.log.{job}.t1", b"forged output"),
            lambda: client.publish("numerus.dlq.attacker.noise", b"noise"),
            # Nor read what was meant for another: the daemon's inbox (its JetStream acks), another role's.
            lambda: client.subscribe("_INBOX.>"),
            lambda: client.subscribe(f"_INBOX_{'viewer' if role == 'operator' else 'operator'}.>"),
        ):
            await refused(client, refusals, attempt)
        for stream, was in before.items():
            now = (await admin_js.stream_info(stream)).state
            assert (now.first_seq, now.messages >= was.messages) == (was.first_seq, True), (stream, was, now)
        for stream, subject in (
            (EVENTS, job_event("01FORGEDJOBFORGEDJOBFORGED", "JobSubmitted")),
            (LOGS, f"numerus.log.{job}.t1"),
            (DLQ, "numerus.dlq.attacker.noise"),
        ):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                stored = await admin_js.get_last_msg(stream, subject)
                assert stored.data not in (b"forged output", b"noise") and b"forged" not in stored.data, subject
        assert (await admin_js.stream_info(EVENTS)).config.deny_delete
        assert "01FORGEDJOBFORGEDJOBFORGED" not in daemon.ctl("status", "--all").stdout
    finally:
        await client.close()
        await admin.close()
    assert daemon.ctl("audit", "verify").returncode == 0
