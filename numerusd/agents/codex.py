"""The OpenAI Codex CLI adapter: `codex exec --json` and its JSONL events.

The command line (checked against codex-cli 0.169):

    codex exec --json -C <repo> --sandbox <mode> [--skip-git-repo-check] [-m <model>]
               [--output-schema <file>] [-o <file>] <profile.args> [resume <thread_id>] -- <prompt>

`-C`, `--sandbox` and `--output-schema` belong to `exec` itself and are refused after `resume`, so every
option comes before the subcommand. The prompt follows `--` so that a prompt starting with `-`, or one that
reads "resume", is never taken for an option or a subcommand. Codex refuses to run outside a git repository
unless told `--skip-git-repo-check`, which is passed only then.

The events (codex-rs/exec/src/exec_events.rs) are one JSON object per line, tagged by `type`:
`thread.started`, `turn.started`, `turn.completed` (with `usage`), `turn.failed`, `item.started`,
`item.updated`, `item.completed` (with an `item` tagged by its own `type`), and `error`. The `usage` of
`turn.completed` is the thread's running total, not the turn's, so the parser reports differences.
In a PTY, stderr (log lines, ANSI colours) is mixed in; such lines yield nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Annotated

import msgspec

from numerusd.agents.base import AgentInvocation, AgentProfile
from numerusd.protocol.events import (
    AgentCommandExecuted,
    AgentErrorReported,
    AgentFileChanged,
    AgentMessageReceived,
    AgentThreadStarted,
    EventData,
    TokensUsed,
)
from numerusd.sandbox import existing


class CodexAdapter:
    """Runs `codex exec --json`; `launcher` replaces the program lookup (the scripted agent uses it)."""

    name = "codex"

    def __init__(self, profile: AgentProfile, *, launcher: list[str] | None = None) -> None:
        self.profile = profile
        self._launcher = launcher

    def launcher(self) -> list[str]:
        """The program (and any leading arguments) that stands for `codex`."""
        if self.profile.binary:
            return [self.profile.binary]
        if self._launcher is not None:
            return list(self._launcher)
        return [os.environ.get("CODEX_BIN") or "codex"]

    def command(self, invocation: AgentInvocation) -> tuple[list[str], dict[str, str]]:
        """`codex exec --json …` for this invocation, and the profile's extra environment."""
        profile = self.profile
        # Paths are resolved: codex refuses an -o path through a symlink, and its sandbox refuses to write in a
        # -C directory reached through one (macOS's /tmp and /var are symlinks).
        repo = invocation.repo.resolve()
        argv = [*self.launcher(), "exec", "--json", "-C", str(repo), "--sandbox", profile.own_sandbox()]
        if not inside_git_repository(repo):
            argv.append("--skip-git-repo-check")
        if profile.model:
            argv += ["-m", profile.model]
        if invocation.output_schema is not None:
            argv += ["--output-schema", str(invocation.output_schema.resolve())]
        if invocation.output_file is not None:
            argv += ["-o", str(invocation.output_file.resolve())]
        argv += profile.args
        if invocation.resume_thread is not None:
            argv += ["resume", invocation.resume_thread]
        argv += ["--", invocation.prompt]
        return argv, dict(profile.env)

    def parser(self, invocation: AgentInvocation) -> CodexOutputParser:
        """A parser for this run's output, starting from the invocation's usage baseline."""
        return CodexOutputParser(usage_baseline=invocation.usage_baseline, repo=invocation.repo)

    def binds(self) -> tuple[Path, ...]:
        """CODEX_HOME (the profile's, the daemon's, else `~/.codex`): codex writes its sessions, logs and login
        refreshes there. Made (0700) when missing and its parent exists, as codex would make it itself, which it
        cannot inside the sandbox's read-only root."""
        home = Path(self.profile.env.get("CODEX_HOME") or os.environ.get("CODEX_HOME") or "~/.codex").expanduser()
        with contextlib.suppress(OSError):
            home.mkdir(mode=0o700, exist_ok=True)
        return existing([str(home)])


def inside_git_repository(path: Path) -> bool:
    """Whether `path` is in a git work tree (or a worktree/submodule, whose `.git` is a file), looking no higher
    than git does: not into the directories GIT_CEILING_DIRECTORIES names. (Beyond a ceiling, codex may still
    find a repository: the --skip-git-repo-check this adds then costs nothing.)"""
    ceilings = {Path(p).resolve() for p in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(os.pathsep) if p}
    path = path.resolve()
    for directory in (path, *path.parents):
        if directory != path and directory in ceilings:
            return False
        if (directory / ".git").exists():
            return True
    return False


# --- the JSONL events, as far as Numerus reads them; unknown fields are ignored, unknown types skipped -------


#: More tokens than any thread uses: a count above it is a line that is not codex's (it would overflow the 64-bit
#: integers events are encoded with once summed), and is read as no event.
_TokenCount = Annotated[int, msgspec.Meta(le=10**12)]


class _Usage(msgspec.Struct):
    input_tokens: _TokenCount = 0
    cached_input_tokens: _TokenCount = 0
    output_tokens: _TokenCount = 0


class _ErrorBody(msgspec.Struct):
    message: str = "turn failed"


class _Item(msgspec.Struct, tag_field="type"):
    id: str = ""


class _AgentMessage(_Item, tag="agent_message"):
    text: str = ""


class _CommandExecution(_Item, tag="command_execution"):
    command: str = ""
    exit_code: int | None = None
    status: str = "completed"


class _FileUpdate(msgspec.Struct):
    path: str
    kind: str


class _FileChange(_Item, tag="file_change"):
    changes: list[_FileUpdate] = []
    status: str = "completed"


_ItemUnion = _AgentMessage | _CommandExecution | _FileChange


class _Event(msgspec.Struct, tag_field="type"):
    pass


class _ThreadStarted(_Event, tag="thread.started"):
    thread_id: str


class _TurnCompleted(_Event, tag="turn.completed"):
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _TurnFailed(_Event, tag="turn.failed"):
    error: _ErrorBody = msgspec.field(default_factory=_ErrorBody)


class _StreamError(_Event, tag="error"):
    message: str = "error"


class _ItemCompleted(_Event, tag="item.completed"):
    # Decoded in a second step, so an item type Numerus does not know (reasoning, todo_list, web_search,
    # mcp_tool_call, a future one) skips only itself.
    item: msgspec.Raw


_EVENT_DECODER = msgspec.json.Decoder(_ThreadStarted | _TurnCompleted | _TurnFailed | _StreamError | _ItemCompleted)
_ITEM_DECODER = msgspec.json.Decoder(_ItemUnion)

#: Colour and cursor sequences a terminal program may write around its lines.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


class CodexOutputParser:
    """Turns `codex exec --json` output lines into event payloads.

    `thread_usage` is the running total (input, cached input, output tokens) seen so far, starting from the
    invocation's baseline, so a resumed thread's first turn is not counted twice. Codex names changed files
    by absolute path; those inside `repo` are reported relative to it, as claims and diffs name them.
    """

    def __init__(self, *, usage_baseline: tuple[int, int, int] = (0, 0, 0), repo: Path | None = None) -> None:
        self.thread_usage = usage_baseline
        self.thread_id: str | None = None
        self._repo = repo.resolve() if repo is not None else None

    def feed(self, line: str) -> list[EventData]:
        """One line of terminal output -> the payloads it stands for; never raises."""
        raw = _json_part(line)
        if raw is None:
            # Codex's fatal errors before any event (a refused -o path, a bad config) are plain stderr lines.
            plain = _ANSI.sub("", line).strip()
            if plain.startswith("Error: "):
                return [AgentErrorReported(message=plain.removeprefix("Error: "))]
            return []
        try:
            event = _EVENT_DECODER.decode(raw)
        except (msgspec.MsgspecError, RecursionError):
            # Not an event Numerus reads (turn.started, item.started/updated, a future type) or not JSON; or JSON
            # nested deeper than msgspec goes, which it refuses with Python's RecursionError.
            return []
        match event:
            case _ThreadStarted(thread_id=thread_id):
                self.thread_id = thread_id
                return [AgentThreadStarted(thread_id=thread_id)]
            case _TurnCompleted(usage=usage):
                return [self._tokens_used(usage)]
            case _TurnFailed(error=error):
                return [AgentErrorReported(message=error.message)]
            case _StreamError(message=message):
                return [AgentErrorReported(message=message)]
            case _ItemCompleted(item=item):
                return self._completed_item(item)
        return []

    def _completed_item(self, raw: msgspec.Raw) -> list[EventData]:
        try:
            item = _ITEM_DECODER.decode(raw)
        except (msgspec.MsgspecError, RecursionError):
            return []
        match item:
            case _AgentMessage(text=text):
                return [AgentMessageReceived(text=text)]
            case _CommandExecution(command=command, exit_code=exit_code, status=status):
                return [AgentCommandExecuted(command=command, exit_code=exit_code, status=status)]
            case _FileChange(changes=changes, status="completed"):
                return [AgentFileChanged(path=self._repo_path(c.path), kind=c.kind) for c in changes]
        # A file change that failed to apply changed nothing to report.
        return []

    def _repo_path(self, path: str) -> str:
        if self._repo is None or not os.path.isabs(path):
            return path
        try:
            return Path(path).relative_to(self._repo).as_posix()
        except ValueError:
            return path

    def _tokens_used(self, usage: _Usage) -> TokensUsed:
        now = (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)
        # Codex reports the thread's running totals. A total lower than one seen before (a thread whose
        # counters were not restored, or a turn that reported none) counts as no new usage, and the higher
        # figure stays the total, so no token is ever counted twice.
        before = self.thread_usage
        turn = [max(0, n - b) for n, b in zip(now, before, strict=True)]
        self.thread_usage = (max(now[0], before[0]), max(now[1], before[1]), max(now[2], before[2]))
        return TokensUsed(
            input_tokens=turn[0],
            cached_input_tokens=turn[1],
            output_tokens=turn[2],
            thread_input_tokens=self.thread_usage[0],
            thread_cached_input_tokens=self.thread_usage[1],
            thread_output_tokens=self.thread_usage[2],
        )


def _json_part(line: str) -> str | None:
    """The JSON object in a line, if it looks like one: `\\r` and ANSI sequences around it removed."""
    line = line.rstrip("\r\n")
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    line = line.strip()
    if line.startswith("{"):
        return line
    # stderr may have written an unterminated fragment just before codex printed its event on the same line.
    start = line.find('{"type"')
    return line[start:] if start > 0 else None
