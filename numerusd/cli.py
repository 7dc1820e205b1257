"""`numerusd`: run the daemon (the default), or rebuild its SQLite views from the stream.

Exit codes (`protocol/exit_codes.DaemonExit`, chosen by the error's type): 0 stopped cleanly; 69 NATS
unavailable or too old, or the lease of the stream passed to another numerusd while this one ran; 70 internal error;
75 another daemon holds the state directory or (without `--standby`) the lease of the stream; 78 bad configuration.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import uvloop

from numerusd import __version__, logs
from numerusd.config import Settings, load_settings
from numerusd.errors import ConfigError, LeaseLost, NatsUnavailable, NumerusError, StateLocked
from numerusd.protocol.exit_codes import DaemonExit


def _load(ctx: click.Context) -> Settings:
    """The settings from the flags given, the environment and the file; ConfigError saying what is wrong."""
    options = ctx.find_root().params
    return load_settings(
        config_file=options["config"],
        state_dir=options["state_dir"],
        nats_url=options["nats_url"],
        nats_user=options["nats_user"],
        nats_password=options["nats_password"],
        nats_creds=options["creds"],
        metrics_address=options["metrics"],
        log_format=options["log_format"],
        replicas=options["replicas"],
    )


def _settings(ctx: click.Context) -> Settings:
    try:
        return _load(ctx)
    except ConfigError as e:
        click.echo(f"numerusd: {e.message}", err=True)
        sys.exit(_exit_code(e))


#: The exit code of each kind of error, most specific first; any other NumerusError is internal (70).
_EXIT_CODES: tuple[tuple[type[NumerusError], DaemonExit], ...] = (
    (StateLocked, DaemonExit.LOCKED),
    (ConfigError, DaemonExit.CONFIG),
    (NatsUnavailable, DaemonExit.UNAVAILABLE),
    (LeaseLost, DaemonExit.UNAVAILABLE),
)


def _exit_code(error: NumerusError) -> int:
    """The exit code for an error that stops numerusd, chosen by its type."""
    return next((int(code) for kind, code in _EXIT_CODES if isinstance(error, kind)), int(DaemonExit.SOFTWARE))


@click.group(invoke_without_command=True)
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="NUMERUS_STATE_DIR", help="State directory.")
@click.option(
    "--nats-url",
    envvar="NUMERUS_NATS_URL",
    help="Use this NATS server (a cluster: its nodes' URLs, comma separated) instead of the embedded one.",
)
@click.option("--nats-user", envvar="NUMERUS_NATS_USER", help="User for --nats-url.")
@click.option("--nats-password", envvar="NUMERUS_NATS_PASSWORD", help="Password for --nats-url.")
@click.option("--creds", type=click.Path(path_type=Path), envvar="NUMERUS_NATS_CREDS", help="NATS credentials file.")
@click.option("--replicas", help="Servers holding each stream: 1, or 3 on a three-node cluster [1].")
@click.option("--config", type=click.Path(path_type=Path), envvar="NUMERUS_CONFIG", help="TOML configuration file.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or one JSON object each [text]."
)
@click.option("--metrics", metavar="ADDR", help="Serve Prometheus metrics on ADDR (PORT or HOST:PORT) at /metrics.")
@click.option(
    "--standby",
    is_flag=True,
    envvar="NUMERUS_STANDBY",
    help="When another numerusd holds the streams, wait and take over once it stops or its lease lapses.",
)
@click.version_option(__version__, prog_name="numerusd")
@click.pass_context
def main(ctx: click.Context, **_options: object) -> None:
    """The Numerus daemon. With no command it runs until SIGINT or SIGTERM."""
    # Everything numerusd and its children create (views, run logs, the embedded server's store) holds the
    # history or agents' output: its owner's alone, whatever umask numerusd was started with.
    os.umask(0o077)
    logs.configure(str(ctx.params["log_level"]), ctx.params["log_format"] or "text")
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the daemon in the foreground."""
    from numerusd.daemon import Daemon, install_signal_handlers
    from numerusd.reload import Reloader

    settings = _settings(ctx)
    logs.configure(str(ctx.find_root().params["log_level"]), settings.log_format)  # the file's or $NUMERUS_LOG_FORMAT
    standby = bool(ctx.find_root().params["standby"])
    if standby and settings.configured_nats() is None:
        click.echo(
            "numerusd: --standby needs the shared NATS server of the daemon it stands by for (nats_url)", err=True
        )
        sys.exit(int(DaemonExit.CONFIG))

    async def run() -> None:
        daemon = Daemon(settings, standby=standby)
        install_signal_handlers(daemon, Reloader(daemon, lambda: _load(ctx)))
        await daemon.serve()

    _serve(run)


@main.command()
@click.option(
    "--to",
    "target",
    type=click.Path(path_type=Path),
    help="Rebuild into this file instead of replacing the views (works while the daemon runs).",
)
@click.pass_context
def rebuild(ctx: click.Context, target: Path | None) -> None:
    """Drop the SQLite views and replay the whole event stream into them."""
    from numerusd.views.rebuild import rebuild_views

    settings = _settings(ctx)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(rebuild_views(settings, target))
    except NumerusError as e:
        click.echo(f"numerusd: {e.message}", err=True)
        sys.exit(_exit_code(e))
    click.echo(report)


@main.group()
def keys() -> None:
    """Manage the HMAC keys events are signed with."""


@keys.command()
@click.pass_context
def rotate(ctx: click.Context) -> None:
    """Add a new signing key and make it current; older keys stay, so older events still verify.

    Creates the key file (with one key) when there is none yet. numerusd signs with the new key from its next
    start; give auditors the new key file.
    """
    from numerusd.keys import Keyring

    path = _settings(ctx).keys_path
    try:
        ring = Keyring.load(path).rotated() if path.exists() else Keyring.generate(path)
        ring.save(path)
    except ConfigError as e:
        click.echo(f"numerusd: {e.message}", err=True)
        sys.exit(_exit_code(e))
    except OSError as e:  # e.g. a systemd credential: a read-only copy; rotate the file LoadCredential= names
        click.echo(f"numerusd: cannot write {path}: {e.strerror} (rotate the file it is a copy of)", err=True)
        sys.exit(int(DaemonExit.CONFIG))
    click.echo(f"{path}: new current key {ring.current_kid} ({len(ring.keys)} keys); restart numerusd to sign with it")


@main.command()
@click.option("--name", required=True, help="This worker's name on the bus (numerus.worker.<name>.*).")
@click.option("--pool", "pools", multiple=True, required=True, help="A pool to take work from (repeat for several).")
@click.option("--slots", type=click.IntRange(1, 256), default=1, show_default=True, help="Attempts run at once.")
@click.option(
    "--dir", "work_dir", type=click.Path(path_type=Path), required=True, help="Its own directory: caches, worktrees."
)
@click.option(
    "--connection",
    type=click.Path(path_type=Path),
    required=True,
    help="The connection file the daemon wrote for workers (worker.json): the bus URL and the worker's login.",
)
@click.option("--config", type=click.Path(path_type=Path), help="Its numerus.toml: the agent profiles it runs.")
@click.option(
    "--heartbeat-s", type=click.FloatRange(min=0.05), default=2.0, show_default=True, help="Heartbeat period."
)
@click.option("--drain-s", type=click.FloatRange(min=0), default=30.0, show_default=True, help="Grace at a stop.")
@click.pass_context
def worker(
    ctx: click.Context,
    name: str,
    pools: tuple[str, ...],
    slots: int,
    work_dir: Path,
    connection: Path,
    config: Path | None,
    heartbeat_s: float,
    drain_s: float,
) -> None:
    """Run task attempts for a daemon on this machine (numerusd/worker.py) until SIGINT or SIGTERM."""
    from numerusd.protocol.ids import is_token
    from numerusd.sandbox import check_sandboxes
    from numerusd.worker import Worker, WorkerOptions, install_signal_handlers, read_login

    work_dir = work_dir.expanduser().absolute()
    given = config or ctx.find_root().params["config"]
    config_file = (given or work_dir / "numerus.toml").expanduser().absolute()
    try:
        for what, value in [("--name", name), *(("--pool", pool) for pool in pools)]:
            if not is_token(value):
                raise ConfigError(f"{what} {value!r}: letters, digits, '_' and '-', not starting with '-', at most 64")
        # Without --config, `<dir>/numerus.toml` if there is one (the daemon's rule, with --dir as its state).
        settings = load_settings(config_file=given, state_dir=work_dir)
        check_sandboxes(each for each, profile in settings.agents.items() if profile.sandbox == "bwrap")
        login = read_login(connection.expanduser().absolute())
        work_dir.mkdir(parents=True, exist_ok=True)
    except ConfigError as e:
        click.echo(f"numerusd: {e.message}", err=True)
        sys.exit(_exit_code(e))
    except OSError as e:
        click.echo(f"numerusd: cannot make {work_dir}: {e.strerror}", err=True)
        sys.exit(int(DaemonExit.CONFIG))
    options = WorkerOptions(
        name=name,
        pools=tuple(dict.fromkeys(pools)),
        slots=slots,
        dir=work_dir,
        connection_file=connection.expanduser().absolute(),
        config_file=config_file,
        heartbeat_s=heartbeat_s,
        drain_s=drain_s,
    )

    async def run() -> None:
        worker = Worker(options, settings, login)
        install_signal_handlers(worker)
        await worker.serve()

    _serve(run)


def _serve(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `run()` on uvloop to its end; a NumerusError is one line and the exit code its type says."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run())
    except NumerusError as e:
        click.echo(f"numerusd: {e.message}", err=True)
        sys.exit(_exit_code(e))
