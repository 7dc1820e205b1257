"""The tests' reading of the SQLite views, in plain SQL: what a job, its events and the rejections look like there.

The daemon never reads its views back (`status` answers from its own fold), so these reads live with the tests
that check what the projector wrote; `numerusd.views.dump` gives every row for whole-file comparisons.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from numerusd import domain
from numerusd.protocol.commands import JobView


def _rows(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(query, params).fetchall()


def job_views(path: Path, job: str | None = None) -> list[JobView]:
    """One job, or every job newest first, as `status` shows it: `domain.job_view` of the stored state."""
    if job is None:
        rows = _rows(path, "SELECT state FROM jobs ORDER BY created DESC, id DESC")
    else:
        rows = _rows(path, "SELECT state FROM jobs WHERE id = ?", (job,))
    return [domain.job_view(msgspec.json.decode(state, type=domain.JobState)) for (state,) in rows]


def job_state(path: Path, job: str) -> domain.JobState | None:
    """The stored domain state of one job (None if the views do not know it)."""
    rows = _rows(path, "SELECT state FROM jobs WHERE id = ?", (job,))
    return msgspec.json.decode(rows[0][0], type=domain.JobState) if rows else None


def event_index(path: Path, job: str, type: str | None = None, after_seq: int = 0) -> list[tuple[int, str]]:
    """(seq, subject) of the job's events (of `type` if given) after `after_seq`, through the index."""
    query = "SELECT seq, subject FROM events WHERE job = ? AND seq > ?"
    params: tuple[Any, ...] = (job, after_seq)
    if type is not None:
        query += " AND type = ?"
        params += (type,)
    return _rows(path, query + " ORDER BY seq", params)


def rejections(path: Path) -> list[tuple[int, str, str, str]]:
    """(seq, subject, reason, message) of every rejected message, in stream order."""
    return _rows(path, "SELECT seq, subject, reason, message FROM rejected ORDER BY seq")
