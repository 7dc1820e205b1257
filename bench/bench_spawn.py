"""How long starting an agent takes while the daemon is small and once it holds ~1 GiB: spawn must not grow with it.

    python bench/bench_spawn.py [--spawns 200] [--big-mib 1024] [--block 20] [--quick]

This process plays the daemon. Each spawn starts `printf x`, a child that writes one byte and exits, and is
timed twice: until its pid is known (the spawning call returned) and until its first output has been read; then
the output is drained and the child reaped, so nothing is left behind. Four ways to spawn, in the same run:

- `spawn`: `numerusd.terminal.spawn` under uvloop, as the daemon runs it (vfork via `subprocess.Popen`, then
  util-linux `setsid --ctty`, a PTY from `os.openpty()`);
- `ptyprocess`: `ptyprocess.PtyProcess.spawn`, which forks the whole process to get its PTY;
- `asyncio` and `uvloop`: `asyncio.create_subprocess_exec` with a stdout pipe under the default event loop
  and under uvloop.

Every way is measured at small resident memory and while the process has mapped and written `--big-mib` MiB
of private anonymous memory in 4 KiB pages (what a grown Python heap is to `fork()`: page tables to copy). That
size is capped to half of what the machine (and this process's cgroup) has available, and the figures say what
was used. Ways and sizes take turns in blocks of `--block` spawns (the memory is written anew for each big
block), so a burst of load on the machine hits them alike. Reports the median and p99 in milliseconds.

Targets (issue 3): `spawn` p50 at the big size at most 1.5 times its p50 at the small size, and its p99 at the
big size at most 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, report, run
from ptyprocess import PtyProcess

from numerusd.terminal import spawn

MIB = 1024 * 1024
#: The child: one byte of output, then exit. A program, not a shell builtin, so every way execs the same thing.
CHILD = [shutil.which("printf") or "/usr/bin/printf", "x"]
WARMUP = 5

#: One sample: (ms until the pid is known, ms until the first output was read).
Sample = tuple[float, float]
#: The samples of each way at one size.
Samples = dict[str, list[Sample]]
#: A blocking call making `n` spawns in `cwd` and appending their samples to `out`.
Way = Callable[[int, Path, list[Sample]], None]


async def spawn_block(n: int, cwd: Path, out: list[Sample]) -> None:
    """`n` spawns through `numerusd.terminal.spawn`, on whatever loop runs this."""
    for _ in range(n):
        started = time.perf_counter()
        terminal = await spawn(CHILD, cwd=cwd)
        pid_known = time.perf_counter()
        first = await terminal.read()
        output = time.perf_counter()
        assert first.startswith(b"x"), first
        try:
            while await terminal.read():
                pass
            assert await terminal.wait() == (0, None)
        finally:
            terminal.close()
        out.append(_sample(started, pid_known, output))


async def asyncio_block(n: int, cwd: Path, out: list[Sample]) -> None:
    """`n` spawns through `asyncio.create_subprocess_exec`, on whatever loop runs this."""
    for _ in range(n):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *CHILD, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        pid_known = time.perf_counter()
        assert process.stdout is not None and process.pid > 0
        first = await process.stdout.read(1)
        output = time.perf_counter()
        assert first == b"x", first
        await process.stdout.read()
        assert await process.wait() == 0
        out.append(_sample(started, pid_known, output))


def ptyprocess_block(n: int, cwd: Path, out: list[Sample]) -> None:
    """`n` spawns through `ptyprocess.PtyProcess.spawn` (blocking, as it is)."""
    for _ in range(n):
        started = time.perf_counter()
        process = PtyProcess.spawn(CHILD, cwd=str(cwd))
        pid_known = time.perf_counter()
        try:
            first = process.read(1)
            output = time.perf_counter()
            assert first == b"x", first
            try:
                while process.read():
                    pass
            except EOFError:
                pass
            assert process.wait() == 0
        finally:
            process.delayafterclose = 0  # close() sleeps 0.1 s by default to let a child die; ours is reaped
            process.close()
        out.append(_sample(started, pid_known, output))


def _sample(started: float, pid_known: float, output: float) -> Sample:
    return (pid_known - started) * 1000, (output - started) * 1000


def _on_loop(loop: str, block: Callable[[int, Path, list[Sample]], Coroutine[Any, Any, None]]) -> Way:
    def runner(n: int, cwd: Path, out: list[Sample]) -> None:
        run(partial(block, n, cwd, out), loop)

    return runner


#: Each way of spawning, in the order they take turns.
WAYS: dict[str, Way] = {
    "spawn": _on_loop("uvloop", spawn_block),
    "ptyprocess": ptyprocess_block,
    "asyncio": _on_loop("asyncio", asyncio_block),
    "uvloop": _on_loop("uvloop", asyncio_block),
}


def measure(spawns: int, block: int, big_mib: int, cwd: Path) -> tuple[dict[str, Samples], float, float]:
    """`spawns` samples of every way at the small and at the big size; the resident memory of each size, in MB.

    In rounds: one block of each way at the small size, then the ballast is written, one block of each way at the
    big size, and the ballast is unmapped again. So load on the machine that comes and goes hits both sizes alike,
    rather than whichever size was measured while it lasted.
    """
    for way in WAYS.values():
        way(WARMUP, cwd, [])
    small: Samples = {name: [] for name in WAYS}
    big: Samples = {name: [] for name in WAYS}
    small_rss = big_rss = 0.0
    done = 0
    while done < spawns:
        n = min(block, spawns - done)
        small_rss = max(small_rss, rss_mb())
        for name, way in WAYS.items():
            way(n, cwd, small[name])
        with ballast(big_mib):
            big_rss = max(big_rss, rss_mb())
            for name, way in WAYS.items():
                way(n, cwd, big[name])
        done += n
    return {"small": small, "big": big}, small_rss, big_rss


def safe_big_mib(asked: int) -> tuple[int, str]:
    """How much to allocate: `asked` MiB, or half the memory available if that is less; and why."""
    available = [_meminfo_kib("MemAvailable") * 1024]
    available += _cgroup_headroom()
    safe = min(available) // 2 // MIB // 64 * 64
    if safe < 64:
        raise SystemExit(f"only {min(available) // MIB} MiB of memory available: not enough for the big size")
    if asked <= safe:
        return asked, "as asked"
    print(f"bench_spawn: {asked} MiB asked, {safe} MiB used (half of what is available)", file=sys.stderr)
    return safe, f"capped from {asked} (half of available memory)"


def ballast(mib: int) -> mmap.mmap:
    """`mib` MiB of private anonymous memory in small pages, every page written, so it is resident."""
    memory = mmap.mmap(-1, mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        # Where transparent huge pages are always on, 2 MiB pages would make fork's page-table copy 512 times
        # smaller than for a heap of Python objects, which is what a grown daemon holds.
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    chunk = b"\x5a" * MIB
    for _ in range(mib):
        memory.write(chunk)
    return memory


def rss_mb() -> float:
    return round(_status_kib("VmRSS") / 1024, 1)


def children() -> list[str]:
    """Pids of this process's children still there (running or zombie), over all its threads."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has just ended
            found += (task / "children").read_text().split()
    return found


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def p99(values: list[float]) -> float:
    return round(percentile(values, 99), 3)


def figures(phases: dict[str, Samples]) -> dict[str, float]:
    """p50 and p99 of each way at each size until the pid is known, and p50 (and for spawn p99) until output."""
    shown: dict[str, float] = {}
    for name in WAYS:
        for phase, samples in phases.items():
            pid_ms = [pid for pid, _ in samples[name]]
            output_ms = [output for _, output in samples[name]]
            shown[f"{name}_{phase}_ms_p50"] = p50(pid_ms)
            shown[f"{name}_{phase}_ms_p99"] = p99(pid_ms)
            shown[f"{name}_{phase}_output_ms_p50"] = p50(output_ms)
            if name == "spawn":  # the baselines' tails until output add nothing their pid tails do not say
                shown[f"{name}_{phase}_output_ms_p99"] = p99(output_ms)
    return shown


def _meminfo_kib(field: str) -> int:
    return _field_kib(Path("/proc/meminfo"), field)


def _status_kib(field: str) -> int:
    return _field_kib(Path("/proc/self/status"), field)


def _field_kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in {path}")


def _cgroup_headroom() -> list[int]:
    """Bytes this process's cgroup may still take, if it has a limit (cgroup v2 or v1)."""
    headroom = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            limit, usage = Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max"), "memory.current"
        elif "memory" in controllers.split(","):
            limit = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
            usage = "memory.usage_in_bytes"
        else:
            continue
        try:
            raw = limit.read_text().strip()
            if raw != "max":
                headroom.append(int(raw) - int((limit.parent / usage).read_text()))
        except (OSError, ValueError):
            pass
    return headroom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spawns", type=int, help="spawns per way and size (default 200, 100 with --quick)")
    parser.add_argument("--big-mib", type=int, help="resident memory of the big size (default 1024, 512 with --quick)")
    parser.add_argument("--block", type=int, default=20, help="spawns of one way before the next takes its turn")
    parser.add_argument("--quick", action="store_true", help="fewer spawns and a smaller big size, for a smoke run")
    args = parser.parse_args()
    spawns = args.spawns or (100 if args.quick else 200)
    big_mib, big_note = safe_big_mib(args.big_mib or (512 if args.quick else 1024))
    with tempfile.TemporaryDirectory(prefix="numerus-bench-spawn-") as tmp:
        phases, small_rss, big_rss = measure(spawns, args.block, big_mib, Path(tmp))
    left = children()
    if left:
        raise SystemExit(f"children left unreaped: {' '.join(left)}")
    measured = figures(phases)
    report(
        "spawn",
        spawns=spawns,
        big_mib=big_mib,
        big_note=big_note,
        small_rss_mb=small_rss,
        big_rss_mb=big_rss,
        growth_ratio=round(measured["spawn_big_ms_p50"] / measured["spawn_small_ms_p50"], 2),
        ptyprocess_growth_ratio=round(measured["ptyprocess_big_ms_p50"] / measured["ptyprocess_small_ms_p50"], 2),
        **measured,
    )


if __name__ == "__main__":
    main()
