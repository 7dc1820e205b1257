"""How fast agent output goes through redaction and logging, and whether `status` stays quick meanwhile.

    python bench/bench_redaction.py [--mb 100] [--rounds 3]

Agent output (build-log-like and JSONL lines with an API key and a GitHub token every 1,000 lines, and a lookalike
such as `task-sk-…` on one line in ten, which the expression must look at and let through) goes
through the daemon's `AgentProcess.pump` in the 4 KiB chunks a PTY gives: redaction (`numerusd.redaction`), the
line buffer and a parser, the real `LogSink` writing the run log and publishing `numerus.log.…` chunks to a real
nats-server's `NUMERUS_LOGS`. The chunks come from memory, not a PTY: on this machine the kernel's PTY copy alone
tops out near the target, and it is the same with or without redaction (`pty_mb_s` reports `cat` of the same
output through a real PTY and the same path, for comparison). The baseline is the same path with redaction
taken out, in the same run, alternating rounds; `ratio` is redacted / baseline throughput (medians), and
`redacted_cpu_mb_s` the redacted throughput per CPU second of the process (steadier on a busy machine).
Meanwhile another process asks a status responder served by the pump's event loop (the daemon's own
`job_view`, encoded as `status` replies are) in a loop, so its p99 is what a user's `status` would see while an
agent prints at full speed (`status_idle_p99_ms`: the same client before any output, for the machine's own
latency). `dense_mb_s`: output with a lookalike on five lines in six (the expression's worst ordinary case).
Targets: >= 50 MB/s redacted, status p99 <= 10 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_parser, connect, embedded_nats, percentile, report, run

from numerusd.agents.base import AgentInvocation
from numerusd.domain import JobState, job_view
from numerusd.embedded_nats import EmbeddedNats
from numerusd.protocol.commands import StatusReply
from numerusd.protocol.events import EventData
from numerusd.redaction import Redactor, known_secrets
from numerusd.streams import ensure_streams
from numerusd.supervisor import AgentProcess

SECRET = "sk-proj-BenchSecret0123456789abcdefghijklmnopq"
#: Typical output: one line in ten holds a literal a secret starts with.
TYPICAL = [
    b"   Compiling numerus-core v0.3.1 (/srv/repo/crates/core) in 2.31s; 148 warnings suppressed\n",
    b'{"type":"item.completed","item":{"id":"item_12","type":"agent_message","text":"Fixed the parser"}}\n',
    b"src/lib.rs:214:9: warning: unused variable `count`; prefix it with an underscore if intentional\n",
    b"PASS  tests/test_tokens.py::test_rotation[prefix-only] in 12 ms, 3 assertions, 0 failures\n",
    b"collected 1841 items / 2 skipped; running with -n 2 on python 3.13.5, pytest-8.4.1, pluggy-1.6.0\n",
    b"test tests::task-sk-lookalike_handles_empty_input ... ok (0.002 s) [task-sk-00000000000000000000000]\n",
    b"diff --git a/src/tokens.rs b/src/tokens.rs\nindex 3f2a1b4..9c8d7e6 100644\n--- a/src/tokens.rs\n",
    b"+    let window = Duration::from_millis(250); // the pause between two retries of a refused request\n",
    b"   Finished `release` profile [optimized] target(s) in 41.27s; running 1841 tests on 2 threads\n",
]
#: Dense lookalikes: five lines in six hold such a literal.
DENSE = [
    b"   Compiling numerus-core v0.3.1 (/srv/repo/crates/core) in 2.31s; 148 warnings suppressed\n",
    b"test tests::task-sk-lookalike_handles_empty_input ... ok (0.002 s) [task-sk-00000000000000000000000]\n",
    b'{"type":"item.completed","item":{"id":"item_12","type":"agent_message","text":"Fixed the eyJ parser"}}\n',
    b"src/lib.rs:214:9: warning: unused variable `ghp_count`; prefix it with an underscore if intentional\n",
    b"PASS  tests/test_tokens.py::test_rotation[AKIA-prefix-only] in 12 ms, 3 assertions, 0 failures\n",
    b"collected 1841 items / 2 skipped; running with -n 2 on python 3.13.5, pytest-8.4.1, pluggy-1.6.0\n",
]


def output_file(path: Path, megabytes: int, lines: list[bytes]) -> int:
    """Write ~`megabytes` MB of agent output made of `lines` (and secrets every 1,000 lines); its size."""
    block = b"".join(lines * (1000 // len(lines))) + f"export OPENAI_API_KEY={SECRET} ghp_{'a1B2c3D4e5' * 4}\n".encode()
    with path.open("wb") as out:
        for _ in range(megabytes * 1_000_000 // len(block) + 1):
            out.write(block)
    return path.stat().st_size


class Passthrough:
    """The baseline: output goes on unredacted (what `AgentProcess.redacted` did before redaction existed)."""

    counts: Counter[str] = Counter()

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def close(self) -> bytes:
        return b""


class CatAdapter:
    """An agent that prints a file; its parser reads each line and reports nothing."""

    name = "cat"

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, invocation: AgentInvocation) -> tuple[list[str], dict[str, str]]:
        return ["cat", str(self.path)], {}

    def parser(self, invocation: AgentInvocation) -> CatAdapter:
        return self

    def feed(self, line: str) -> list[EventData]:
        return []


class MemoryTerminal:
    """A terminal whose agent printed `data`, read in the PTY's 4 KiB chunks."""

    pid = 0

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.at = 0

    async def read(self) -> bytes:
        chunk = bytes(self.view[self.at : self.at + 4096])
        self.at += len(chunk)
        await asyncio.sleep(0)  # a PTY read yields to the loop too
        return chunk

    async def wait(self) -> tuple[int, None]:
        return 0, None

    def close(self) -> None:
        pass


async def pump_once(
    server: EmbeddedNats, work: Path, source: Path, redactor: Redactor | None, data: bytes | None
) -> tuple[float, float]:
    """Wall and CPU seconds to pump `source` through an agent process (from memory when `data` is given)."""
    nc = await connect(server)
    log_path = work / f"attempt-{time.monotonic_ns()}.log"
    process = AgentProcess(
        adapter=CatAdapter(source),
        invocation=AgentInvocation(prompt="", repo=work),
        extra_env={"OPENAI_API_KEY": SECRET},
        cwd=work,
        log_path=log_path,
        subject="numerus.log.BENCH.t1",
        nc=nc,
        chunk_bytes=32 * 1024,
        flush_s=0.1,
        redactor=redactor,
    )
    if redactor is None:
        process.redacted = Passthrough()  # type: ignore[assignment]

    async def nothing(events: list[EventData]) -> None:
        pass

    started, cpu = time.perf_counter(), time.process_time()
    if data is None:
        await process.spawn()
    else:
        process.terminal = MemoryTerminal(data)  # type: ignore[assignment]
    await process.pump(nothing)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    await nc.flush()
    await nc.close()
    if redactor is not None:
        assert SECRET.encode() not in log_path.read_bytes(), "the secret reached the run log"
        assert process.redacted.counts["OPENAI_API_KEY"] > 0
    log_path.unlink()
    return seconds, cpu


async def ask_status(url: str, user: str, password: str) -> None:
    """A user's `status` in a loop until standard input closes; prints the latencies (ms) as a JSON list."""
    nc = await nats.connect(url, user=user, password=password)
    closed = asyncio.ensure_future(asyncio.to_thread(sys.stdin.read))
    latencies = []
    while not closed.done():
        sent = time.perf_counter()
        await nc.request("numerus.cmd.status", b'{"job": "BENCH"}', timeout=5)
        latencies.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(0.002)
    await nc.close()
    print(json.dumps(latencies))


async def main(megabytes: int, rounds: int) -> None:
    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="numerus-bench-redaction-") as tmp:
        work = Path(tmp)
        source = work / "output.txt"
        size = output_file(source, megabytes, TYPICAL)
        nc = await connect(server)
        await ensure_streams(nc.jetstream())
        now = datetime.now(UTC)
        state = JobState(id="BENCH", goal="benchmark", repo="/srv/repo", agent="cat", created=now, updated=now)
        encoder = msgspec.json.Encoder()

        async def status(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(encoder.encode(StatusReply(jobs=[job_view(state)])))

        await nc.subscribe("numerus.cmd.status", cb=status)
        await nc.flush()
        redactor = Redactor(known_secrets([({"OPENAI_API_KEY": SECRET}, ())], environ={}))
        data = source.read_bytes()
        ask = [sys.executable, __file__, "--ask", server.url, server.user, server.password]
        asker = subprocess.Popen(ask, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        await asyncio.sleep(3)
        out, _ = await asyncio.to_thread(asker.communicate, b"")
        idle = json.loads(out)
        asker = subprocess.Popen(ask, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        plain, redacted, redacted_cpu = [], [], []
        for _ in range(rounds):
            seconds, _ = await pump_once(server, work, source, None, data)
            plain.append(size / seconds / 1e6)
            seconds, cpu = await pump_once(server, work, source, redactor, data)
            redacted.append(size / seconds / 1e6)
            redacted_cpu.append(size / cpu / 1e6)
        out, _ = await asyncio.to_thread(asker.communicate, b"")
        pty_seconds, _ = await pump_once(server, work, source, redactor, None)
        dense = work / "dense.txt"
        dense_size = output_file(dense, megabytes // 4, DENSE)
        dense_seconds, _ = await pump_once(server, work, dense, redactor, dense.read_bytes())
        await nc.close()
    during = json.loads(out)
    report(
        "redaction",
        mb=round(size / 1e6),
        redacted_mb_s=round(statistics.median(redacted), 1),
        baseline_mb_s=round(statistics.median(plain), 1),
        ratio=round(statistics.median(redacted) / statistics.median(plain), 3),
        redacted_cpu_mb_s=round(statistics.median(redacted_cpu), 1),
        dense_mb_s=round(dense_size / dense_seconds / 1e6, 1),
        pty_mb_s=round(size / pty_seconds / 1e6, 1),
        status_requests=len(during),
        status_p50_ms=round(percentile(during, 50), 2),
        status_p99_ms=round(percentile(during, 99), 2),
        status_idle_p99_ms=round(percentile(idle, 99), 2),
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ask"]:
        asyncio.run(ask_status(*sys.argv[2:5]))
        sys.exit(0)
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="megabytes of agent output per run")
    parser.add_argument("--rounds", type=int, default=3, help="baseline and redacted runs, alternating")
    args = parser.parse_args()
    run(lambda: main(args.mb, args.rounds), args.loop)
