"""`numerusctl top`: a live terminal view of the jobs, their tasks and the selected task's terminal (textual).

Fed by the events, never by polling: the view opens an ordered consumer on `numerus.job.>` (only what is stored
from then on), asks `status` once for the jobs and once for each live job's tasks (the starting picture), then
folds every event into its `top_model.Board` as it arrives and redraws the cells that changed at most every
REDRAW_S. Selecting a task follows its terminal output (`numerus.log.<job>.<task>`, from its attempt's start on)
in the pane below, escaped as `logs` shows it; selecting an ended job whose tasks are not known asks its status
once.

Keys: arrows select, `q` quits, and the keys of `top_model.ACTIONS` send their verb for the selection (the
job, or the selected task where the verb takes one): a key whose verb the protocol lacks is not shown. The
reply is said on the status line (a diff goes to the pane). Only this module
imports textual, and only `numerusctl top` imports this module.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
from nats.aio.client import Client
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import DataTable, Footer, Log, Static
from textual.widgets.data_table import ColumnKey
from textual.worker import Worker

from numerusctl import render
from numerusctl.connection import CtlError, decode_reply, os_user, request
from numerusctl.feed import StreamFeed
from numerusctl.top_model import ACTIONS, Board, actions, columns, job_cells, request_for, show_cost, task_cells
from numerusd.protocol import subjects
from numerusd.protocol.commands import JOB_DONE, REQUESTS, GetStatus, StatusReply

#: The least time between two redraws of the table, however fast events come.
REDRAW_S = 0.25
#: Jobs shown at start (newest first); jobs submitted later are added as they come.
START_JOBS = 50
_any_json = msgspec.json.Decoder()


class TopApp(App[int]):
    """The live view over one NATS connection; see the module docstring."""

    TITLE = "numerus top"
    CSS = """
    #table { height: 3fr; }
    #pane-title { height: 1; background: $boost; }
    #pane { height: 2fr; }
    #line { height: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        *(Binding(action.key, f"send('{action.verb}')", action.label) for action in ACTIONS),
    ]

    def __init__(self, nc: Client, *, timeout: float, requests: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.nc = nc
        self.timeout = timeout
        self.requests = REQUESTS if requests is None else requests
        self._available = {action.verb: action for action in actions(self.requests)}
        self.board = Board()
        self._dirty = False
        self._drawn_cost: bool | None = None
        self._drawn: dict[str, list[str]] = {}
        self._drawn_at = 0.0
        self._columns: list[ColumnKey] = []
        self._following: Worker[None] | None = None
        self._followed: str | None = None
        self._asked: set[str] = set()
        #: Set once the starting picture is drawn: tests and the benchmark wait for it.
        self.ready = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
            yield Static("select a task to follow its terminal", id="pane-title", markup=False)
            yield Log(id="pane", max_lines=5000)
            yield Static("", id="line", markup=False)
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A verb's key: shown if the protocol has the verb, else hidden."""
        return action != "send" or str(parameters[0]) in self._available

    async def on_mount(self) -> None:
        self.run_worker(self._follow_events(), name="events", exit_on_error=False)
        self.set_interval(REDRAW_S, self._redraw_if_needed)

    # --- the feed -------------------------------------------------------------------------------------------

    async def _follow_events(self) -> None:
        try:
            async with StreamFeed(self.nc, subjects.EVENTS, subjects.job_events(), only="new") as feed:
                await self._starting_picture()
                self.ready = True
                async for batch in feed.forever():
                    for stored in batch:
                        if self.board.apply(stored.data) is not None:
                            self._dirty = True
        except CtlError as e:
            self._say(f"the feed stopped: {e.message}")

    async def _starting_picture(self) -> None:
        reply: StatusReply = decode_reply(
            "status", await request(self.nc, "status", GetStatus(limit=START_JOBS), self.timeout)
        )
        self.board.load(reply.jobs)
        for job in reply.jobs:
            if job.status not in JOB_DONE:
                await self._load_job(job.id)
        self._redraw()

    async def _load_job(self, job_id: str) -> None:
        self._asked.add(job_id)
        data = await request(self.nc, "status", GetStatus(job=job_id), self.timeout)
        reply: StatusReply = decode_reply("status", data)
        self.board.load(reply.jobs)
        self._dirty = True

    # --- drawing --------------------------------------------------------------------------------------------

    def _redraw_if_needed(self) -> None:
        """Redraw what changed; once a second anyway while a task runs (its elapsed time moves)."""
        if self._dirty:
            self._redraw()
            return
        running = any(task.status == "running" for job in self.board.jobs.values() for task in job.tasks.values())
        if running and time.monotonic() - self._drawn_at >= 1.0:
            self._redraw()

    def _redraw(self) -> None:
        """The table as the board is now: only the cells that changed are updated while the rows stay the same
        (a redraw of every row four times a second would cost the view more than all the rest)."""
        self._dirty = False
        self._drawn_at = time.monotonic()
        table = self.query_one(DataTable)
        now = datetime.now(UTC)
        cost = show_cost(self.board)
        rows: dict[str, list[str]] = {}
        for job in self.board.ordered():
            rows[job.id] = job_cells(job, now, cost)
            for task in job.tasks.values():
                rows[f"{job.id}/{task.id}"] = task_cells(task, now, cost)
        if cost == self._drawn_cost and list(rows) == list(self._drawn):
            for key, cells in rows.items():
                for column, (old, new) in zip(self._columns, zip(self._drawn[key], cells, strict=True), strict=True):
                    if old != new:
                        table.update_cell(key, column, Content(new))
            self._drawn = rows
            return
        selected = self._selected_key()
        if cost != self._drawn_cost:
            table.clear(columns=True)
            self._columns = table.add_columns(*columns(cost))
            self._drawn_cost = cost
        else:
            table.clear()
        for key, cells in rows.items():
            table.add_row(*map(Content, cells), key=key)
        self._drawn = rows
        if selected in rows:
            table.move_cursor(row=list(rows).index(selected), scroll=False)

    def _selected_key(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        with contextlib.suppress(Exception):  # no row under the cursor yet
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return None

    def selection(self) -> tuple[str, str | None] | None:
        """(job, task or None) under the cursor."""
        key = self._selected_key()
        if key is None:
            return None
        job, _, task = key.partition("/")
        return job, task or None

    def _say(self, line: str) -> None:
        self.query_one("#line", Static).update(render.visible(render.cut(line, 300)))

    # --- the selection and its terminal ---------------------------------------------------------------------

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        selected = self.selection()
        if selected is None:
            return
        job, task = selected
        row = self.board.jobs.get(job)
        if task is None and row is not None and not row.tasks_known and job not in self._asked:
            self.run_worker(self._load_job(job), exit_on_error=False)
        if task is not None and f"{job}/{task}" != self._followed:
            self._follow_terminal(job, task)

    def _follow_terminal(self, job: str, task: str) -> None:
        if self._following is not None:
            self._following.cancel()
        self._followed = f"{job}/{task}"
        self.query_one("#pane-title", Static).update(f"terminal of {job} {task}")
        self.query_one(Log).clear()
        self._following = self.run_worker(self._copy_terminal(job, task), exit_on_error=False)

    async def _copy_terminal(self, job: str, task: str) -> None:
        pane = self.query_one(Log)
        shown = render.VisibleStream()  # agents' output is escaped: it must not drive this terminal
        row = self.board.jobs[job].tasks.get(task) if job in self.board.jobs else None
        started = row.started if row is not None else None
        # Its current attempt's output (the stream keeps it while its limits allow), else its last chunk.
        subject = subjects.task_log(job, task)
        if started is not None:
            feed = StreamFeed(self.nc, subjects.LOGS, subject, since=started)
        else:
            feed = StreamFeed(self.nc, subjects.LOGS, subject, only="last")
        async with feed:
            async for batch in feed.forever():
                pane.write("".join(shown.feed(stored.data) for stored in batch))

    # --- the keys -------------------------------------------------------------------------------------------

    def action_send(self, verb: str) -> None:
        """Send `verb` for the selection (the key's action), its answer on the status line."""
        selected = self.selection()
        action = self._available.get(verb)
        if selected is None or action is None:
            return
        job, task = selected
        if action.needs_task and task is None:
            self._say(f"{verb}: select a task first")
            return
        self.run_worker(self._send(verb, job, task if action.takes_task else None), exit_on_error=False)

    async def _send(self, verb: str, job: str, task: str | None) -> None:
        try:
            body = request_for(self.requests[verb], job, task, os_user())
            data = await request(self.nc, verb, body, self.timeout)
        except (CtlError, ValueError) as e:
            self._say(f"{verb}: {e.message if isinstance(e, CtlError) else e}")
            return
        if verb == "diff":
            self._show_diff(job, data)
        elif verb == "kill":
            self._say(render.kill_text(decode_reply("kill", data)))
        else:
            self._say(f"{verb} {job}{' ' + task if task else ''}: done")

    def _show_diff(self, job: str, data: bytes) -> None:
        """The diff's text in the pane: the reply's longest text field (its shape is the diff verb's own)."""
        reply = _any_json.decode(data)
        texts = [value for value in reply.values() if isinstance(value, str)] if isinstance(reply, dict) else []
        self._followed = None
        if self._following is not None:
            self._following.cancel()
        self.query_one("#pane-title", Static).update(f"diff of {job}")
        pane = self.query_one(Log)
        pane.clear()
        pane.write(render.visible(max(texts, key=len) if texts else data.decode(errors="replace")))


async def run_top(nc: Client, timeout: float) -> int:
    """Run the view in the user's terminal until they quit."""
    return await TopApp(nc, timeout=timeout).run_async() or 0
