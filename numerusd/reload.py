"""Taking the configuration again while numerusd runs: `kill -HUP <pid>` (`systemctl reload numerusd`).

The settings are loaded again from the same sources as at start (the file, the environment as numerusd got it,
its flags) and taken whole, or not at all:

- taken (`LIVE`): agent profiles and roles, `default_agent`, checks, review, claims, parallel, attempts, backoff,
  replans and timeouts (the defaults of the jobs submitted from then on: a job keeps the settings it started
  with), and the limits `max_request_bytes`, `kill_grace_s`, `log_chunk_bytes` and `log_flush_ms`;
- refused (`RESTART_ONLY`): where the state and the keys are, which NATS server and login, what streams and the
  event store were made with (`replicas`, `max_event_bytes`, `dlq_max_bytes`, `lease_ttl_s`), when snapshots are
  written, and where metrics, logs and spans go (`metrics_address`, `log_format`, `otel_endpoint`): a reload that
  changes one of them changes nothing, and the log says which and why, in one line;
- a file that does not load (bad TOML, a bad value, an unknown profile) changes nothing either: one line in the
  log, the daemon serving on as before. So does a profile that brings a secret the daemon's redaction does not
  know yet (a restart takes it), or a sandboxed profile when bwrap cannot run.

The signal handler only schedules the reload (`Reloader.requested`); signals arriving while one runs are taken by
one more reload after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import msgspec

from numerusd import sandbox
from numerusd.book import JobBook
from numerusd.config import Settings
from numerusd.errors import ConfigError, one_line
from numerusd.handlers.context import Context
from numerusd.redaction import MIN_SECRET_LENGTH, known_secrets
from numerusd.runner import Runner

log = logging.getLogger("numerusd.reload")

#: Settings a running daemon cannot change: it would need its state, keys, bus or streams made again.
RESTART_ONLY = (
    "state_dir",
    "key_file",
    "nats_url",
    "nats_user",
    "nats_password",
    "nats_creds",
    "replicas",
    "max_event_bytes",
    "dlq_max_bytes",
    "snapshot_every_events",
    "snapshot_every_s",
    "metrics_address",  # the endpoint, the log handler and the span exporter are set up once, at start
    "log_format",
    "otel_endpoint",
    "lease_ttl_s",
)
#: Every other setting is taken by a reload.
LIVE = tuple(f.name for f in msgspec.structs.fields(Settings) if f.name not in RESTART_ONLY)


class Daemon(Protocol):
    """What a reload reads and replaces of the daemon (`numerusd.daemon.Daemon`)."""

    settings: Settings
    book: JobBook | None
    runner: Runner | None
    context: Context | None


def refusal(old: Settings, new: Settings) -> str | None:
    """Why `new` cannot replace `old` in a running daemon, or None."""
    changed = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if changed:
        return f"{', '.join(changed)} cannot change while numerusd runs (restart it to take them)"
    return None


def changes(old: Settings, new: Settings) -> list[str]:
    """The names of the settings `new` changes (`agents.<name>` for each profile added, changed or removed)."""
    names = [name for name in LIVE if name != "agents" and getattr(old, name) != getattr(new, name)]
    profiles = sorted(set(old.agents) | set(new.agents))
    return names + [f"agents.{name}" for name in profiles if old.agents.get(name) != new.agents.get(name)]


class Reloader:
    """Loads the settings again (`load`, the same sources as at start) when asked, and gives them to the daemon's
    parts that take them live (`take`)."""

    def __init__(self, daemon: Daemon, load: Callable[[], Settings]) -> None:
        self.daemon = daemon
        self.load = load
        self._running: asyncio.Task[None] | None = None
        self._again = False

    def requested(self) -> None:
        """SIGHUP: reload soon (once more after the reload under way, if one is)."""
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.get_running_loop().create_task(self._reload_until_done(), name="reload")

    async def _reload_until_done(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Load and take the settings; False (with one line in the log) when they are refused."""
        old = self.daemon.settings
        try:
            new = await asyncio.to_thread(self.load)
            why = refusal(old, new) or self._unsafe(old, new)
            if why is None:
                await asyncio.to_thread(sandbox.check_sandboxes, _newly_sandboxed(old, new))
        except ConfigError as e:
            why = e.message
        if why is not None:
            log.error("configuration not reloaded, numerusd keeps the one it has: %s", one_line(why))
            return False
        if self.daemon.runner is None or self.daemon.context is None:
            log.warning("configuration not reloaded: numerusd is still starting; send SIGHUP again once it is ready")
            return False
        changed = changes(old, new)
        take(self.daemon, new)
        log.info("configuration reloaded: %s", ", ".join(changed) if changed else "nothing changed")
        return True

    def _unsafe(self, old: Settings, new: Settings) -> str | None:
        """A profile that brings a secret the running redaction does not look for: agents would print it unhidden."""
        redactor = self.daemon.book.redactor if self.daemon.book is not None else None
        if redactor is None:
            return None
        for name, profile in new.agents.items():
            if old.agents.get(name) == profile:
                continue
            secrets = known_secrets([(profile.env, profile.secret_env)])
            for kind, values in secrets.items():
                for value in values:
                    if len(value) >= MIN_SECRET_LENGTH and redactor.redact_text(value, Counter()) == value:
                        return f"agents.{name} brings a secret ({kind}) numerusd does not redact yet (restart it)"
        return None


def take(daemon: Daemon, new: Settings) -> None:
    """Give `new` to every part that reads settings as it goes: jobs started from now on (the runner), requests
    (the handlers' context), the agents' limits, and the daemon's agent slots. Running jobs keep theirs."""
    assert daemon.runner is not None and daemon.context is not None
    daemon.settings = new
    daemon.runner.settings = new
    daemon.context.settings = new
    agents = daemon.runner.agents
    agents.kill_grace_s = new.kill_grace_s
    agents.chunk_bytes = new.log_chunk_bytes
    agents.flush_s = new.log_flush_ms / 1000
    daemon.runner.pool.resize(new.max_agents)


def _newly_sandboxed(old: Settings, new: Settings) -> list[str]:
    """The profiles that need bwrap and did not before (the daemon checked those it started with)."""
    return [
        name
        for name, profile in new.agents.items()
        if profile.sandbox == "bwrap" and (name not in old.agents or old.agents[name].sandbox != "bwrap")
    ]
