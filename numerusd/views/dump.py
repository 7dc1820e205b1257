"""Every view's rows in a stable order: what "the same views" means, and what a rebuild must reproduce.

`dump(path)` is how a rebuild is checked against the live views (`numerusd rebuild --to FILE`, then compare) and
how the tests read what the projector wrote. The daemon itself never reads the views: `status` is answered from
its own fold of the stream, `events` from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from numerusd.errors import StoreError
from numerusd.views.database import translated

_DUMP_QUERIES = {
    "jobs": "SELECT * FROM jobs ORDER BY id",
    "tasks": "SELECT * FROM tasks ORDER BY job, id",
    "events": "SELECT * FROM events ORDER BY seq",
    "rejected": "SELECT * FROM rejected ORDER BY seq",
    "position": "SELECT seq FROM position",
}


async def dump(db: str | Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every view's rows in a stable order, by table name: two databases hold the same views iff equal."""
    path = Path(db)
    if not path.exists():
        raise StoreError(f"projection database {path} does not exist", path=str(path))
    with translated("dump the views", path):
        return await asyncio.to_thread(_dump, path)


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {name: conn.execute(query).fetchall() for name, query in _DUMP_QUERIES.items()}
