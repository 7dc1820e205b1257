"""Replicated streams on a three-node cluster made from deploy/nats-cluster.conf, and a node killed mid-job.

The three nats-servers run the recipe as an operator would install it (deploy/nats-server.conf beside it,
included), with only its addresses and store directory changed for one machine: loopback ports of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StreamInfo

from numerusd.embedded_nats import find_binary
from numerusd.errors import NatsUnavailable, StreamMismatch
from numerusd.protocol.subjects import DLQ, EVENTS, LOGS
from numerusd.stream_reader import read_stream
from numerusd.streams import ensure_kv, ensure_streams, stream_specs
from tests.conftest import eventually
from tests.daemon_harness import BIN, Daemon, claim, git, git_repo
from tests.views_reader import job_views

DEPLOY = Path(__file__).parent.parent / "deploy"
NODES = ("numerus-a", "numerus-b", "numerus-c")
#: The recipe's users (deploy/nats-server.conf) and the route login, with the passwords the test gives them.
PASSWORDS = {
    "NUMERUSD_PASSWORD": "daemon-pw",
    "OPERATOR_PASSWORD": "operator-pw",
    "VIEWER_PASSWORD": "viewer-pw",
    "WORKER_PASSWORD": "worker-pw",
    "ROUTE_PASSWORD": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
}


def free_ports(count: int) -> list[int]:
    """`count` loopback ports nothing listens on now (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


async def _quiet(_error: Exception) -> None:
    """nats-py's error callback: a node not listening yet, or killed, is expected here; no traceback per try."""


@dataclass
class Node:
    """One nats-server of the cluster: its name, ports, directory and process (stopped by its pid only)."""

    name: str
    client_port: int
    route_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        path = self.directory / "nats-server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Cluster:
    """Three nats-servers on loopback ports forming the recipe's cluster `numerus`."""

    root: Path
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * len(NODES))
        for i, name in enumerate(NODES):
            self.nodes.append(Node(name, ports[2 * i], ports[2 * i + 1], self.root / name))

    @property
    def urls(self) -> str:
        """The three client URLs as numerusd's `nats_url` takes them."""
        return ",".join(node.url for node in self.nodes)

    def env(self, node: Node) -> dict[str, str]:
        """What the recipe's EnvironmentFile holds on `node`'s host."""
        routes = ", ".join(
            f"nats-route://route:{PASSWORDS['ROUTE_PASSWORD']}@127.0.0.1:{peer.route_port}" for peer in self.nodes
        )
        return {**os.environ, **PASSWORDS, "NATS_SERVER_NAME": node.name, "NATS_ROUTES": f"[{routes}]"}

    def configure(self, node: Node) -> Path:
        """The recipe's two files in the node's directory, with its own ports and store."""
        node.directory.mkdir(parents=True, exist_ok=True)
        single = (DEPLOY / "nats-server.conf").read_text()
        assert "/var/lib/nats/jetstream" in single
        (node.directory / "nats-server.conf").write_text(
            single.replace("/var/lib/nats/jetstream", str(node.directory / "jetstream"))
        )
        recipe = (DEPLOY / "nats-cluster.conf").read_text()
        assert "0.0.0.0:4222" in recipe and "0.0.0.0:6222" in recipe
        conf = node.directory / "nats-cluster.conf"
        conf.write_text(
            recipe.replace("0.0.0.0:4222", f"127.0.0.1:{node.client_port}").replace(
                "0.0.0.0:6222", f"127.0.0.1:{node.route_port}"
            )
        )
        return conf

    def start(self, node: Node) -> None:
        conf = self.configure(node)
        with open(node.directory / "nats-server.log", "ab") as log:
            node.process = subprocess.Popen(
                [find_binary(), "-c", str(conf)], env=self.env(node), stdout=log, stderr=log, cwd=self.root
            )

    def kill(self, node: Node) -> None:
        """SIGKILL, as a host that dies: nothing flushed, no lame-duck goodbye to clients or peers."""
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    async def connect(self, *nodes: Node, **options: object) -> Client:
        """The daemon's login (every right) to these nodes (default: all)."""
        servers = [node.url for node in nodes or self.nodes]
        return await nats.connect(
            servers, user="numerusd", password=PASSWORDS["NUMERUSD_PASSWORD"], error_cb=_quiet, **options
        )

    async def formed(self, timeout: float = 30.0) -> None:
        """Wait until the three nodes are routed together and JetStream has a meta leader with all three peers."""
        nc = await self.connect()
        try:

            async def ready() -> bool:
                try:
                    reply = await nc.request("$JS.API.INFO", b"", timeout=2)
                except Exception:
                    return False
                return b'"error"' not in reply.data

            await eventually(ready, timeout=timeout, interval=0.2)
        finally:
            await nc.close()


@contextlib.contextmanager
def running_cluster(root: Path) -> Iterator[Cluster]:
    """Three nodes started from the recipe, stopped (by their pids) however the block ends."""
    cluster = Cluster(root)
    try:
        for node in cluster.nodes:
            cluster.start(node)
        yield cluster
    finally:
        cluster.stop()


FILES = {"t1": "ONE.md", "t2": "TWO.md", "t3": "THREE.md", "t4": "FOUR.md"}
#: Four tasks of a few seconds each, two at a time (t3 after t1, t4 after t2): a node dies while they run.
TEAM = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {
                    "answer": {
                        "summary": "four files",
                        "tasks": [
                            {"id": "t1", "title": "One", "instructions": "write ONE.md", "intents": []},
                            {"id": "t2", "title": "Two", "instructions": "write TWO.md", "intents": []},
                            {"id": "t3", "title": "Three", "instructions": "write THREE.md", "deps": ["t1"]},
                            {"id": "t4", "title": "Four", "instructions": "write FOUR.md", "deps": ["t2"]},
                        ],
                    }
                }
            ],
        },
        *(
            {"match": {"role": "claimer", "task": task}, "steps": [{"answer": claim((name, "create"))}]}
            for task, name in FILES.items()
        ),
        *(
            {
                "match": {"role": "executor", "task": task},
                "steps": [
                    {"say": f"working on {name}"},
                    {"sleep": 3},
                    {"write": name, "content": f"{task}\n"},
                    {"say": "done"},
                ],
            }
            for task, name in FILES.items()
        ),
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": ["ok"]}}]},
    ]
}


def connected_port(pid: int, ports: set[int]) -> int:
    """The one port of `ports` that process `pid` has an established TCP connection to (its NATS server)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if fields[3] == "01" and fields[9] in inodes and remote_port in ports:
            found.add(remote_port)
    (port,) = found
    return port


async def stream_leader(nc: Client, stream: str) -> str:
    """The name of the node leading `stream`'s replicas now."""
    info = await nc.jetstream().stream_info(stream)
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader


async def lead_from(nc: Client, stream: str, node: str) -> None:
    """Move `stream`'s leadership to `node` (a stepdown naming the preferred peer), and wait until it holds."""
    if await stream_leader(nc, stream) != node:
        body = json.dumps({"placement": {"preferred": node}}).encode()
        reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
        assert b'"success":true' in reply.data, reply.data

    async def leads() -> bool:
        with contextlib.suppress(Exception):
            return await stream_leader(nc, stream) == node
        return False

    await eventually(leads, timeout=20, interval=0.2)


async def test_the_streams_and_a_bucket_are_kept_on_three_nodes_and_a_single_copy_is_brought_to_three(
    tmp_path: Path,
):
    with running_cluster(tmp_path / "cluster") as cluster:
        await cluster.formed()
        nc = await cluster.connect()
        try:
            js = nc.jetstream()
            # Someone made the log stream by hand with one copy, and wrote to it; and a bucket with one copy.
            (logs,) = [spec for spec in stream_specs() if spec.name == LOGS]
            await js.add_stream(logs.config())
            await js.publish("numerus.log.J1.t1", b"hello")
            await js.create_key_value(KeyValueConfig(bucket="NUMERUS_TEST_OLD", history=1))

            await ensure_streams(js, stream_specs(replicas=3))
            bucket = await ensure_kv(js, "NUMERUS_TEST", replicas=3, history=1)
            old = await ensure_kv(js, "NUMERUS_TEST_OLD", replicas=3)

            for name in (EVENTS, LOGS, DLQ, "KV_NUMERUS_TEST", "KV_NUMERUS_TEST_OLD"):

                async def replicated(name: str = name) -> bool:
                    info = await js.stream_info(name)
                    followers = info.cluster.replicas or [] if info.cluster else []
                    current = [peer.name for peer in followers if peer.current]
                    return info.config.num_replicas == 3 and len(current) == 2

                await eventually(replicated, timeout=20, interval=0.2)
            assert (await js.stream_info(LOGS)).state.messages == 1  # brought to three copies, nothing lost
            await bucket.put("k", b"v")
            assert (await bucket.get("k")).value == b"v"
            assert (await old.status()).history == 1  # its other settings as they were
            # Done twice, nothing to do: the second pass changes nothing and raises nothing.
            await ensure_streams(js, stream_specs(replicas=3))
            assert (await ensure_kv(js, "NUMERUS_TEST", replicas=3, history=1)) is not None
        finally:
            await nc.close()


async def test_three_replicas_on_a_single_server_are_refused_saying_what_to_do(nc: Client, nats_server, tmp_path):
    js = nc.jetstream()
    with pytest.raises(StreamMismatch, match=r"cannot be kept on 3 servers here .*set replicas = 1"):
        await ensure_streams(js, stream_specs(replicas=3))
    # A stream someone made with one copy stays as it was: refused, not half changed.
    await ensure_streams(js, stream_specs(replicas=1))
    with pytest.raises(StreamMismatch, match=f"stream {EVENTS} cannot be kept on 3 servers"):
        await ensure_streams(js, stream_specs(replicas=3))
    assert (await js.stream_info(EVENTS)).config.num_replicas == 1
    with pytest.raises(StreamMismatch, match="KV_NUMERUS_TEST cannot be kept on 3 servers"):
        await ensure_kv(js, "NUMERUS_TEST", replicas=3)

    # numerusd says so in one line, and stops.
    env = {
        **os.environ,
        "NUMERUS_NATS_URL": nats_server.url,
        "NUMERUS_NATS_USER": nats_server.user,
        "NUMERUS_NATS_PASSWORD": nats_server.password,
        "NUMERUS_REPLICAS": "3",
    }
    result = subprocess.run(
        [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("numerusd:")]
    assert f"stream {EVENTS} cannot be kept on 3 servers here" in line and "set replicas = 1" in line


@pytest.mark.parametrize(
    ("where", "value"),
    [("toml", "2"), ("toml", '"three"'), ("env", "three"), ("env", "0"), ("flag", "2"), ("flag", "three")],
)
def test_a_replica_count_other_than_1_or_3_stops_numerusd_with_one_line(tmp_path: Path, where: str, value: str):
    state = tmp_path / "state"
    state.mkdir()
    argv = [str(BIN / "numerusd"), "--state-dir", str(state)]
    env = {**os.environ, "NUMERUS_NATS_URL": "nats://127.0.0.1:1,nats://127.0.0.1:2"}
    if where == "toml":
        (state / "numerus.toml").write_text(f"replicas = {value}\n")
    elif where == "env":
        env["NUMERUS_REPLICAS"] = value
    else:
        argv += ["--replicas", value]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 78, result.stderr
    (line,) = result.stderr.splitlines()
    assert "replicas" in line.lower(), line  # the setting named (the variable, or its path in the file)
    assert not (state / "connection.json").exists()


def test_three_replicas_without_a_cluster_to_hold_them_stops_numerusd_with_one_line(tmp_path: Path):
    argv = [str(BIN / "numerusd"), "--state-dir", str(tmp_path / "state"), "--replicas", "3"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "numerusd: replicas = 3 needs a cluster: set nats_url to its nodes' client URLs, comma separated "
        "(the embedded server is a single node)"
    ]


def test_the_recipe_as_written_is_valid_and_its_users_are_the_single_nodes():
    """nats-server accepts deploy/nats-cluster.conf with the environment it documents; its users and permissions
    are deploy/nats-server.conf's by inclusion (tests/test_deploy_conf.py checks those against the code)."""
    recipe = (DEPLOY / "nats-cluster.conf").read_text()
    assert "include nats-server.conf" in recipe and "authorization {\n    user: route" in recipe
    assert "users" not in re.sub(r"#[^\n]*", "", recipe)  # no second copy of the users to drift apart
    routes = ", ".join(f"nats-route://route:pw@{name}:6222" for name in NODES)
    env = {**os.environ, **PASSWORDS, "NATS_SERVER_NAME": "numerus-a", "NATS_ROUTES": f"[{routes}]"}
    result = subprocess.run(
        [find_binary(), "-t", "-c", str(DEPLOY / "nats-cluster.conf")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # three servers, a daemon and a job, and a leader election of several seconds
async def test_a_planned_job_completes_with_nothing_lost_or_doubled_when_the_daemons_node_dies(tmp_path: Path):
    """The node killed is the daemon's own server and the leader of NUMERUS_EVENTS's replicas at once (moved there
    first), while the first two tasks' agents run: numerusd loses its connection while the stream elects a new
    leader among the other two (seconds without one), and the rest of the job is written after."""
    repo = git_repo(tmp_path / "repo")
    with running_cluster(tmp_path / "cluster") as cluster:
        await cluster.formed()
        env = {
            "NUMERUS_NATS_URL": cluster.urls,
            "NUMERUS_NATS_USER": "numerusd",
            "NUMERUS_NATS_PASSWORD": PASSWORDS["NUMERUSD_PASSWORD"],
        }
        config = 'replicas = 3\nchecks = ["test -n \\"$(ls)\\""]\nbackoff_s = [0.2]\nparallel = 2\n'
        with Daemon(tmp_path / "state", agents={"team": TEAM}, config=config, env=env).start(timeout=60) as daemon:
            assert daemon.process is not None
            port = connected_port(daemon.process.pid, {node.client_port for node in cluster.nodes})
            (doomed,) = [node for node in cluster.nodes if node.client_port == port]
            survivors = [node for node in cluster.nodes if node is not doomed]
            observer = await cluster.connect(*survivors)
            try:
                await lead_from(observer, EVENTS, doomed.name)
                job = daemon.ctl("run", "four files", "--repo", str(repo), "--agent", "team", check=True)
                job_id = job.stdout.strip()
                async with daemon.client() as client:
                    await client.wait_for(
                        job_id, lambda v: any(t["status"] == "running" for t in v["tasks"]), timeout=60
                    )
                cluster.kill(doomed)
                killed = time.monotonic()
                async with daemon.client() as client:

                    async def answers() -> bool:  # no responder while numerusd reconnects to another node
                        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                            return bool(await client.status(job_id))
                        return False

                    await eventually(answers, timeout=30, interval=0.1)
                    print(f"numerusd answered again {time.monotonic() - killed:.2f} s after its node was killed")
                    view = await client.wait_for(
                        job_id, lambda v: v["status"] in ("completed", "failed", "killed"), timeout=120
                    )
                assert view["status"] == "completed", (view, daemon.stderr()[-3000:])
                assert daemon.alive
                # numerusd moved to a surviving node, and the stream is led from one of them.
                assert "reconnected to NATS" in daemon.stderr()
                assert connected_port(daemon.process.pid, {node.client_port for node in survivors})
                # The job may have completed (in memory, its events in the WAL) before the survivors elected the
                # stream's new leader: until then the stream does not answer, which is a wait, not a failure.
                led: list[StreamInfo] = []

                async def leader_elected() -> bool:
                    with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                        info = await observer.jetstream().stream_info(EVENTS)
                        if info.cluster is not None and info.cluster.leader:
                            led[:] = [info]
                            return True
                    return False

                await eventually(leader_elected, timeout=60, interval=0.2)
                (info,) = led
                assert info.config.num_replicas == 3
                assert info.cluster is not None and info.cluster.leader in {node.name for node in survivors}

                # `status` answers from memory: the stream has the job's last event once the leader the two
                # survivors elected takes numerusd's writes (what the write-ahead log held is republished).
                stored: list[dict] = []

                async def written() -> bool:
                    try:
                        stored[:] = [json.loads(m.data) async for batch in read_stream(observer, EVENTS) for m in batch]
                    except NatsUnavailable:  # no leader elected yet: the stream does not answer
                        return False
                    return any(e["job"] == job_id and e["type"] == "JobCompleted" for e in stored)

                await eventually(written, timeout=60, interval=0.5)
                print(f"the job's last event was in the stream {time.monotonic() - killed:.2f} s after the kill")
                # Every event once: no id twice in the whole stream, the job's stored events exactly the events
                # the daemon reports, each task merged once.
                ids = [event["id"] for event in stored]
                assert len(ids) == len(set(ids)), "an event was stored twice"
                events = daemon.events(job_id)
                assert [e["id"] for e in events] == [e["id"] for e in stored if e["job"] == job_id]
                merged = sorted(e["task"] for e in events if e["type"] == "TaskMerged")
                assert merged == sorted(FILES), "a task merged twice, or not at all"
                for task, name in FILES.items():
                    assert git(repo, "show", f"numerus/{job_id}.integration:{name}") == f"{task}\n"
                # The views followed the stream through the failover, to the same end.
                db = daemon.state_dir / "views.sqlite3"
                await eventually(lambda: [v.status for v in job_views(db, job_id)] == ["completed"], timeout=30)
            finally:
                await observer.close()
            # numerusctl reaches the daemon through any node that is up: connection.json lists all three, and a
            # dead node named first is passed over.
            assert daemon.connection()["url"] == cluster.urls
            login = ("--nats-user", "numerusd", "--nats-password", PASSWORDS["NUMERUSD_PASSWORD"])
            status = daemon.ctl("--nats-url", f"{doomed.url},{survivors[0].url}", *login, "status", job_id)
            assert status.returncode == 0 and "completed" in status.stdout, status.stderr
            audit = daemon.ctl("audit", "verify", job_id, "--finished")
            assert audit.returncode == 0, audit.stdout + audit.stderr
            whole = daemon.ctl("audit", "verify")
            assert whole.returncode == 0, whole.stdout + whole.stderr


def test_numerusctl_tries_every_node_and_names_them_all_when_none_answers(tmp_path: Path):
    dead = ",".join(f"nats://route:secret@127.0.0.1:{port}" for port in free_ports(3))
    result = subprocess.run(
        [str(BIN / "numerusctl"), "--state-dir", str(tmp_path), "--nats-url", dead, "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"numerusctl: cannot reach numerusd at {dead.replace('route:secret@', '')} (")
    assert "secret" not in line
