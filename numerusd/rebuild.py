"""`numerusd rebuild`: drop the SQLite views and replay the whole event stream into them.

With the daemon stopped it replaces the views in place (starting the embedded nats-server for the time of the
replay when no NATS URL is configured). While a daemon runs, the views are its to write, so `--to FILE`
rebuilds into another file instead, through the running daemon's server: comparing that file with the live
views is how an operator checks that the projection holds.
"""

from __future__ import annotations

from pathlib import Path

from numerusd import state_lock
from numerusd.config import NatsAddress, Settings
from numerusd.embedded_nats import EmbeddedNats
from numerusd.errors import ConfigError
from numerusd.keys import Keyring
from numerusd.projections import RebuildReport, rebuild
from numerusd.protocol.connection import decode_connection


async def rebuild_views(settings: Settings, target: Path | None) -> str:
    """Rebuild the views (in place, or into `target`) and say what was done."""
    keyring = Keyring.load(settings.keys_path)
    running = state_lock.held(settings.state_dir)
    if running and target is None:
        raise ConfigError(
            f"numerusd is running on {settings.state_dir}; stop it first, or rebuild into another file with --to FILE"
        )
    embedded = None
    address = settings.configured_nats()
    if address is None and running:
        connection = decode_connection(settings.connection_path.read_bytes())
        address = NatsAddress(url=connection.url, user=connection.user, password=connection.password)
    elif address is None:
        embedded = EmbeddedNats(store_dir=settings.nats_store_dir)
        address = NatsAddress(url=embedded.start(), user=embedded.user, password=embedded.password)
    try:
        db_path = target or settings.db_path
        report: RebuildReport = await rebuild(address, keyring.keys, db_path)
    finally:
        if embedded is not None:
            embedded.stop()
    return (
        f"rebuilt {db_path}: {report.messages} messages, {report.applied} events applied, "
        f"{report.rejected} rejected, {report.jobs} jobs, {report.tasks} tasks "
        f"in {report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)"
    )
