"""`numerusd rebuild`: drop the SQLite views and replay the whole event stream into them.

With the daemon stopped it replaces the views in place (starting the embedded nats-server for the time of the
replay when no NATS URL is configured). While a daemon runs, the views are its to write, so `--to FILE`
rebuilds into another file instead, through the running daemon's server: comparing that file with the live
views is how an operator checks that the projection holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import nats

from numerusd import state_lock
from numerusd.config import Settings
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import ConfigError, NatsUnavailable
from numerusd.keys import Keyring
from numerusd.projections import RebuildReport, rebuild


async def rebuild_views(settings: Settings, target: Path | None) -> str:
    """Rebuild the views (in place, or into `target`) and say what was done."""
    keyring = Keyring.load(settings.keys_path)
    running = state_lock.held(settings.state_dir)
    if running and target is None:
        raise ConfigError(
            f"numerusd is running on {settings.state_dir}; stop it first, or rebuild into another file with --to FILE"
        )
    embedded = None
    if settings.nats_url:
        url, user, password = settings.nats_url, settings.nats_user, settings.nats_password
    elif running:
        connection = json.loads(settings.connection_path.read_text())
        url, user, password = connection["url"], connection["user"], connection["password"]
    else:
        embedded = EmbeddedNats(store_dir=settings.nats_store_dir)
        url, user, password = embedded.start(), embedded.user, embedded.password
    try:
        try:
            nc = await nats.connect(url, user=user, password=password, allow_reconnect=False, connect_timeout=5)
        except Exception as e:
            raise NatsUnavailable(f"cannot connect to NATS at {url}: {e}") from e
        try:
            db_path = target or settings.db_path
            report: RebuildReport = await rebuild(nc, keyring.keys, db_path)
        finally:
            await nc.close()
    finally:
        if embedded is not None:
            embedded.stop()
    return (
        f"rebuilt {db_path}: {report.messages} messages, {report.applied} events applied, "
        f"{report.rejected} rejected, {report.jobs} jobs, {report.tasks} tasks "
        f"in {report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)"
    )
