"""The views' rows: job and task states turned into rows, and the multi-row INSERTs that write a batch of them.

A batch's rows and its stream position are written by `write_batch`, in the database's thread, as one transaction:
both or neither (pyeventsourcing's `SQLiteProcessRecorder` does the same), so that after a crash the projector
resumes exactly where its last commit left off.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from numerusd.domain import JobState, shown_status
from numerusd.views.schema import SET_POSITION

_state_encoder = msgspec.json.Encoder()
_time_encoder = msgspec.json.Encoder()

#: A batch's statements: each statement with its parameter lists, as `Insert.statements` gives them.
Statements = list[tuple[str, list[list[Any]]]]


def utc_text(moment: datetime | None) -> str | None:
    """A time as fixed-width UTC text (`2024-05-01T12:00:00.000000Z`), so text order is time order."""
    if moment is None:
        return None
    if moment.tzinfo is not UTC:
        # Naive times are read as UTC: the daemon writes only aware ones, this keeps old or foreign ones usable.
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    # msgspec's encoder is ~10x faster than isoformat(); it omits the fraction when it is zero.
    text = _time_encoder.encode(moment)
    if len(text) == 22:
        return text[1:-2].decode() + ".000000Z"
    return text[1:-1].decode()


def job_row(state: JobState) -> tuple[Any, ...]:
    """A job's row in `jobs`, its whole state included as JSON."""
    return (
        state.id,
        state.goal,
        state.repo,
        state.agent,
        shown_status(state),
        state.reason,
        utc_text(state.created),
        utc_text(state.updated),
        state.events,
        _state_encoder.encode(state).decode(),
    )


def changed_task_rows(state: JobState, before: JobState | None) -> Iterator[tuple[Any, ...]]:
    """Rows of the tasks `evolve` replaced since `before`: it shares unchanged TaskState objects, so `is` tells."""
    old = before.tasks if before is not None else {}
    for ord, (task_id, task) in enumerate(state.tasks.items()):
        if old.get(task_id) is task:
            continue
        yield (
            state.id,
            task_id,
            ord,
            task.title,
            task.agent,
            task.role,
            task.status,
            task.attempt,
            task.pid,
            task.exit_code,
            task.reason,
            task.thread_id,
            task.input_tokens,
            task.cached_input_tokens,
            task.output_tokens,
            task.log_path,
            utc_text(task.started),
            utc_text(task.ended),
        )


class Insert:
    """An INSERT of many rows per statement: `statements(rows)` gives each statement and its parameter lists.

    Rows go to SQLite in multi-row `VALUES` statements of `largest` rows, the rest in pieces of power-of-two
    sizes, so a few statement shapes (which stay in sqlite3's statement cache) serve every batch, and a one-event
    live batch is one one-row statement. Against one-row executemany this halves SQLite's CPU per row. Larger
    statements cost more CPU per row, and the `SELECT * FROM (VALUES …)` form that pads the last one with NULL
    rows (used before) cost SQLite 0.6 s more per 100k events. Each statement hands the GIL to and fro once
    (about 25 per 5,000-event batch); in alternating 100k rebuilds that was no slower than 1,024 or 4,096 rows.
    """

    def __init__(self, table: str, columns: str, conflict: str = "", largest: int = 256) -> None:
        self.table, self.columns, self.conflict = table, columns, conflict
        self.width = len(columns.split(","))
        self.largest = largest
        self._sql: dict[int, str] = {}

    def fitted(self, max_params: int) -> Insert:
        """This insert with statements small enough for SQLite's limit on parameters per statement."""
        largest = 1
        while largest * 2 <= min(self.largest, max_params // self.width):
            largest *= 2
        return Insert(self.table, self.columns, self.conflict, largest)

    def statements(self, rows: Sequence[tuple[Any, ...]]) -> Iterator[tuple[str, list[list[Any]]]]:
        """(statement, parameter lists): the rows, flattened, a statement's worth per list."""
        at, size = 0, self.largest
        while at < len(rows):
            count = (len(rows) - at) // size
            if count:
                end = at + count * size
                params = [[value for row in rows[i : i + size] for value in row] for i in range(at, end, size)]
                yield self._statement(size), params
                at = end
            size //= 2

    def _statement(self, size: int) -> str:
        sql = self._sql.get(size)
        if sql is None:
            row = f"({', '.join('?' * self.width)})"
            values = ", ".join([row] * size)
            sql = self._sql[size] = f"INSERT INTO {self.table} ({self.columns}) VALUES {values} {self.conflict}"
        return sql


#: The inserts of `jobs`, `tasks`, `events` and `rejected`, in that order. Jobs, tasks and rejections are upserts:
#: a job or task is written again whenever it changes, a message rejected again (after a restart) is the same row.
INSERTS = (
    Insert(
        "jobs",
        "id, goal, repo, agent, status, reason, created, updated, events, state",
        "ON CONFLICT (id) DO UPDATE SET goal = excluded.goal, repo = excluded.repo, agent = excluded.agent, "
        "status = excluded.status, reason = excluded.reason, created = excluded.created, "
        "updated = excluded.updated, events = excluded.events, state = excluded.state",
    ),
    Insert(
        "tasks",
        "job, id, ord, title, agent, role, status, attempt, pid, exit_code, reason, thread_id, input_tokens, "
        "cached_input_tokens, output_tokens, log_path, started, ended",
        "ON CONFLICT (job, id) DO UPDATE SET ord = excluded.ord, title = excluded.title, agent = excluded.agent, "
        "role = excluded.role, status = excluded.status, attempt = excluded.attempt, pid = excluded.pid, "
        "exit_code = excluded.exit_code, reason = excluded.reason, thread_id = excluded.thread_id, "
        "input_tokens = excluded.input_tokens, cached_input_tokens = excluded.cached_input_tokens, "
        "output_tokens = excluded.output_tokens, log_path = excluded.log_path, started = excluded.started, "
        "ended = excluded.ended",
    ),
    Insert("events", "seq, id, job, task, type, time, subject"),
    Insert(
        "rejected",
        "seq, subject, reason, message",
        "ON CONFLICT (seq) DO UPDATE SET subject = excluded.subject, reason = excluded.reason, "
        "message = excluded.message",
    ),
)


def write_batch(conn: sqlite3.Connection, statements: Statements, last_seq: int, epoch: int) -> None:
    """In the database's thread: a batch's rows and its position (with the highest writer epoch seen up to it), in
    one transaction (rolled back on failure)."""
    # The sqlite3 module opens the transaction itself before the first insert (legacy transaction control).
    try:
        for statement, params in statements:
            conn.executemany(statement, params)
        conn.execute(SET_POSITION, (last_seq, epoch))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
