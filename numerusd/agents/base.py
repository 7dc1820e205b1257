"""The agent port: what configuration says about an agent, and the Protocol every agent adapter implements.

An adapter turns one invocation (a prompt for a repository, maybe resuming a thread) into a command line, and
gives a parser that turns the agent's terminal output, line by line, into event payloads. Spawning the command
is not the adapter's business (see `numerusd.terminal`), so every adapter runs through the same code path, and
`tests/test_agent_adapters.py` is the contract suite each one must pass.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Literal, Protocol

import msgspec

from numerusd.protocol.events import EventData


class AgentProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What configuration says about an agent: which kind, which binary, model, sandboxes and extras."""

    kind: str = "codex"
    #: Overrides the adapter's own lookup of its program (CODEX_BIN, then PATH, for codex).
    binary: str | None = None
    model: str | None = None
    #: The agent's own sandbox mode (codex's `--sandbox`), inside Numerus's; None: `own_sandbox()` chooses. See
    #: docs/agents.md, "Sandbox".
    agent_sandbox: str | None = None
    #: Numerus's sandbox around every process of this agent (`numerusd.sandbox`); "none" runs it as the daemon's
    #: user sees the machine, and `status` says so.
    sandbox: Literal["bwrap", "none"] = "bwrap"
    #: Whether the sandboxed agent reaches the network (models are remote).
    network: bool = True
    #: Extra paths the sandboxed agent may write (`~` expanded), beyond those its adapter needs.
    binds: tuple[str, ...] = ()
    #: Extra arguments, e.g. ("-c", 'model_reasoning_effort="high"').
    args: tuple[str, ...] = ()
    #: Extra environment, e.g. {"CODEX_HOME": "..."}; it may hold secrets, so it never goes into an event.
    env: dict[str, str] = {}
    #: Names of environment variables whose values are redacted from everything stored (besides the well-known
    #: ones, `numerusd.redaction.DEFAULT_SECRET_ENV`); looked up in `env`, then in the daemon's environment.
    secret_env: tuple[str, ...] = ()
    #: "claimed": the gate fails a task whose agent ran a command its claim did not list (docs/pipeline.md).
    commands: Literal["claimed", "any"] = "any"
    #: The profile that makes one more attempt of a task whose attempts on this profile all failed (then the task
    #: waits for approval); None: the task fails (docs/operations.md, "Approvals").
    escalate: str | None = None

    def own_sandbox(self, *, read_only: bool = False) -> str:
        """The agent's own sandbox mode for a run: the one configured; else, inside Numerus's sandbox, none of its
        own (`danger-full-access`: Numerus's gives the guarantees, and a sandbox nested in it fails where user
        namespaces do not nest), and without Numerus's, `read-only` for the roles that only answer and
        `workspace-write` for executors. A configured mode is `read-only` for those roles, unless it is none."""
        if self.agent_sandbox is None:
            if self.sandbox == "bwrap":
                return "danger-full-access"
            return "read-only" if read_only else "workspace-write"
        if read_only and not (self.sandbox == "bwrap" and self.agent_sandbox == "danger-full-access"):
            return "read-only"
        return self.agent_sandbox

    def __repr__(self) -> str:
        # Values of `env` may be API keys: show the names only.
        return (
            f"AgentProfile(kind={self.kind!r}, binary={self.binary!r}, model={self.model!r}, "
            f"agent_sandbox={self.agent_sandbox!r}, sandbox={self.sandbox!r}, network={self.network!r}, "
            f"binds={self.binds!r}, args={self.args!r}, env=<{', '.join(sorted(self.env))}>)"
        )


class AgentInvocation(msgspec.Struct, frozen=True, kw_only=True):
    """One run of an agent: the prompt, the repository it works in, and what to resume or write."""

    prompt: str
    #: The agent's working root (`-C`); the process also starts there.
    repo: Path
    resume_thread: str | None = None
    #: JSON Schema the final message must follow (plans, claims, review verdicts).
    output_schema: Path | None = None
    #: Where the agent writes its final message.
    output_file: Path | None = None
    #: Thread totals (input, cached input, output tokens) already counted, when resuming a thread.
    usage_baseline: tuple[int, int, int] = (0, 0, 0)


class AgentOutputParser(Protocol):
    """Turns an agent's terminal output into event payloads; one parser per run, fed in order."""

    def feed(self, line: str) -> list[EventData]:
        """One line of output (without its line ending) -> zero or more payloads; never raises."""
        ...


class AgentAdapter(Protocol):
    """How to run one kind of agent and understand what it prints."""

    name: str

    def command(self, invocation: AgentInvocation) -> tuple[list[str], dict[str, str]]:
        """The argv to spawn and the environment to add to the daemon's."""
        ...

    def parser(self, invocation: AgentInvocation) -> AgentOutputParser:
        """A fresh parser for the output of this invocation."""
        ...

    def binds(self) -> tuple[Path, ...]:
        """Paths outside its work directory the agent must write, in a sandbox (its own session store)."""
        ...


#: The longest line a parser is given, in characters: a longer one is cut there, each piece a line of its own
#: ending with SPLIT_MARK (an agent that prints 64 MB without a newline must cost linear time, not stall us).
#: Well above the event cap (event_caps.py), so a long message still parses and is recorded truncated.
MAX_LINE = 16 << 20
SPLIT_MARK = " [numerus: line cut at 16 MiB]"


class LineBuffer:
    """Splits terminal output chunks into lines for a parser: UTF-8 (bad bytes replaced), `\\r` stripped.

    Chunks from a PTY end anywhere, even inside a multi-byte character; the partial line waits for the next
    chunk, and `close()` returns what is left at end of file. The work is linear in the bytes fed: a partial
    line is kept as pieces and joined once, when its end arrives, and cut at `MAX_LINE` characters.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []
        self._pending = 0

    def feed(self, data: bytes) -> list[str]:
        """The complete lines in `data` and whatever came before it."""
        text = self._decoder.decode(data)
        lines: list[str] = []
        *ends, rest = text.split("\n")
        for end in ends:
            lines += self._cut(end)
            lines.append("".join(self._pieces).removesuffix("\r"))
            self._pieces, self._pending = [], 0
        lines += self._cut(rest)
        return lines

    def close(self) -> list[str]:
        """The last, unterminated line, if any."""
        lines = self._cut(self._decoder.decode(b"", final=True))
        rest = "".join(self._pieces).removesuffix("\r")
        self._pieces, self._pending = [], 0
        return [*lines, rest] if rest else lines

    def _cut(self, text: str) -> list[str]:
        """Add `text` to the partial line; the MAX_LINE pieces it completes, as lines."""
        cut = []
        while self._pending + len(text) > MAX_LINE:
            room = MAX_LINE - self._pending
            cut.append("".join([*self._pieces, text[:room]]) + SPLIT_MARK)
            text = text[room:]
            self._pieces, self._pending = [], 0
        if text:
            self._pieces.append(text)
            self._pending += len(text)
        return cut
