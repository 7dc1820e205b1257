"""`numerusctl logs`: the agent's terminal output, whole after the fact and live with -f."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import nats
import pytest

from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo

pytestmark = pytest.mark.slow  # real daemons run jobs whose agents talk for a while

TALKATIVE = [
    {"print": "compiling module 1 of 3"},
    {"sleep": 0.4},
    {"print": "compiling module 2 of 3"},
    {"sleep": 0.4},
    {"print": "compiling module 3 of 3"},
    {"say": "Build finished."},
]


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", agents={"talkative": TALKATIVE}).start()
    yield d
    d.stop()


async def test_logs_follow_streams_output_live_and_ends_with_the_job(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    job = daemon.ctl_json("run", "--no-plan", "Build it", "--repo", str(repo), "--agent", "talkative")["job"]
    follower = subprocess.Popen(
        daemon.ctl_argv("logs", job, "-f", "--raw"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    text = out.decode()
    positions = [text.index(f"compiling module {i} of 3") for i in (1, 2, 3)]
    assert positions == sorted(positions)
    assert daemon.status(job)["status"] == "completed"

    log = Path(daemon.status(job)["tasks"][0]["log_path"]).read_bytes()
    assert out.endswith(log) or log in out
    after = daemon.ctl("logs", job, check=True).stdout
    assert "compiling module 3 of 3" in after and "Build finished." in after


async def test_log_chunks_on_nats_add_up_to_the_log_file(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    assert (
        daemon.ctl("run", "--no-plan", "Build it", "--repo", str(repo), "--agent", "talkative", "--wait").returncode
        == 0
    )
    (listed,) = daemon.ctl_json("status")["jobs"]
    job = daemon.status(listed["id"])
    log = Path(job["tasks"][0]["log_path"]).read_bytes()
    c = daemon.connection()
    nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
    try:
        chunks: list[tuple[int, bytes]] = []
        sub = await nc.jetstream().subscribe(f"numerus.log.{job['id']}.t1", ordered_consumer=True)

        async def complete() -> bool:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except nats.errors.TimeoutError:
                    return sum(len(data) for _, data in chunks) >= len(log)
                chunks.append((int(msg.headers["Numerus-Offset"]), msg.data))

        await eventually(complete, timeout=10)
        await sub.unsubscribe()
    finally:
        await nc.close()
    offsets = [offset for offset, _ in chunks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert b"".join(data for _, data in chunks) == log


async def test_output_before_a_long_silence_is_published_live(tmp_path: Path):
    quiet = [{"print": "thinking about it..."}, {"sleep": 30}]
    daemon = Daemon(tmp_path / "state", agents={"quiet": quiet}).start()
    try:
        repo = git_repo(tmp_path / "repo")
        job = daemon.ctl_json("run", "--no-plan", "Think", "--repo", str(repo), "--agent", "quiet")["job"]
        c = daemon.connection()
        nc = await nats.connect(c["url"], user=c["user"], password=c["password"])
        try:
            sub = await nc.jetstream().subscribe(f"numerus.log.{job}.t1", ordered_consumer=True)
            seen = bytearray()

            async def arrived() -> bool:
                with contextlib.suppress(nats.errors.TimeoutError):
                    seen.extend((await sub.next_msg(timeout=0.2)).data)
                return b"thinking about it..." in seen

            await eventually(arrived, timeout=10)  # long before the agent's 30 s silence ends
            assert daemon.status(job)["tasks"][0]["status"] == "running"
            await sub.unsubscribe()
        finally:
            await nc.close()
    finally:
        daemon.stop()
