"""Which adapter runs which kind of agent: `adapter_for(profile)`.

Apart from `base` (the port) so that the adapters, which import the port, are not imported back by it.
"""

from __future__ import annotations

from numerusd.agents.base import AgentAdapter, AgentProfile
from numerusd.agents.codex import CodexAdapter
from numerusd.agents.scripted import ScriptedAdapter
from numerusd.errors import ConfigError

#: The adapter of each kind of agent.
ADAPTERS: dict[str, type[CodexAdapter]] = {"codex": CodexAdapter, "scripted": ScriptedAdapter}
#: The kinds `adapter_for` knows.
KNOWN_KINDS = tuple(ADAPTERS)


def adapter_for(profile: AgentProfile) -> AgentAdapter:
    """The adapter for a profile's kind; ConfigError naming the known kinds for any other."""
    adapter = ADAPTERS.get(profile.kind)
    if adapter is None:
        raise ConfigError(
            f"unknown agent kind {profile.kind!r}; known kinds: {', '.join(KNOWN_KINDS)}",
            kind=profile.kind,
            known=KNOWN_KINDS,
        )
    return adapter(profile)
