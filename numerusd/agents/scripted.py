"""The `scripted` agent adapter: the Codex adapter, running the scripted fake Codex instead of the real one.

Because it is the very same adapter (command line and parser), every run of the scripted agent in tests and
demos exercises the code path real Codex runs take. The scenario the fake plays comes from `NUMERUS_SCENARIO`,
usually set through the profile's `env`; see docs/agents.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from numerusd.agents.base import AgentProfile
from numerusd.agents.codex import CodexAdapter


def scripted_agent_launcher() -> list[str]:
    """The command that starts the scripted agent with the interpreter running the daemon."""
    # The console script sits beside the interpreter in a virtualenv or an installed prefix; when the
    # package runs from a source tree without it, the module runs the same main().
    script = Path(sys.executable).parent / "numerus-scripted-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "numerusd.agents.scripted_agent"]


class ScriptedAdapter(CodexAdapter):
    """Codex's command line and parser, with the scripted agent as the program (unless `binary` is set)."""

    name = "scripted"

    def __init__(self, profile: AgentProfile) -> None:
        super().__init__(profile, launcher=scripted_agent_launcher())
