"""The agent adapter contract, run against every adapter, plus the codex command line and its output parser.

The contract runs each adapter for real: its command spawned in a PTY by `terminal.spawn`, every line of output
fed to its parser. `codex` runs with CODEX_BIN pointing at the scripted agent, which refuses the command lines
the real codex refuses, so a wrong argv fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numerusd.agents.base import MAX_LINE, SPLIT_MARK, AgentAdapter, AgentInvocation, AgentProfile, LineBuffer
from numerusd.agents.codex import CodexAdapter, CodexOutputParser
from numerusd.agents.registry import adapter_for
from numerusd.agents.scripted import ScriptedAdapter, scripted_agent_launcher
from numerusd.errors import ConfigError
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    AgentThreadStarted,
    EventData,
    TokensUsed,
)
from numerusd.terminal import spawn

SCENARIOS = Path(__file__).parent / "scenarios"
CONTRACT_THREAD = "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@dataclass
class Run:
    """What a user sees of one agent run: its events, how it ended, and its raw terminal output."""

    events: list[EventData]
    status: tuple[int | None, int | None]
    output: bytes


async def run_agent(adapter: AgentAdapter, invocation: AgentInvocation, *, stop_after: type | None = None) -> Run:
    """Spawn the adapter's command in a PTY and parse all its output (terminating it after a `stop_after` event)."""
    argv, extra_env = adapter.command(invocation)
    terminal = await spawn(argv, cwd=invocation.repo, env={**os.environ, **extra_env})
    parser = adapter.parser(invocation)
    lines = LineBuffer()
    events: list[EventData] = []
    output = b""

    async def pump() -> None:
        nonlocal output
        while chunk := await terminal.read():
            output += chunk
            for line in lines.feed(chunk):
                new = parser.feed(line)
                events.extend(new)
                if stop_after is not None and any(isinstance(event, stop_after) for event in new):
                    await terminal.terminate(grace=5)
        for line in lines.close():
            events.extend(parser.feed(line))

    try:
        await asyncio.wait_for(pump(), 20)
        status = await asyncio.wait_for(terminal.wait(), 20)
    finally:
        terminal.close()
    return Run(events, status, output)


@pytest.fixture(params=["codex", "scripted"])
def profile_for(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., AgentProfile]:
    """Makes a profile of each adapter kind that plays a given scenario."""
    if request.param == "codex":
        # `codex` run as codex is: one program on CODEX_BIN, here the scripted agent's console script.
        monkeypatch.setenv("CODEX_BIN", str(Path(sys.executable).parent / "numerus-scripted-agent"))

    def make(scenario: str, **fields: object) -> AgentProfile:
        return AgentProfile(kind=request.param, env={"NUMERUS_SCENARIO": str(SCENARIOS / scenario)}, **fields)

    return make


def git_init(path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


# --- the contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_git", [True, False], ids=["git-repo", "plain-dir"])
async def test_a_run_turns_into_events_and_really_changes_the_repo(profile_for, tmp_path: Path, in_git: bool) -> None:
    repo = git_init(tmp_path / "repo") if in_git else (tmp_path / "repo")
    repo.mkdir(exist_ok=True)
    last_message = tmp_path / "last.txt"
    adapter = adapter_for(profile_for("contract.json"))
    # A prompt that looks like an option and names the resume subcommand must reach the agent as a prompt.
    invocation = AgentInvocation(prompt="--resume the notes", repo=repo, output_file=last_message)

    run = await run_agent(adapter, invocation)

    assert run.status == (0, None), run.output.decode(errors="replace")
    assert run.events == [
        AgentThreadStarted(thread_id=CONTRACT_THREAD),
        AgentMessageReceived(text="Starting on: --resume the notes"),
        AgentFileChanged(path="notes/out.txt", kind="add"),
        AgentCommandExecuted(command="printf 'checking\\n'; exit 3", exit_code=3, status="failed"),
        TokensUsed(
            input_tokens=100,
            cached_input_tokens=10,
            output_tokens=20,
            thread_input_tokens=100,
            thread_cached_input_tokens=10,
            thread_output_tokens=20,
        ),
        AgentFileChanged(path="notes/out.txt", kind="update"),
        AgentMessageReceived(text="Second turn: done."),
        # The second turn.completed says 250/30/45 in all: this turn used the difference.
        TokensUsed(
            input_tokens=150,
            cached_input_tokens=20,
            output_tokens=25,
            thread_input_tokens=250,
            thread_cached_input_tokens=30,
            thread_output_tokens=45,
        ),
    ]
    assert (repo / "notes" / "out.txt").read_text() == "rewritten in the second turn\n"
    assert last_message.read_text() == "Second turn: done."
    # The noise was really there, byte for byte, and was skipped.
    assert b"plain text on stdout, not an event\n" in run.output
    assert b"\x1b[31m2025-01-01T00:00:00Z ERROR" in run.output
    assert b"\r\n" not in run.output


async def test_a_resumed_thread_counts_only_the_new_tokens(profile_for, tmp_path: Path) -> None:
    adapter = adapter_for(profile_for("resume.json"))
    invocation = AgentInvocation(
        prompt="carry on", repo=tmp_path, resume_thread=CONTRACT_THREAD, usage_baseline=(250, 30, 45)
    )

    run = await run_agent(adapter, invocation)

    assert run.status == (0, None), run.output.decode(errors="replace")
    assert run.events == [
        AgentThreadStarted(thread_id=CONTRACT_THREAD),
        AgentMessageReceived(text="Resumed: carry on"),
        TokensUsed(
            input_tokens=150,
            cached_input_tokens=20,
            output_tokens=15,
            thread_input_tokens=400,
            thread_cached_input_tokens=50,
            thread_output_tokens=60,
        ),
    ]


async def test_errors_are_reported_and_a_failed_turn_exits_1(profile_for, tmp_path: Path) -> None:
    last_message = tmp_path / "last.txt"
    adapter = adapter_for(profile_for("failing.json"))
    invocation = AgentInvocation(prompt="try", repo=tmp_path, output_file=last_message)

    run = await run_agent(adapter, invocation)

    assert run.status == (1, None)
    assert [e for e in run.events if not isinstance(e, AgentThreadStarted)] == [
        AgentErrorReported(message="Reconnecting... 1/5 (stream disconnected before completion)"),
        AgentMessageReceived(text="I could not finish."),
        AgentErrorReported(message="model overloaded, try again later"),
    ]
    assert not last_message.exists()  # codex writes no last message for a failed turn


async def test_a_slow_agent_can_be_stopped(profile_for, tmp_path: Path) -> None:
    adapter = adapter_for(profile_for("slow.json"))

    run = await run_agent(
        adapter, AgentInvocation(prompt="take your time", repo=tmp_path), stop_after=AgentMessageReceived
    )

    assert run.status == (None, signal.SIGTERM)
    assert [e.text for e in run.events if isinstance(e, AgentMessageReceived)] == ["working on it"]


async def test_an_output_schema_is_passed_and_checked(profile_for, tmp_path: Path) -> None:
    schema = tmp_path / "plan.schema.json"
    invocation = AgentInvocation(prompt="plan", repo=tmp_path, output_schema=schema)
    adapter = adapter_for(profile_for("resume.json"))

    missing = await run_agent(adapter, invocation)
    schema.write_text(json.dumps({"type": "object"}))
    present = await run_agent(adapter, invocation)

    assert missing.status == (1, None) and b"--output-schema" in missing.output
    assert present.status == (0, None)


# --- the codex command line --------------------------------------------------------------------------------


def test_codex_command_line_in_a_git_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEX_BIN", raising=False)
    repo = git_init(tmp_path / "repo")
    profile = AgentProfile(
        model="gpt-5-codex",
        agent_sandbox="read-only",
        args=("-c", 'model_reasoning_effort="high"'),
        env={"CODEX_HOME": "/srv/codex"},
    )
    invocation = AgentInvocation(
        prompt="do it",
        repo=repo,
        resume_thread="t-1",
        output_schema=Path("/s.json"),
        output_file=Path("/o.txt"),
    )

    argv, env = CodexAdapter(profile).command(invocation)

    # Everything codex accepts only before `resume` comes before it; the prompt after `--`.
    assert argv == [
        "codex", "exec", "--json", "-C", str(repo), "--sandbox", "read-only",
        "-m", "gpt-5-codex", "--output-schema", "/s.json", "-o", "/o.txt",
        "-c", 'model_reasoning_effort="high"',
        "resume", "t-1", "--", "do it",
    ]  # fmt: skip
    assert env == {"CODEX_HOME": "/srv/codex"}


def test_codex_skips_the_git_check_only_outside_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = git_init(tmp_path / "repo")
    (repo / "src").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    adapter = CodexAdapter(AgentProfile())

    def argv(path: Path) -> list[str]:
        return adapter.command(AgentInvocation(prompt="p", repo=path))[0]

    assert "--skip-git-repo-check" not in argv(repo)
    assert "--skip-git-repo-check" not in argv(repo / "src")
    assert "--skip-git-repo-check" in argv(plain)
    assert argv(plain)[-2:] == ["--", "p"] and "resume" not in argv(plain) and "-m" not in argv(plain)
    # Like git, it looks no higher than GIT_CEILING_DIRECTORIES: a ceiling is searched, not what is above it.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(repo))
    assert "--skip-git-repo-check" not in argv(repo)
    assert "--skip-git-repo-check" in argv(repo / "src")


def test_which_codex_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invocation = AgentInvocation(prompt="p", repo=tmp_path)
    monkeypatch.delenv("CODEX_BIN", raising=False)
    assert CodexAdapter(AgentProfile()).command(invocation)[0][0] == "codex"
    monkeypatch.setenv("CODEX_BIN", "/opt/codex/bin/codex")
    assert CodexAdapter(AgentProfile()).command(invocation)[0][0] == "/opt/codex/bin/codex"
    assert CodexAdapter(AgentProfile(binary="/usr/local/bin/codex")).command(invocation)[0][0] == "/usr/local/bin/codex"
    # The scripted agent never runs the real codex, whatever CODEX_BIN says.
    scripted = ScriptedAdapter(AgentProfile(kind="scripted")).command(invocation)[0]
    assert scripted[: len(scripted_agent_launcher())] == scripted_agent_launcher()


def test_adapters_by_kind_and_a_clear_error_for_an_unknown_one() -> None:
    assert adapter_for(AgentProfile()).name == "codex"
    assert adapter_for(AgentProfile(kind="scripted")).name == "scripted"
    with pytest.raises(ConfigError, match=r"unknown agent kind 'claude'; known kinds: codex, scripted"):
        adapter_for(AgentProfile(kind="claude"))


def test_a_profile_repr_shows_no_environment_values() -> None:
    profile = AgentProfile(env={"OPENAI_API_KEY": "sk-secret"})
    assert "sk-secret" not in repr(profile) and "OPENAI_API_KEY" in repr(profile)


# --- the codex output parser -------------------------------------------------------------------------------


def feed_all(parser: CodexOutputParser, *lines: str) -> list[EventData]:
    return [event for line in lines for event in parser.feed(line)]


def test_the_parser_reads_events_amid_terminal_noise(tmp_path: Path) -> None:
    parser = CodexOutputParser(repo=tmp_path)
    events = feed_all(
        parser,
        '{"type":"thread.started","thread_id":"t"}\r',
        "Reading additional input from stdin...",
        "\x1b[2m2025-01-01T00:00:00Z\x1b[0m \x1b[31mERROR\x1b[0m codex_api: failed to connect",
        '\x1b[0m{"type":"item.completed","item":{"id":"i","type":"agent_message","text":"after ANSI"}}',
        'WARN partial stderr{"type":"error","message":"on the same line"}',
        '{"type":"item.completed","item":{"id":"i","type":"reasoning","text":"thinking"}}',
        '{"type":"item.completed","item":{"id":"i","type":"todo_list","items":[]}}',
        '{"type":"item.completed","item":{"id":"i","type":"error","message":"a warning, not a failure"}}',
        '{"type":"item.started","item":{"id":"c","type":"command_execution","command":"ls","status":"in_progress"}}',
        f'{{"type":"item.completed","item":{{"id":"f","type":"file_change","status":"completed",'
        f'"changes":[{{"path":"{tmp_path}/a.py","kind":"update"}},{{"path":"/elsewhere/b.py","kind":"add"}}]}}}}',
        '{"type":"item.completed","item":{"id":"g","type":"file_change","status":"failed",'
        '"changes":[{"path":"c.py","kind":"delete"}]}}',
        '{"type":"turn.failed","error":{"message":"quota exceeded"}}',
    )
    assert events == [
        AgentThreadStarted(thread_id="t"),
        AgentMessageReceived(text="after ANSI"),
        AgentErrorReported(message="on the same line"),
        AgentFileChanged(path="a.py", kind="update"),
        AgentFileChanged(path="/elsewhere/b.py", kind="add"),
        AgentErrorReported(message="quota exceeded"),
    ]
    assert parser.thread_id == "t"


def test_token_usage_never_counts_a_token_twice() -> None:
    parser = CodexOutputParser(usage_baseline=(1000, 100, 50))

    def turn(i: int, c: int, o: int) -> TokensUsed:
        usage = {"input_tokens": i, "cached_input_tokens": c, "output_tokens": o}
        [event] = parser.feed(json.dumps({"type": "turn.completed", "usage": usage}))
        assert isinstance(event, TokensUsed)
        return event

    first = turn(1500, 150, 80)
    assert (first.input_tokens, first.cached_input_tokens, first.output_tokens) == (500, 50, 30)
    # A turn that reported no usage (codex prints zeros then) counts nothing and keeps the totals.
    empty = turn(0, 0, 0)
    assert (empty.input_tokens, empty.output_tokens, empty.thread_input_tokens) == (0, 0, 1500)
    later = turn(2000, 150, 100)
    assert (later.input_tokens, later.cached_input_tokens, later.output_tokens) == (500, 0, 20)
    assert parser.thread_usage == (2000, 150, 100)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "null",
        "[1, 2]",
        "42",
        '"text"',
        "{",
        '{"type": 7}',
        '{"type":"thread.started"}',
        '{"type":"thread.started","thread_id":null}',
        '{"type":"turn.completed","usage":{"input_tokens":"many"}}',
        '{"type":"item.completed","item":"not an object"}',
        '{"type":"item.completed","item":{"type":"command_execution","exit_code":"x"}}',
        '{"type":"item.completed","item":{"type":"file_change","changes":[{"path":1}]}}',
        '{"no type": true}',
        "\x1b[",
    ],
)
def test_malformed_lines_yield_nothing(line: str) -> None:
    assert CodexOutputParser().feed(line) == []


@given(st.text(max_size=300))
def test_the_parser_never_raises(line: str) -> None:
    assert isinstance(CodexOutputParser().feed(line), list)


def test_line_buffer_splits_chunks_anywhere() -> None:
    text = 'é{"type":"turn.started"}\r\nsecond line ✓\nunterminated'.encode()
    lines = LineBuffer()
    got: list[str] = []
    for i in range(len(text)):  # one byte at a time: every split point, inside characters too
        got += lines.feed(text[i : i + 1])
    got += lines.close()
    assert got == ['é{"type":"turn.started"}', "second line ✓", "unterminated"]
    assert LineBuffer().feed(b"bad \xff byte\n") == ["bad \ufffd byte"]


def test_a_line_longer_than_the_limit_is_cut_into_marked_pieces_and_nothing_is_lost() -> None:
    """An agent that prints megabytes without a newline: the parser gets MAX_LINE pieces, each marked as cut."""
    long = "é" * (2 * MAX_LINE + 10)
    data = (long + "\r\nnext\n" + "x" * MAX_LINE).encode()
    lines = LineBuffer()
    got: list[str] = []
    for start in range(0, len(data), 4093):  # odd chunks: the cuts fall inside characters and chunks
        got += lines.feed(data[start : start + 4093])
    got += lines.close()
    assert [len(line) for line in got] == [MAX_LINE + len(SPLIT_MARK)] * 2 + [10, 4, MAX_LINE]
    assert all(line.endswith(SPLIT_MARK) for line in got[:2]) and got[4] == "x" * MAX_LINE  # at the limit: whole
    assert "".join(line.removesuffix(SPLIT_MARK) for line in got[:3]) == long
    assert got[3] == "next"


def test_codex_is_given_resolved_paths_since_it_refuses_symlinked_ones(tmp_path: Path) -> None:
    # codex 0.169: `-o` through a symlink fails with "Not a directory", and the workspace-write sandbox refuses
    # every command in a -C directory reached through a symlink (macOS's /tmp is one).
    repo = git_init(tmp_path / "repo")
    (tmp_path / "link").symlink_to(tmp_path)
    via_link = tmp_path / "link" / "repo"
    invocation = AgentInvocation(
        prompt="p",
        repo=via_link,
        output_schema=tmp_path / "link" / "plan.schema.json",
        output_file=tmp_path / "link" / "answer.json",
    )
    argv, _ = CodexAdapter(AgentProfile()).command(invocation)
    assert argv[argv.index("-C") + 1] == str(repo.resolve())
    assert argv[argv.index("-o") + 1] == str((tmp_path / "answer.json").resolve())
    assert argv[argv.index("--output-schema") + 1] == str((tmp_path / "plan.schema.json").resolve())


def test_a_fatal_error_codex_prints_before_any_event_is_reported() -> None:
    line = 'Error: Failed to open last message file "/x/answer.json": Not a directory (os error 20)'
    assert CodexOutputParser().feed("\x1b[31m" + line + "\x1b[0m") == [
        AgentErrorReported(message='Failed to open last message file "/x/answer.json": Not a directory (os error 20)')
    ]


def test_codex_runs_without_a_sandbox_of_its_own_inside_numeruss(tmp_path: Path) -> None:
    """Numerus's bwrap gives the guarantees; without it codex keeps its own, read-only for the roles that answer."""
    repo = git_init(tmp_path / "repo")

    def mode(profile: AgentProfile, read_only: bool = False) -> str:
        if read_only:
            profile = msgspec.structs.replace(profile, agent_sandbox=profile.own_sandbox(read_only=True))
        argv, _ = CodexAdapter(profile).command(AgentInvocation(prompt="p", repo=repo))
        return argv[argv.index("--sandbox") + 1]

    assert (mode(AgentProfile()), mode(AgentProfile(), read_only=True)) == ("danger-full-access",) * 2
    unsandboxed = AgentProfile(sandbox="none")
    assert (mode(unsandboxed), mode(unsandboxed, read_only=True)) == ("workspace-write", "read-only")
    nested = AgentProfile(agent_sandbox="workspace-write")
    assert (mode(nested), mode(nested, read_only=True)) == ("workspace-write", "read-only")
