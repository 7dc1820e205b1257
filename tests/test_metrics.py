"""Prometheus metrics: scraped over HTTP from a real daemon after it ran a job, checked by name and value; the
endpoint's address refused at start when it is bad, and a scraper that misbehaves gets nothing but a closed
connection."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs a job

HELLO = [
    {"write": "HELLO.md", "content": "hello\n"},
    {"usage": {"input_tokens": 1000, "cached_input_tokens": 100, "output_tokens": 50}},
    {"say": "Done."},
]

# Only a port: the endpoint must listen on 127.0.0.1. Prices make the cost known (per million tokens).
CONFIG = """
metrics_address = "0"
[prices.m1]
input = 1.0
output = 2.0
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("metrics")
    d = Daemon(root / "state", agents={"scripted": HELLO}, config=CONFIG, profiles={"scripted": 'model = "m1"'})
    d.start()
    yield d
    assert d.stop() == 0, d.stderr()


def metrics_url(daemon: Daemon) -> str:
    (url,) = re.findall(r"metrics on (http://\S+/metrics)", daemon.stderr())
    return url


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_job_shows_in_the_metrics(daemon: Daemon, tmp_path: Path):
    url = metrics_url(daemon)
    assert url.startswith("http://127.0.0.1:"), url  # only a port given: loopback, never every interface
    repo = git_repo(tmp_path / "repo")
    result = daemon.ctl("run", "--no-plan", "Say hello", "--repo", str(repo), "--agent", "scripted", "--wait")
    assert result.returncode == 0, result.stdout + result.stderr

    samples = scrape(url)
    assert samples[("numerus_events_appended_total", ())] >= 5
    assert samples[("numerus_jobs", (("state", "completed"),))] == 1
    assert samples[("numerus_jobs", (("state", "failed"),))] == 0  # every state is there, at 0 when none
    assert samples[("numerus_tasks", (("state", "completed"),))] == 1
    assert samples[("numerus_append_seconds_count", ())] >= 5
    assert samples[("numerus_wal_fsync_seconds_count", ())] >= 1
    assert samples[("numerus_agent_spawn_seconds_count", ())] == 1
    assert samples[("numerus_tokens_total", (("kind", "input"),))] == 1000
    assert samples[("numerus_tokens_total", (("kind", "cached_input"),))] == 100
    assert samples[("numerus_tokens_total", (("kind", "output"),))] == 50
    assert samples[("numerus_cost", ())] == pytest.approx((1000 * 1.0 + 50 * 2.0) / 1e6)
    assert samples[("numerus_agent_slots", ())] == 8
    assert samples[("numerus_agent_slots_used", ())] == 0
    assert samples[("numerus_jobs_queued", ())] == 0
    # The job's figures agree with what status says of it.
    (job,) = daemon.ctl_json("status", "--all")["jobs"]
    assert daemon.status(job["id"])["cost"] == pytest.approx(samples[("numerus_cost", ())])


async def test_dead_letters_are_counted_by_source_and_reason(daemon: Daemon):
    url = metrics_url(daemon)
    before = scrape(url).get(("numerus_dead_letters_total", (("reason", "bad_request"), ("source", "cmd"))), 0)
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        reply = await nc.request("numerus.cmd.run", b'{"goal": 42}', timeout=10)
        assert json.loads(reply.data)["code"] == "bad_request"
    finally:
        await nc.close()

    async def counted() -> bool:
        key = ("numerus_dead_letters_total", (("reason", "bad_request"), ("source", "cmd")))
        return scrape(url).get(key, 0) == before + 1

    await eventually(counted, timeout=10)


def test_the_endpoint_serves_metrics_only_and_survives_bad_clients(daemon: Daemon):
    url = metrics_url(daemon)
    host, port = url.removeprefix("http://").removesuffix("/metrics").split(":")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url.replace("/metrics", "/keys.json"), timeout=10)
    missing.value.close()
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
    posted.value.close()
    assert posted.value.code == 405
    # A request head that never ends: cut off once it outgrows the limit, with no answer.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(OSError):  # closed by the daemon while we were still sending: as good
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * 64 * 1024)
        assert answer(sock) == b""
    # Bytes that are no HTTP at all.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x00\xff\r\n\r\n")
        assert answer(sock).startswith(b"HTTP/1.1 405")
    assert scrape(url)[("numerus_agent_slots", ())] == 8  # still serving
    assert daemon.alive


def answer(sock: socket.socket) -> bytes:
    """What the daemon sent back before closing (nothing, when it reset the connection)."""
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


def run_numerusd(state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(state_dir), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_metrics_address_is_refused_at_start_in_one_line(tmp_path: Path):
    result = run_numerusd(tmp_path / "state", "--metrics", "nowhere:abc")
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        "numerusd: metrics_address 'nowhere:abc' is not PORT or HOST:PORT (e.g. 9464 or 127.0.0.1:9464)"
    ]


def test_a_metrics_address_in_use_is_refused_at_start_in_one_line(daemon: Daemon, tmp_path: Path):
    taken = metrics_url(daemon).removeprefix("http://").removesuffix("/metrics")
    result = run_numerusd(tmp_path / "state", "--metrics", taken)
    assert result.returncode == 78, result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"numerusd: metrics_address '{taken}': cannot listen on {taken}"), result.stderr
    assert daemon.alive
