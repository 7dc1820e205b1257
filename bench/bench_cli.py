"""What a cold `numerusctl status` costs against the least any client could pay: a bare nats-py request.

    python bench/bench_cli.py [--pairs 20]

Starts the real `numerusd` (embedded NATS) on a fresh state directory, then, pair by pair, times two fresh
processes of the same Python from start to exit: `numerusctl --state-dir S status`, and a bare client of a few
lines (read `connection.json`, connect with its credentials, `nc.request("numerus.cmd.status", b"{}")`, print
the reply, close). Both read the same file, ask the same endpoint of the same daemon and print what it answers,
so what is left between them is what numerusctl adds: its imports (click, msgspec, the protocol types, its own
modules), its options, decoding the reply and rendering it. The order within a pair alternates, so a change of
load on the machine weighs on both; one pair of each is run first, uncounted, to warm the page cache and write
the bytecode. Both run from bytecode, as an installed numerusctl does (pip compiles it at install): a
`PYTHONDONTWRITEBYTECODE` in the environment is left out of theirs, or every run would compile numerusctl's
sources again and measure the compiler.

Reports the median of the pairs' wall-time ratios (numerusctl / bare; target <= 1.0), their spread (lowest,
highest), the median wall time of each; the same for the CPU time (user + system) each process used, which a
busy machine disturbs far less than the wall time; and the median import time of `numerusctl.cli` in a fresh
interpreter.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report

BIN = Path(sys.executable).parent

#: The bare client: nothing but nats-py and the standard library, as small as a status request can be.
BARE_CLIENT = """\
import asyncio, json, sys
import nats

async def main(path):
    with open(path, "rb") as f:
        c = json.load(f)
    # The operator's login reads replies in the operator's inbox only (numerusd/bus_roles.py).
    nc = await nats.connect(
        c["url"], user=c["user"], password=c["password"], allow_reconnect=False, inbox_prefix="_INBOX_operator"
    )
    reply = await nc.request("numerus.cmd.status", b"{}", timeout=5)
    sys.stdout.write(reply.data.decode() + "\\n")
    await nc.close()

asyncio.run(main(sys.argv[1]))
"""


#: The children's environment: this one, but free to write bytecode.
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of `argv` from its start to its exit; it must exit 0."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, env=ENV)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return wall, _children_cpu() - cpu


def import_ms() -> float:
    """Milliseconds to import `numerusctl.cli` in a fresh interpreter, as `-X importtime` counts them."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import numerusctl.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=ENV,
    )
    last = [line for line in done.stderr.splitlines() if line.rstrip().endswith("| numerusctl.cli")][-1]
    return int(last.split("|")[1]) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20, help="pairs of runs, in alternating order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="numerus-bench-cli-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        bare_script = Path(tmp) / "bare_status.py"
        bare_script.write_text(BARE_CLIENT)
        log = open(state / "numerusd.stderr", "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen(
            [str(BIN / "numerusd"), "--state-dir", str(state), "--log-level", "warning"], stdout=log, stderr=log
        )
        try:
            connection = state / "connection.json"
            while not connection.exists():
                if daemon.poll() is not None:
                    raise SystemExit(f"numerusd exited with {daemon.returncode}")
                time.sleep(0.05)
            ctl = [str(BIN / "numerusctl"), "--state-dir", str(state), "status"]
            bare = [sys.executable, str(bare_script), str(connection)]
            timed(ctl), timed(bare)  # warm-up: the page cache, the daemon's first answer
            ctl_s: list[tuple[float, float]] = []
            bare_s: list[tuple[float, float]] = []
            for pair in range(args.pairs):
                if pair % 2 == 0:
                    ctl_s.append(timed(ctl))
                    bare_s.append(timed(bare))
                else:
                    bare_s.append(timed(bare))
                    ctl_s.append(timed(ctl))
            imports = [import_ms() for _ in range(5)]
        finally:
            daemon.terminate()
            daemon.wait(30)
            log.close()
    ratios = sorted(c[0] / b[0] for c, b in zip(ctl_s, bare_s, strict=True))
    cpu_ratios = sorted(c[1] / b[1] for c, b in zip(ctl_s, bare_s, strict=True))
    report(
        "cli",
        pairs=args.pairs,
        ratio=round(statistics.median(ratios), 3),
        ratio_low=round(ratios[0], 3),
        ratio_high=round(ratios[-1], 3),
        ctl_ms_p50=round(statistics.median(c[0] for c in ctl_s) * 1000, 1),
        bare_ms_p50=round(statistics.median(b[0] for b in bare_s) * 1000, 1),
        cpu_ratio=round(statistics.median(cpu_ratios), 3),
        cpu_ratio_low=round(cpu_ratios[0], 3),
        cpu_ratio_high=round(cpu_ratios[-1], 3),
        ctl_cpu_ms_p50=round(statistics.median(c[1] for c in ctl_s) * 1000, 1),
        bare_cpu_ms_p50=round(statistics.median(b[1] for b in bare_s) * 1000, 1),
        import_cli_ms_p50=round(statistics.median(imports), 1),
    )


if __name__ == "__main__":
    main()
