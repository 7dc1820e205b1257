"""Shared helpers for the benchmarks in `bench/`: a throwaway embedded nats-server, a timer and one result format.

Every benchmark prints its figures twice: as a markdown table row (to paste into `docs/benchmarks.md`) and as
one JSON line (for scripts that compare runs). Usage::

    with embedded_nats() as server:
        nc = await connect(server)
        with Stopwatch() as watch:
            ...
        report("append", n=n, msgs_per_s=n / watch.seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from numerusd.embedded_nats import EmbeddedNats


@contextlib.contextmanager
def embedded_nats(keep: Path | None = None) -> Iterator[EmbeddedNats]:
    """A nats-server with a fresh JetStream store in a temporary directory (or `keep`), stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="numerus-bench-") as tmp:
        server = EmbeddedNats(store_dir=(keep or Path(tmp)) / "nats")
        server.start()
        try:
            yield server
        finally:
            server.stop()


async def connect(server: EmbeddedNats, **options: Any) -> Client:
    """A nats-py connection to `server`, with the options the daemon uses unless overridden."""
    return await nats.connect(server.url, user=server.user, password=server.password, **options)


class Stopwatch:
    """Measures the wall time of a `with` block in `seconds`."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: the message count and the event loop."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=20_000, help="messages per measurement")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (numerusd uses uvloop)"
    )
    return parser


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "uvloop") -> None:
    """Run `main()` on the chosen event loop, the way numerusd would."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def environment() -> dict[str, str]:
    """What the figures depend on, recorded beside them."""
    return {"python": platform.python_version(), "machine": platform.machine(), "platform": sys.platform}


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest sample that `p` percent of the samples are at or below (`p` in 0-100]."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(len(ranked) * p / 100) - 1)]


def report(name: str, **figures: float | int | str) -> None:
    """Print one result as a markdown table (header and row) and as a JSON line."""
    keys = list(figures)
    cells = [_cell(figures[key]) for key in keys]
    print(f"| bench | {' | '.join(keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    print(f"| {name} | {' | '.join(cells)} |")
    print(json.dumps({"bench": name, **figures, **environment()}))


def _cell(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value
