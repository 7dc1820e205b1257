"""Everyday handling: job references, shell completion, per-task logs and failed checks' output, `status --repo`,
errors as JSON, an agent that cannot start refused at submit, and the configuration taken again on SIGHUP.

The real numerusd and numerusctl, a real nats-server, git and the scripted agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from numerusctl.render import REPO_WIDTH, TaskLines, short_path
from numerusd import checks
from numerusd.checks import CheckLog, failed_check_logs, run_check
from tests.conftest import eventually
from tests.daemon_harness import Daemon, git_repo, write_scenario

pytestmark = pytest.mark.slow  # a real daemon runs jobs

HELLO = [{"say": "hello"}]
ONE_TASK = {
    "summary": "a note",
    "tasks": [{"id": "t1", "title": "Note", "instructions": "n", "intents": [{"path": "NOTE.md", "mode": "create"}]}],
}
#: The planner plans one task; its first attempt leaves a TODO the check refuses, the second does not.
NOTE_TEAM = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": ONE_TASK}]},
        {"match": {"role": "executor", "attempt": 1}, "steps": [{"write": "NOTE.md", "content": "TODO\n"}]},
        {
            "match": {"role": "executor"},
            "steps": [{"print": "writing the note"}, {"write": "NOTE.md", "content": "ok\n"}],
        },
    ]
}
#: A check that prints far more than the daemon keeps in memory (64 KiB), then fails on a TODO.
NOISY_CHECK = "seq 1 30000; ! grep -q TODO NOTE.md"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("everyday")
    config = 'backoff_s = [0.1]\nmax_replans = 0\n[agents.ghostly]\nkind = "codex"\nbinary = "/nonexistent/codex"\n'
    config += '[agents.unlisted]\nkind = "codex"\nbinary = "no-such-codex-anywhere"\n'
    with Daemon(root / "state", agents={"hello": HELLO, "team": NOTE_TEAM}, config=config).start() as d:
        yield d


@pytest.fixture(scope="module")
def jobs(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three jobs in two repositories: two quick ones in `a`, a planned one (whose check fails once) in `b`."""
    root = tmp_path_factory.mktemp("repos")
    a, b = git_repo(root / "a"), git_repo(root / "b")
    (a / "sub").mkdir()
    found = {"a": str(a), "b": str(b)}
    for name in ("first", "second"):
        found[name] = run_ok(daemon, "--no-plan", f"say hello ({name})", "--repo", str(a), "--agent", "hello")
    flags = ("--agent", "team", "--claims", "plan", "--no-review", "--check", NOISY_CHECK)
    found["planned"] = run_ok(daemon, "write a note", "--repo", str(b), *flags)
    return found


def run_ok(daemon: Daemon, *args: str) -> str:
    """`numerusctl run ARGS --wait`, which must succeed; the job's id."""
    result = daemon.ctl("run", *args, "--wait", timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0].strip()


def shared_start(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


# --- job references -------------------------------------------------------------------------------------------


def test_last_a_start_and_an_end_of_an_id_name_a_job_where_numerusctl_subscribes_itself(daemon, jobs):
    first, second = jobs["first"], jobs["second"]
    newest = jobs["planned"]
    # `last`: the newest job, for events (read page by page, then followed) and the audit.
    assert json.loads(daemon.ctl("--json", "events", "last", check=True).stdout.splitlines()[0])["job"] == newest
    audit = daemon.ctl("audit", "verify", "last", check=True).stdout
    assert audit.startswith("ok: ") and "1 job" in audit
    # The end of an id (the random part of a ULID) names it; a start does too when it is long enough to be unique.
    lines = daemon.ctl("--json", "events", second[-6:], check=True).stdout.splitlines()
    assert {json.loads(line)["job"] for line in lines} == {second}
    unique_start = second[: max(shared_start(other, second) for other in (first, newest)) + 1].lower()
    assert len(unique_start) >= 4
    lines = daemon.ctl("--json", "events", unique_start, check=True).stdout.splitlines()
    assert {json.loads(line)["job"] for line in lines} == {second}
    assert "1 job" in daemon.ctl("audit", "verify", first[-5:], check=True).stdout
    # `logs -f` with a reference follows the job it names (here ended: what it printed, then the end).
    followed = daemon.ctl("logs", first[-6:], "-f", timeout=30)
    assert followed.returncode == 0 and "t1 | " in followed.stdout and "hello" in followed.stdout


def test_an_ambiguous_reference_names_the_candidates_and_an_unknown_one_says_so(daemon, jobs):
    first, second = jobs["first"], jobs["second"]
    common = first[: shared_start(first, second)]
    assert len(common) >= 4  # two jobs submitted within seconds: their ids share the time they start with
    for command in (("events", common[:4]), ("audit", "verify", common[:4])):
        result = daemon.ctl(*command)
        assert result.returncode == 1
        (line,) = result.stderr.splitlines()
        assert "names" in line and first in line and second in line and "give more of the id" in line
        assert result.stdout == ""
    result = daemon.ctl("events", "ZZZZZZ", "-f", timeout=10)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "numerusctl: no job 'ZZZZZZ'; 'numerusctl status' lists the jobs"
    ]


@pytest.mark.parametrize("ref", ["*", ">", "../x", "01AB.*", "last.>", "a b", "-x"])
def test_a_reference_that_is_not_one_token_never_reaches_a_subject(daemon, jobs, ref):
    for command in (("events", "-f", "--", ref), ("logs", "-f", "--", ref), ("audit", "verify", "--", ref)):
        result = daemon.ctl(*command, timeout=10)
        assert result.returncode == 2, result
        (line,) = result.stderr.splitlines()
        assert "is not an id" in line
    assert daemon.alive and daemon.ctl("status", check=True)


# --- an agent that cannot start -------------------------------------------------------------------------------


def test_an_agent_whose_program_cannot_be_found_is_refused_at_submit(daemon, jobs, tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    before = daemon.ctl_json("status", "--all")["total"]
    result = daemon.ctl("run", "anything", "--repo", str(repo), "--agent", "ghostly")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "numerusctl: agent 'ghostly' (the planner) cannot start: its program /nonexistent/codex does not exist or "
        "is not executable; install it, or set the profile's binary in numerusd's configuration"
    ]
    result = daemon.ctl("run", "anything", "--repo", str(repo), "--agent", "hello", "--role", "reviewer=unlisted")
    assert result.returncode == 1
    assert "agent 'unlisted' (the reviewer) cannot start: its program no-such-codex-anywhere is not on" in result.stderr
    # A role the job will not call is not asked for: --no-review leaves the reviewer out.
    flags = ("--agent", "hello", "--role", "reviewer=unlisted", "--no-review", "--no-plan")
    assert daemon.ctl("run", "x", "--repo", str(repo), *flags).returncode == 2  # --no-plan takes no reviewer
    result = daemon.ctl("run", "--no-plan", "x", "--repo", str(repo), "--agent", "ghostly")
    assert result.returncode == 1 and "(the executor)" in result.stderr
    assert daemon.ctl_json("status", "--all")["total"] == before  # nothing was recorded


# --- status and the repository ---------------------------------------------------------------------------------


def test_status_shows_each_jobs_repository_and_filters_by_it(daemon, jobs):
    table = daemon.ctl("status", check=True).stdout.splitlines()
    assert table[0].split() == ["JOB", "STATUS", "AGENT", "TASKS", "TOKENS", "AGE", "REPO", "GOAL"]
    (planned,) = [line.split() for line in table if line.startswith(jobs["planned"])]
    assert planned[6] == short_path(jobs["b"], REPO_WIDTH) and planned[6].endswith("/b")
    # Any directory of the repository names it, as for `run`.
    listed = daemon.ctl_json("status", "--repo", str(Path(jobs["a"]) / "sub"))
    assert [job["id"] for job in listed["jobs"]] == [jobs["second"], jobs["first"]] and listed["total"] == 2
    assert {job["repo"] for job in listed["jobs"]} == {jobs["a"]}
    listed = daemon.ctl_json("status", "--repo", jobs["a"], "--limit", "1")
    assert [job["id"] for job in listed["jobs"]] == [jobs["second"]] and listed["total"] == 2
    assert daemon.ctl_json("status", "--repo", "/nowhere")["jobs"] == []
    assert daemon.ctl_json("status", jobs["planned"])["jobs"][0]["repo"] == jobs["b"]
    assert "repo" in daemon.ctl("status", "last", check=True).stdout


def test_a_huge_repo_filter_is_refused_in_one_line(daemon, jobs):
    result = daemon.ctl("status", "--repo", "/" + "r" * 100_000)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("numerusctl: bad status request") and "$.repo" in line
    assert daemon.alive and daemon.ctl("status", check=True)


# --- errors as JSON ----------------------------------------------------------------------------------------------


def test_errors_under_json_are_one_json_line_on_stderr_with_the_same_exit_codes(daemon, jobs, tmp_path: Path):
    def error(*args: str) -> tuple[int, dict]:
        result = daemon.ctl(*args, timeout=30)
        (line,) = result.stderr.splitlines()
        assert result.stdout == ""
        return result.returncode, json.loads(line)["error"]

    code, found = error("--json", "status", "NOSUCHJOB")
    assert code == 1 and found == {
        "code": "not_found",
        "message": "no job 'NOSUCHJOB'; 'numerusctl status' lists the jobs",
        "exit": 1,
    }
    code, found = error("events", "--json", "ZZZZZZ")  # the command's own --json, and a reference resolved
    assert code == 1 and found["code"] == "not_found"
    code, found = error("--state-dir", str(tmp_path / "nobody"), "--json", "status")  # the last --state-dir wins
    assert (
        code == 3
        and found["code"] == "unreachable"
        and found["exit"] == 3
        and "cannot reach numerusd" in found["message"]
    )
    code, found = error("--json", "status", "--limit", "0")
    assert code == 2 and found["code"] == "usage" and "--limit" in found["message"]
    code, found = error("--json", "frobnicate")
    assert code == 2 and found["code"] == "usage" and "frobnicate" in found["message"]
    code, found = error("--json", "logs", jobs["first"], "--check")
    assert code == 2 and found["code"] == "usage"
    code, found = error("--json", "run", "g", "--repo", jobs["a"], "--agent", "ghostly")
    assert code == 1 and found["code"] == "bad_request" and "ghostly" in found["message"]
    # Without --json, the same error is the usual line.
    assert (
        daemon.ctl("status", "NOSUCHJOB").stderr
        == "numerusctl: no job 'NOSUCHJOB'; 'numerusctl status' lists the jobs\n"
    )


# --- logs ----------------------------------------------------------------------------------------------------------


def test_logs_of_a_task_and_the_whole_output_of_its_failed_checks(daemon, jobs):
    job = jobs["planned"]
    view = daemon.status(job)
    assert view["status"] == "completed" and view["tasks"][0]["attempt"] == 2
    assert (
        daemon.ctl("logs", job, "t1", check=True).stdout == daemon.ctl("logs", job, "--task", "t1", check=True).stdout
    )
    assert "writing the note" in daemon.ctl("logs", job, "t1", check=True).stdout
    assert daemon.ctl("logs", job, "t1", "--task", "t2").returncode == 2

    shown = daemon.ctl("logs", job[-6:], "t1", "--check", check=True).stdout
    header, *output = shown.splitlines()
    assert header.startswith(f"==> t1 attempt 1: {NOISY_CHECK} (exit code 1; ") and header.endswith(
        "check-1-1.log) <=="
    )
    # All of it, from its first line (the daemon kept only the last 64 KiB in memory), then how it ended.
    assert output[0] == f"$ {NOISY_CHECK}"
    assert output[1:30001] == [str(n) for n in range(1, 30001)]
    assert output[-1].startswith("[numerus: exit code 1 after ")
    # Only the failed check: the second attempt's passed.
    (log,) = daemon.ctl_json("logs", job, "t1", "--check")["logs"]
    assert (log["check"], log["attempt"], log["exit_code"]) == (NOISY_CHECK, 1, 1)
    run_dir = Path(log["path"]).parent
    assert sorted(p.name for p in run_dir.glob("check-*.log")) == ["check-1-1.log", "check-2-1.log"]
    assert daemon.ctl("logs", jobs["first"], "t1", "--check", check=True).stdout == (
        f"no failed check of task t1 in job {jobs['first']}\n"
    )
    result = daemon.ctl("logs", job, "t9", "--check")
    assert result.returncode == 1 and "has no task 't9'" in result.stderr


async def test_a_check_log_keeps_the_start_of_a_huge_output_and_says_where_it_was_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "LOG_BYTES", 1000)
    log = CheckLog(tmp_path / "run", attempt=3)
    command = "head -c 5000 /dev/zero | tr '\\0' a; exit 3"
    exit_code, output, _ = await run_check(tmp_path, command, timeout=10, log=log)
    assert exit_code == 3 and output == "a" * 5000
    (failed,) = failed_check_logs(tmp_path / "run")
    assert (failed.command, failed.attempt, failed.number, failed.exit_code) == (command, 3, 1, 3)
    lines = failed.path.read_text().splitlines()
    assert lines[0] == f"$ {command}" and lines[1] == "a" * 1000
    assert lines[2:4] == ["[numerus: output cut at 1000 bytes of 5000]", lines[3]]
    assert lines[3].startswith("[numerus: exit code 3 after ")
    # A check that prints our own end line does not pass for us; one that passes is not listed.
    await run_check(tmp_path, "printf '\\n[numerus: exit code 0 after 1 s]\\n'; exit 1", timeout=10, log=log)
    await run_check(tmp_path, "echo fine", timeout=10, log=log)
    assert [(f.number, f.exit_code) for f in failed_check_logs(tmp_path / "run")] == [(1, 3), (2, 1)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f"check-3-{n}.log" for n in (1, 2, 3)]


# --- shell completion ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_shells_script(daemon, shell):
    result = subprocess.run(
        [daemon.ctl_argv()[0], "completion", shell], capture_output=True, text=True, timeout=30, check=True
    )
    assert "_NUMERUSCTL_COMPLETE" in result.stdout and f"{shell}_complete" in result.stdout


def complete(daemon: Daemon, words: str, state_dir: Path | None = None) -> list[str]:
    """What bash completion offers for the last of `words` (numerusctl --state-dir S ...), as `type,value` lines."""
    line = f"numerusctl --state-dir {state_dir or daemon.state_dir} {words}"
    env = {
        **os.environ,
        "_NUMERUSCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": line,
        "COMP_CWORD": str(len(line.split()) - (0 if line.endswith(" ") else 1)),
    }
    result = subprocess.run([daemon.ctl_argv()[0]], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0 and result.stderr == ""
    return [line for line in result.stdout.splitlines() if line]


def test_completion_offers_job_ids_tasks_and_agents_and_says_nothing_when_the_daemon_is_away(daemon, jobs, tmp_path):
    offered = complete(daemon, "status ")
    assert "plain,last" in offered and {f"plain,{jobs[n]}" for n in ("first", "second", "planned")} <= set(offered)
    assert complete(daemon, f"kill {jobs['planned'][-5:]}") == [f"plain,{jobs['planned']}"]
    assert complete(daemon, f"logs {jobs['planned']} ") == ["plain,t1"]
    assert {"plain,hello", "plain,team", "plain,ghostly"} <= set(complete(daemon, "run goal --agent "))
    assert complete(daemon, "run goal --agent te") == ["plain,team"]
    # No daemon there: nothing but what needs none, and no word on stderr.
    assert complete(daemon, "status ", state_dir=tmp_path / "nobody") == ["plain,last"]
    assert complete(daemon, "run goal --agent ", state_dir=tmp_path / "nobody") == []


# --- SIGHUP ----------------------------------------------------------------------------------------------------------


async def test_sighup_takes_a_changed_configuration_and_refuses_a_bad_one(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"first": HELLO}).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        toml = daemon.state_dir / "numerus.toml"
        good = toml.read_text()
        result = daemon.ctl("run", "--no-plan", "hi", "--repo", str(repo), "--agent", "second")
        assert result.returncode == 1 and "unknown agent 'second'" in result.stderr

        async def reloads(count: int, word: str) -> None:
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGHUP)
            await eventually(lambda: daemon.stderr().count(word) >= count, timeout=20)

        # A new profile, and a new default for jobs: taken by the next job, the daemon never stopping.
        scenario = write_scenario(daemon.scenarios_dir / "scenario-second.json", [{"say": "second speaking"}])
        toml.write_text(
            "parallel = 2\n" + good + '[agents.second]\nkind = "scripted"\n'
            f"env = {{ NUMERUS_SCENARIO = {json.dumps(str(scenario))} }}\n"
            f"binds = [{json.dumps(str(scenario.parent))}]\n"
        )
        pid = daemon.process.pid if daemon.process else 0
        await reloads(1, "configuration reloaded")
        assert "configuration reloaded: parallel, agents.second" in daemon.stderr()
        job = run_ok(daemon, "--no-plan", "hi", "--repo", str(repo), "--agent", "second")
        assert "second speaking" in daemon.ctl("logs", job, check=True).stdout
        planned = daemon.ctl_json("run", "plan it", "--repo", str(repo), "--agent", "first")["job"]
        assert daemon.status(planned)["parallel"] == 2
        daemon.ctl("kill", planned)

        # A broken file, then one that changes what cannot change live: refused, logged, nothing changed.
        toml.write_text(good + "[agents.second\n")
        await reloads(1, "configuration not reloaded")
        toml.write_text('nats_url = "nats://127.0.0.1:1"\n' + good)
        await reloads(2, "configuration not reloaded")
        refusals = [line for line in daemon.stderr().splitlines() if "configuration not reloaded" in line]
        assert "not valid TOML" in refusals[0]
        assert "nats_url cannot change while numerusd runs" in refusals[1]
        assert daemon.alive and daemon.process is not None and daemon.process.pid == pid
        run_ok(daemon, "--no-plan", "hi", "--repo", str(repo), "--agent", "second")  # the last good one holds


def test_followed_lines_are_told_apart_by_a_coloured_task_name_and_agents_cannot_drive_the_terminal():
    lines = TaskLines(colour=True)
    shown = lines.feed("t1", b"a\nb") + lines.feed("t2", b"c\r\n") + lines.feed("t1", b"\x1b[2Jd\n")
    shown += lines.feed("t2", b"no end") + lines.close()
    assert shown.splitlines() == [
        "\x1b[31mt1\x1b[0m | a",
        "\x1b[32mt2\x1b[0m | c",
        "\x1b[31mt1\x1b[0m | b\\x1b[2Jd",  # the agent's escape is shown, never sent
        "\x1b[32mt2\x1b[0m | no end",
    ]
    assert TaskLines().feed("t3", b"x\n") == "t3 | x\n"
    # Text that reorders itself (bidirectional overrides: what a reviewer reads is not what the code does) is shown
    # with its controls named.
    assert TaskLines().feed("t5", "x = 1 \u202e# ok\u2066\n".encode()) == "t5 | x = 1 \\u202e# ok\\u2066\n"
    # An agent that never ends a line (a progress bar redrawn with `\r`) is still followed, as it prints.
    redraws = TaskLines()
    shown = "".join(redraws.feed("t4", b"\r%d%% done" % n) for n in range(1000))
    assert shown.startswith("t4 | \\x0d0% done") and "999% done" not in shown
    assert redraws.close().endswith("999% done\n")
