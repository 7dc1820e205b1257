"""`numerusctl top`, driven headless (textual's pilot) against a real daemon running a scripted planned job.

The rows follow the job as its events come (planning, then task `a` running with its lock and `b` waiting for
`a`), a view started later draws the same from its one status request, the task's terminal shows in the pane,
and `k` kills the job. The keys come from one table checked against the protocol's verbs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from numerusctl.connection import connected, resolve_target
from numerusctl.top import TopApp
from numerusctl.top_model import Board, actions, request_for, show_cost, task_cells
from numerusd.protocol.commands import REQUESTS, JobView, KillJob, Request, TaskView
from tests.conftest import eventually
from tests.daemon_harness import Daemon, claim, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs a planned job

#: A planner's words are the agent's: Rich markup in a title is shown as written, never read (it crashed the view).
HOSTILE_TITLE = "Rewrite [/b] F [link=https://evil.invalid]here[/link]"

#: Two tasks on one file: `a` takes it and prints, then builds for long; `b` asks after it and waits for `a`.
TEAM = {
    "cases": [
        {
            "match": {"role": "planner"},
            "steps": [
                {"sleep": 0.5},
                {
                    "answer": {
                        "summary": "two tasks on one file",
                        "tasks": [
                            {"id": "a", "title": "Write F", "instructions": "write", "intents": []},
                            {"id": "b", "title": HOSTILE_TITLE, "instructions": "write", "intents": []},
                        ],
                    }
                },
            ],
        },
        {"match": {"role": "claimer", "task": "b"}, "steps": [{"sleep": 0.5}, {"answer": claim(("F.md", "create"))}]},
        {"match": {"role": "claimer"}, "steps": [{"answer": claim(("F.md", "create"))}]},
        {
            "match": {"role": "executor"},
            "steps": [
                {"print": "building F.md"},
                {"usage": {"input_tokens": 900, "output_tokens": 100}},
                {"sleep": 300},
            ],
        },
    ]
}


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "state", agents={"team": TEAM}, env={"NUMERUS_KILL_GRACE_S": "1"}).start()
    yield d
    d.stop()


def rows(app: TopApp) -> dict[str, list[str]]:
    """What the table shows, by row key (`job` or `job/task`)."""
    tables = app.query("DataTable")  # none before the view is mounted
    if not tables:
        return {}
    table = tables.first()
    return {str(key.value): [str(cell) for cell in table.get_row(key)] for key in table.rows}


async def shown(app: TopApp, key: str, *cells: str, timeout: float = 30) -> list[str]:
    """The row `key` once it shows every one of `cells` (the test fails with the table after `timeout`)."""

    def has() -> bool:
        row = rows(app).get(key)
        return row is not None and all(cell in row for cell in cells)

    try:
        await eventually(has, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"row {key} never showed {cells}: {rows(app)}") from None
    return rows(app)[key]


async def test_rows_follow_the_job_and_k_kills_it(daemon, tmp_path):
    repo = git_repo(tmp_path / "repo")
    target = resolve_target(state_dir=daemon.state_dir, nats_url=None)
    async with connected(target, 5.0) as nc:
        app = TopApp(nc, timeout=5.0)
        async with app.run_test(size=(180, 40)) as pilot:
            await eventually(lambda: app.ready, timeout=10)
            job = daemon.ctl("run", "--agent", "team", "--no-review", "--repo", str(repo), "Write F", check=True)
            job = job.stdout.strip()
            assert (await shown(app, job, "planning"))[-1] == "Write F"
            await shown(app, f"{job}/a", "running", "1", "1000", "F.md", "Write F")
            await shown(app, f"{job}/b", "waiting", "waits for a", HOSTILE_TITLE)
            assert (await shown(app, job, "running"))[4] == "1000"  # the job's tokens: its tasks'

            # A second view, started now, draws the same from its starting picture.
            later = TopApp(nc, timeout=5.0)
            async with later.run_test(size=(180, 40)):
                await shown(later, f"{job}/a", "running", "1", "1000", "F.md")
                await shown(later, f"{job}/b", "waiting", "waits for a")

            await pilot.click("DataTable")
            table = app.query_one("DataTable")
            table.move_cursor(row=list(rows(app)).index(f"{job}/a"))
            await eventually(lambda: "building F.md" in "\n".join(app.query_one("Log").lines), timeout=10)

            await pilot.press("k")
            await shown(app, job, "killed")
            await shown(app, f"{job}/a", "killed")
            await shown(app, f"{job}/b", "killed")
    assert daemon.status(job)["status"] == "killed"


def test_keys_come_from_one_table_checked_against_the_protocol():
    available = actions(REQUESTS)
    assert "kill" in {action.verb for action in available}
    assert {action.verb for action in available} <= set(REQUESTS)
    keys = [(action.key, action.verb) for action in available]
    assert keys == [("k", "kill"), ("d", "diff"), ("a", "approve"), ("r", "reject"), ("t", "retry"), ("s", "skip")]

    class SkipTask(Request, frozen=True, kw_only=True):
        job: str
        task: str

    # A verb that lands later is shown and sends its request, filled from the selection.
    shown = actions({"kill": KillJob, "skip": SkipTask})
    assert [action.key for action in shown] == ["k", "s"]
    assert request_for(SkipTask, "J", "t2", "me") == SkipTask(job="J", task="t2")
    with pytest.raises(ValueError, match="needs task"):
        request_for(SkipTask, "J", None, "me")


def test_events_already_in_the_picture_are_not_counted_twice_and_a_cost_shows_when_carried():
    board = Board()
    then = datetime(2026, 1, 1, tzinfo=UTC)
    task = TaskView(id="t1", title="T", agent="a", status="running", attempt=1, input_tokens=10)
    picture = JobView(id="J1", goal="g", repo="/r", agent="a", status="running", created=then, updated=then, events=9)
    board.load([msgspec.structs.replace(picture, tasks=[task], tokens=10)])

    def used(second: int) -> bytes:
        data = {"input_tokens": 5, "output_tokens": 5, "cost": 0.25}
        event = {"type": "TokensUsed", "job": "J1", "task": "t1", "time": f"2026-01-01T00:00:0{second}Z", "data": data}
        return msgspec.json.encode(event)

    assert board.apply(used(0)) is None  # the picture had it: the same time as the job's last event
    assert board.apply(used(1)) == "J1"
    assert board.apply(b"not json") is None
    job = board.jobs["J1"]
    assert (job.tokens, job.cost, job.tasks["t1"].tokens, job.tasks["t1"].cost) == (20, 0.25, 20, 0.25)
    assert show_cost(board)
    assert task_cells(job.tasks["t1"], then, cost=True)[5] == "$0.25"
