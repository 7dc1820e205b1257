"""How long 64 MB printed without a newline takes to get through, against the same bytes in 100-byte lines.

    python bench/bench_line.py [--mib 64] [--rounds 3]

An agent decides what it prints; one that prints 64 MB with no newline must cost what 64 MB costs, not stall
the daemon (issue 14, item 7). Two measurements, each of the long line and of the same bytes with a newline
every 100 bytes (the baseline), in alternating rounds, medians reported:

- `linebuffer`: `LineBuffer.feed` alone, fed the bytes in 64 KiB chunks (what a PTY read gives), every line
  handed to the codex parser as the daemon does;
- `pump`: the real output path: a child (`head -c … | tr`, or with `fold -w 99` for the baseline) prints in its
  own PTY, and `AgentProcess.pump` copies it to the run log and `numerus.log.<job>.<task>` on an embedded
  nats-server, splits it with `LineBuffer` and feeds the codex parser, until the child exits.

Target: the long line through the real path in under 2 s, and `pump_ratio` (long line / lines) reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import connect, embedded_nats, report, run

from numerusd.agents.base import AgentInvocation, LineBuffer
from numerusd.agents.codex import CodexOutputParser
from numerusd.protocol.events import EventData
from numerusd.supervisor import AgentProcess

CHUNK = 64 * 1024


class _Printer:
    """An agent adapter whose agent prints `size` bytes of `x`, as one line or folded into 100-byte lines."""

    name = "printer"

    def __init__(self, size: int, lines: bool) -> None:
        fold = " | fold -w 99" if lines else ""
        self.argv = ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x{fold}"]

    def command(self, invocation: AgentInvocation) -> tuple[list[str], dict[str, str]]:
        return self.argv, {}

    def parser(self, invocation: AgentInvocation) -> CodexOutputParser:
        return CodexOutputParser(repo=invocation.repo)


def through_linebuffer(data: bytes) -> float:
    parser = CodexOutputParser(repo=Path("/"))
    buffer = LineBuffer()
    started = time.perf_counter()
    for at in range(0, len(data), CHUNK):
        for line in buffer.feed(data[at : at + CHUNK]):
            parser.feed(line)
    for line in buffer.close():
        parser.feed(line)
    return time.perf_counter() - started


async def through_pump(nc, tmp: Path, size: int, lines: bool) -> float:
    invocation = AgentInvocation(prompt="", repo=tmp)
    process = AgentProcess(
        adapter=_Printer(size, lines),
        invocation=invocation,
        extra_env={},
        cwd=tmp,
        log_path=tmp / f"{'lines' if lines else 'line'}.log",
        subject="numerus.log.BENCH.t1",
        nc=nc,
        chunk_bytes=32 * 1024,
        flush_s=0.1,
    )
    started = time.perf_counter()
    await process.spawn()

    async def ignore(events: list[EventData]) -> None:
        return None

    outcome = await process.pump(ignore)
    elapsed = time.perf_counter() - started
    process.log_path.unlink()
    if outcome.log_bytes < size:
        raise SystemExit(f"only {outcome.log_bytes} of {size} bytes came through")
    return elapsed


async def main(args: argparse.Namespace) -> None:
    size = args.mib << 20
    line = b"x" * size
    lines = b"".join(b"x" * 99 + b"\n" for _ in range(size // 100))
    buffer_times: dict[bool, list[float]] = {False: [], True: []}
    pump_times: dict[bool, list[float]] = {False: [], True: []}
    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="numerus-bench-line-") as tmp:
        nc = await connect(server)
        try:
            for _ in range(args.rounds):
                for folded in (False, True):
                    buffer_times[folded].append(through_linebuffer(lines if folded else line))
                    pump_times[folded].append(await through_pump(nc, Path(tmp), size, folded))
        finally:
            await nc.close()
    median = {name: {k: statistics.median(v) for k, v in times.items()} for name, times in
              (("linebuffer", buffer_times), ("pump", pump_times))}  # fmt: skip
    report(
        "line",
        mib=args.mib,
        linebuffer_line_s=round(median["linebuffer"][False], 3),
        linebuffer_lines_s=round(median["linebuffer"][True], 3),
        linebuffer_ratio=round(median["linebuffer"][False] / median["linebuffer"][True], 2),
        pump_line_s=round(median["pump"][False], 3),
        pump_lines_s=round(median["pump"][True], 3),
        pump_ratio=round(median["pump"][False] / median["pump"][True], 2),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB printed")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    arguments = parser.parse_args()
    run(lambda: main(arguments))
