"""JSON logs and traces, from a real daemon running a planned job: every line of its log is one JSON object, the
lines of a job carry its id, the steps of its life are logged at INFO; a `TRACEPARENT` given to numerusctl is in
the job's events and log lines, and a forged one is dropped. With `otel_endpoint = "console"` the daemon writes
its spans, parented by that trace; without OpenTelemetry installed it runs all the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nats
import pytest

from tests.daemon_harness import Daemon, claim, git_repo

pytestmark = pytest.mark.slow  # real daemons run planned jobs

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"

PLAN = {
    "summary": "Greet",
    "tasks": [
        {
            "id": "t1",
            "title": "Greeting",
            "instructions": "HELLO.md",
            "intents": [{"path": "HELLO.md", "mode": "create"}],
        }
    ],
}
SCENARIO = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": PLAN}]},
        {"match": {"role": "claimer"}, "steps": [{"answer": claim(("HELLO.md", "create"))}]},
        {"match": {"role": "executor"}, "steps": [{"write": "HELLO.md", "content": "# Hello\n"}]},
        {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": []}}]},
    ]
}
#: A goal that would break a naive log line: newlines, quotes, braces, a backslash, a line separator, and a
#: terminal escape (a window title set, for whoever reads the log in a terminal).
HOSTILE_GOAL = 'Greet\n{"level": "CRITICAL", "job": "forged"}\n\\ "quoted" \u2028 \x1b]0;pwned\x07 end'


def run_job(daemon: Daemon, repo: Path, goal: str, env: dict[str, str] | None = None) -> str:
    """Run a planned job to its end with numerusctl (with `env` added to its environment); its id."""
    saved = daemon.env
    daemon.env = {**saved, **(env or {})}
    try:
        result = daemon.ctl("run", goal, "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
    finally:
        daemon.env = saved
    assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()[-3000:]
    return result.stdout.splitlines()[0].strip()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("jsonlogs")
    d = Daemon(root / "state", agents={"team": SCENARIO}, config='log_format = "json"\nreview = true\n').start()
    yield d
    assert d.stop() == 0, d.stderr()


def log_lines(daemon: Daemon) -> list[dict]:
    """Every line the daemon logged, each parsed as JSON (the test fails on a line that is not)."""
    lines = []
    for number, line in enumerate(daemon.stderr().splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
    return lines


def test_every_line_is_json_and_a_jobs_lines_carry_its_id(daemon: Daemon, tmp_path: Path):
    job = run_job(daemon, git_repo(tmp_path / "repo"), HOSTILE_GOAL)
    lines = log_lines(daemon)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    about_job = [line for line in lines if job in line["message"]]
    assert about_job and all(line.get("job") == job for line in about_job), [
        line for line in about_job if line.get("job") != job
    ]
    steps = [line for line in lines if line["logger"] == "numerusd.jobs" and line.get("job") == job]
    assert all(line["level"] == "INFO" for line in steps)
    said = [line["message"].split(": ", 1)[1] for line in steps]
    assert said[0].startswith("submitted (planned, agent team): Greet {")  # the goal on one line, whole JSON line
    assert "planned: 1 tasks (plan version 1)" in said
    assert "started: attempt 1, agent team" in said
    assert "ended: completed" in said  # the task
    assert any(text.startswith("merged: ") for text in said)
    assert said[-1].startswith("ended: completed in ")  # the job, with its duration
    task_lines = [line for line in steps if "task t1" in line["message"]]
    assert task_lines and all(line.get("task") == "t1" for line in task_lines)
    # The hostile goal forged no line of its own.
    assert not [line for line in lines if line.get("job") == "forged" or line["level"] == "CRITICAL"]
    assert not [line for line in steps if "\x1b" in line["message"] or "\x07" in line["message"]]


def test_a_traceparent_from_numerusctl_is_in_the_jobs_events_and_lines(daemon: Daemon, tmp_path: Path):
    job = run_job(daemon, git_repo(tmp_path / "repo"), "Greet", env={"TRACEPARENT": TRACEPARENT})
    events = daemon.events(job)
    assert events[0]["type"] == "JobSubmitted"
    # Every event, the pipeline's later ones too, is in the trace of the command that submitted the job.
    assert {event.get("traceparent") for event in events} == {TRACEPARENT}
    assert [event for event in events if event["type"] == "TaskMerged"]
    # The member sits right after causation_id, as docs/audit.md says.
    raw = daemon.ctl("--json", "events", job, check=True).stdout.splitlines()[0]
    assert f'"causation_id":null,"traceparent":"{TRACEPARENT}","data":' in raw
    steps = [line for line in log_lines(daemon) if line["logger"] == "numerusd.jobs" and line.get("job") == job]
    assert steps and all(line.get("trace_id") == TRACE_ID for line in steps)
    assert daemon.ctl("audit", "verify", job).returncode == 0


def test_without_a_traceparent_events_have_no_such_member(daemon: Daemon, tmp_path: Path):
    job = run_job(daemon, git_repo(tmp_path / "repo"), "Greet")
    events = daemon.events(job)
    assert events and not [event for event in events if "traceparent" in event]


@pytest.mark.parametrize(
    "forged",
    [
        "not a trace",
        f"00-{TRACE_ID.upper()}-{PARENT}-01",  # W3C ids are lower-case hex
        f"ff-{TRACE_ID}-{PARENT}-01",  # version ff is invalid
        f"00-{'0' * 32}-{PARENT}-01",  # an all-zero trace id is invalid
        f"00-{TRACE_ID}-{PARENT}-01-{'a' * 2000}",  # too long
        f'00-{TRACE_ID}-{PARENT}-01","actor":"root',  # JSON injection
    ],
)
def test_a_traceparent_that_is_not_w3c_shaped_is_dropped(daemon: Daemon, tmp_path: Path, forged: str):
    job = run_job(daemon, git_repo(tmp_path / f"repo-{abs(hash(forged))}"), "Greet", env={"TRACEPARENT": forged})
    events = daemon.events(job)
    assert events and not [event for event in events if "traceparent" in event]
    assert all(event["actor"] == "numerusd" for event in events)


async def test_a_forged_traceparent_header_on_the_bus_is_dropped(daemon: Daemon, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        body = json.dumps({"goal": "Greet", "repo": str(repo), "plan": False, "agent": "team"}).encode()
        forged = f"00-{TRACE_ID}-{PARENT}-01 forged"
        reply = await nc.request("numerus.cmd.run", body, timeout=10, headers={"traceparent": forged})
    finally:
        await nc.close()
    job = json.loads(reply.data)["job"]
    assert daemon.alive
    assert not [event for event in daemon.events(job) if "traceparent" in event]


def test_spans_are_exported_parented_by_the_callers_trace(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"team": SCENARIO}, config='otel_endpoint = "console"\n').start() as d:
        job = run_job(d, git_repo(tmp_path / "repo"), "Greet", env={"TRACEPARENT": TRACEPARENT})
        events = d.events(job)
        spans = [json.loads(line) for line in d.stderr().splitlines() if line.startswith('{"name"')]
    by_name: dict[str, list[dict]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    (submit,) = by_name["numerus.cmd.run"]
    assert submit["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert submit["parent_id"] == f"0x{PARENT}"
    (attempt,) = by_name["numerus.task"]
    assert attempt["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert attempt["attributes"] == {"numerus.job": job, "numerus.task": "t1", "attempt": 1}
    # The job's events carry the daemon's span they were written in: the submission's, or the attempt's.
    submitted, attempted = (
        f"00-{TRACE_ID}-{span['context']['span_id'].removeprefix('0x')}-01" for span in (submit, attempt)
    )
    assert events[0]["traceparent"] == submitted
    assert {event["traceparent"] for event in events} == {submitted, attempted}
    assert {event["traceparent"] for event in events if event["type"] == "TaskExited"} == {attempted}


def test_the_daemon_runs_without_opentelemetry_installed(tmp_path: Path):
    # A package of that name that cannot be imported, ahead of the installed one: as if the extra were absent.
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('opentelemetry is not installed here')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    config = 'otel_endpoint = "console"\n'
    with Daemon(tmp_path / "state", agents={"team": SCENARIO}, config=config, env=env).start() as d:
        job = run_job(d, git_repo(tmp_path / "repo"), "Greet", env={"TRACEPARENT": TRACEPARENT})
        assert d.status(job)["status"] == "completed"
        assert "OpenTelemetry is not installed" in d.stderr()
        assert {event.get("traceparent") for event in d.events(job)} == {TRACEPARENT}  # traces still carried
