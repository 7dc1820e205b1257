"""The `scripted` agent adapter: the Codex adapter, running the scripted fake Codex instead of the real one.

Because it is the very same adapter (command line and parser), every run of the scripted agent in tests and
demos exercises the code path real Codex runs take. The scenario the fake plays comes from `NUMERUS_SCENARIO`,
usually set through the profile's `env`; see docs/agents.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from numerusd.agents.base import AgentProfile
from numerusd.agents.codex import CodexAdapter


def scripted_agent_launcher() -> list[str]:
    """The command that starts the scripted agent: the daemon's interpreter, isolated and without `site`.

    The agent needs the standard library only, and it is started for every agent call of every test and
    benchmark: skipping `site` skips the `.pth` files of site-packages (an editable install's import hook alone
    costs ~45 ms a start, half of the agent's start-up). The package is imported from where this file lives, so
    its compiled modules are used. The console script `numerus-scripted-agent` runs the same `main()`.
    """
    root = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); "
        "from numerusd.agents.scripted_agent import main; sys.exit(main())"
    )
    return [sys.executable, "-I", "-S", "-c", code]


class ScriptedAdapter(CodexAdapter):
    """Codex's command line and parser, with the scripted agent as the program (unless `binary` is set)."""

    name = "scripted"

    def __init__(self, profile: AgentProfile) -> None:
        super().__init__(profile, launcher=scripted_agent_launcher())
