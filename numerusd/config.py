"""The daemon's settings: where its state lives, which NATS server to use, which agents it knows.

Settings come from four layers, each overriding the one before: built-in defaults, a TOML file (`--config FILE`,
else `$NUMERUS_CONFIG`, else `<state_dir>/numerus.toml` when present), the environment (`NUMERUS_*`), and the
command-line flags. A bad value stops the daemon with one line naming its source and the path of the field,
msgspec's way (`numerus.toml: Expected `array`, got `str` - at `$.agents.codex.args``).

An example file:

    nats_url = "nats://nats.internal:4222"
    nats_creds = "/etc/numerus/numerus.creds"
    default_agent = "codex"
    kill_grace_s = 10

    [agents.codex]                  # merged over the built-in `codex` profile
    model = "gpt-5-codex"
    args = ["-c", "model_reasoning_effort=\"high\""]

    [agents.careful]                # a new profile
    kind = "codex"
    agent_sandbox = "read-only"     # codex's own --sandbox (docs/agents.md, "Sandbox")
    network = false                 # Numerus's sandbox: no network (sandbox = "none" runs it unsandboxed)
    binds = ["~/.cache/careful"]    # extra writable paths

    [roles]                         # which profile plays each role of a planned job (default: default_agent)
    planner = "careful"
    executor = "codex"

    checks = ["pytest -q"]          # run in each task's worktree by the quality gate

The file names `state_dir` too, but the file itself is looked for in the state directory given by the flag, the
environment or the default, so a `state_dir` set there only moves the state, not the file.

The connection file the daemon writes for `numerusctl` (`write_connection_file`) lives here as well, so the
daemon's side of that contract sits beside the settings that name its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from numerusd.agents.base import AgentProfile
from numerusd.errors import ConfigError
from numerusd.protocol import connection
from numerusd.protocol.commands import DEFAULT_STATE_DIR, MAX_TOKENS, ROLES

#: The profiles every installation has; a file's `[agents.<name>]` table is merged over them field by field.
BUILTIN_AGENTS: dict[str, AgentProfile] = {
    "codex": AgentProfile(kind="codex"),
    "scripted": AgentProfile(kind="scripted"),
}

#: Environment variable for each setting that can be given that way.
ENV_VARS: dict[str, str] = {
    "state_dir": "NUMERUS_STATE_DIR",
    "nats_url": "NUMERUS_NATS_URL",
    "nats_user": "NUMERUS_NATS_USER",
    "nats_password": "NUMERUS_NATS_PASSWORD",
    "nats_creds": "NUMERUS_NATS_CREDS",
    "default_agent": "NUMERUS_DEFAULT_AGENT",
    "kill_grace_s": "NUMERUS_KILL_GRACE_S",
    "log_chunk_bytes": "NUMERUS_LOG_CHUNK_BYTES",
    "log_flush_ms": "NUMERUS_LOG_FLUSH_MS",
    "parallel": "NUMERUS_PARALLEL",
    "max_agents": "NUMERUS_MAX_AGENTS",
    "key_file": "NUMERUS_KEY_FILE",
    "metrics_address": "NUMERUS_METRICS_ADDRESS",
    "log_format": "NUMERUS_LOG_FORMAT",
    "otel_endpoint": "NUMERUS_OTEL_ENDPOINT",
    "replicas": "NUMERUS_REPLICAS",
}

#: The replica counts a stream may have: one server, or a three-node cluster (docs/operations.md, "A three-node
#: cluster"). Two would stop writing when either node is down, no better than one; five is not offered yet.
REPLICAS = (1, 3)

#: The systemd credential (`LoadCredential=numerus-keys:/etc/numerus/keys.json`) the keys are read from when no
#: `key_file` is set: systemd hands the service a private copy in `$CREDENTIALS_DIRECTORY`.
KEYS_CREDENTIAL = "numerus-keys"

CONFIG_ENV_VAR = "NUMERUS_CONFIG"
CONFIG_FILE_NAME = "numerus.toml"


class NatsAddress(msgspec.Struct, frozen=True, kw_only=True):
    """Where a NATS server is and how to log in to it."""

    url: str
    user: str | None = None
    password: str | None = None
    #: A credentials file (JWT and nkey seed).
    creds: str | None = None

    def options(self) -> dict[str, str]:
        """nats-py `connect` keyword arguments for the credentials."""
        options = {}
        if self.user:
            options |= {"user": self.user, "password": self.password or ""}
        if self.creds:
            options["user_credentials"] = self.creds
        return options

    def __repr__(self) -> str:
        # As for Settings: the password never reaches a log line.
        password = "<set>" if self.password else None
        return f"NatsAddress(url={self.url!r}, user={self.user!r}, password={password}, creds={self.creds!r})"


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a model's tokens cost, per million (`[prices."gpt-5-codex"]`); cached input costs `input` unless given."""

    input: Annotated[float, msgspec.Meta(ge=0)]
    cached_input: Annotated[float, msgspec.Meta(ge=0)] | None = None
    output: Annotated[float, msgspec.Meta(ge=0)]

    def cost(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        """The cost of these tokens (`input_tokens` counts the cached ones too, as codex reports them)."""
        cached = min(cached_input_tokens, input_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((input_tokens - cached) * self.input + cached * cached_price + output_tokens * self.output) / 1e6


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything numerusd is told from outside; build it with `load_settings`, not by hand."""

    state_dir: Path = msgspec.field(default_factory=lambda: Path(DEFAULT_STATE_DIR).expanduser())
    #: None: start the embedded nats-server in `nats_store_dir`. Several URLs, comma separated, are the nodes of
    #: one cluster: numerusd connects to one of them and moves to another when it goes down.
    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    #: A NATS credentials file (JWT and nkey seed) for an external server.
    nats_creds: Path | None = None
    #: How many servers hold each of Numerus's streams (and key-value buckets): 1, or 3 on a three-node cluster
    #: whose client URLs `nats_url` lists, comma separated.
    replicas: int = 1
    default_agent: str = "codex"
    agents: dict[str, AgentProfile] = msgspec.field(default_factory=lambda: dict(BUILTIN_AGENTS))
    #: Seconds between SIGTERM and SIGKILL when an agent is stopped.
    kill_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: Largest chunk of agent terminal output published on `numerus.log.<job>.<task>`.
    log_chunk_bytes: Annotated[int, msgspec.Meta(ge=256, le=1024 * 1024)] = 32 * 1024
    #: Longest time output waits in the buffer before it is published anyway.
    log_flush_ms: Annotated[int, msgspec.Meta(ge=1)] = 100
    #: Agent profile of each role of a planned job; a role not named here is played by `default_agent`.
    roles: dict[str, str] = {}
    #: Most agents of one job working at once (`numerusctl run --parallel`); claims are asked for as many tasks ahead.
    parallel: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    #: Most agent processes of all jobs at once (planners, queens, claimers, executors, reviewers); jobs wait
    #: `queued` for a free one (docs/operations.md, "The queue"). Each job keeps its `parallel` within it.
    max_agents: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    #: Shell commands the quality gate runs in each task's worktree (`numerusctl run --check` adds to them).
    checks: tuple[str, ...] = ()
    #: Whether the reviewer is asked for a verdict on every task.
    review: bool = True
    #: Answers the planner may give before the job fails for want of a valid plan.
    plan_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    #: Answers an executor may give before its task fails for want of a usable claim.
    claim_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    #: Attempts per task (first run and retries) and the pauses between them, in seconds.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    backoff_s: tuple[Annotated[float, msgspec.Meta(ge=0)], ...] = (1.0, 2.0, 4.0)
    #: Where a task's claim comes from: `agent` asks its executor (read-only) before it runs; `plan` takes the
    #: plan's file intents as the claim (a glob claims the directory above it), saving one agent call per task.
    claims: Literal["agent", "plan"] = "agent"
    #: A running planned job in which no task completes for this long asks the queen for a revised plan.
    stall_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    #: What happens to jobs a daemon stop interrupted: `auto`, they go on when numerusd starts again; `manual`,
    #: they wait, `interrupted`, for `numerusctl resume JOB`.
    resume: Literal["auto", "manual"] = "auto"
    #: Times the queen may revise a job's plan when one of its tasks fails for good (0: never ask her).
    max_replans: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    #: A task's agent is stopped after this long in all, or after this long without printing anything.
    task_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0
    #: Seconds a check command may run.
    check_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    #: The signing keys, when not in the state directory (e.g. /etc/numerus/keys.json, readable by the daemon's
    #: user alone); with none set, the systemd credential KEYS_CREDENTIAL, else `<state_dir>/keys.json`.
    key_file: Path | None = None
    #: Limits on what agents and clients send (docs/operations.md, "Limits"): an event's payload (longer text is
    #: cut, its size and hash recorded), a request (refused before decoding), the dead-letter stream's bytes.
    max_event_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 256 * 1024
    max_request_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1024 * 1024
    dlq_max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    #: Job snapshots (docs/operations.md, "Snapshots"): a checkpoint is written once this many events were stored
    #: since the last one, or this many seconds passed with any, and when the daemon stops.
    snapshot_every_events: Annotated[int, msgspec.Meta(ge=1)] = 5_000
    snapshot_every_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: Where every planned job waits for a user's approval (`run --approve` instead): `plan`, `merge`, or `all`.
    approve: tuple[Literal["plan", "merge", "all"], ...] = ()
    #: Token caps (input + output) of a job and of each task (`run --max-tokens`, `--task-max-tokens`), and what
    #: crossing one does: `pause` (the job waits for `approve --add-tokens N`) or `stop` (the job fails).
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    task_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    on_budget: Literal["pause", "stop"] = "pause"
    #: What each model's tokens cost per million, for the cost `status` shows (docs/operations.md, "Budgets").
    prices: dict[str, Price] = {}
    #: Observability (docs/operations.md, "Metrics", "Logs", "Traces"): where `/metrics` is served (PORT or
    #: HOST:PORT, 127.0.0.1 when no host is given; None: not served), the log lines' format, and where spans go
    #: (an OTLP/HTTP endpoint, or `console`; None: `$OTEL_EXPORTER_OTLP_ENDPOINT`, else no spans).
    metrics_address: str | None = None
    log_format: Literal["text", "json"] = "text"
    otel_endpoint: str | None = None
    #: The lease of the event stream (docs/operations.md, "One daemon per stream"): renewed every quarter of this
    #: many seconds; a standby takes over at most this long after the holder's last renewal.
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=2, le=300)] = 8.0

    def __repr__(self) -> str:
        # The password must never reach a log line; show only whether there is one.
        shown = {f.name: getattr(self, f.name) for f in msgspec.structs.fields(self) if f.name != "nats_password"}
        fields = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        return f"Settings({fields}, nats_password={'<set>' if self.nats_password else None})"

    def __rich_repr__(self) -> Any:
        yield from ((f.name, getattr(self, f.name)) for f in msgspec.structs.fields(self) if f.name != "nats_password")

    def configured_nats(self) -> NatsAddress | None:
        """The external NATS server configured (`nats_url` and its credentials); None: the embedded one."""
        if not self.nats_url:
            return None
        creds = str(self.nats_creds) if self.nats_creds else None
        return NatsAddress(url=self.nats_url, user=self.nats_user, password=self.nats_password, creds=creds)

    @property
    def runs_dir(self) -> Path:
        """Per-task working data: `<runs_dir>/<job>/<task>/` holds terminal logs and outputs."""
        return self.state_dir / "runs"

    @property
    def worktrees_dir(self) -> Path:
        """Task worktrees: `<worktrees_dir>/<job>/<task>/`, each on the task's own branch."""
        return self.state_dir / "worktrees"

    @property
    def repos_dir(self) -> Path:
        """The bare mirrors of users' repositories where jobs do their git work (`numerusd.git.mirror`)."""
        return self.state_dir / "repos"

    @property
    def schemas_dir(self) -> Path:
        """The `--output-schema` files agents answer with, written at start from the protocol types."""
        return self.state_dir / "schemas"

    def approvals(self, asked: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Where a job waits for approval: `asked` (`run --approve`), else the `approve` setting; `all` is both."""
        named = self.approve if asked is None else asked
        return tuple(gate for gate in ("plan", "merge") if gate in named or "all" in named)

    def escalations(self) -> dict[str, str]:
        """Each profile that names an `escalate` profile, and that profile."""
        return {name: profile.escalate for name, profile in self.agents.items() if profile.escalate is not None}

    def role_agents(self, agent: str | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The profile of each role: from `overrides`, else `agent` for all when given, else `[roles]`, else
        `default_agent`; the claimer, named nowhere, is the executor's profile (the one that will do the work)."""
        named = {**({} if agent is not None else self.roles), **(overrides or {})}
        roles = {role: named.get(role, agent or self.default_agent) for role in ROLES}
        roles["claimer"] = named.get("claimer", roles["executor"])
        return roles

    @property
    def wal_path(self) -> Path:
        """The write-ahead log of events not yet acknowledged by JetStream."""
        return self.state_dir / "events.wal"

    @property
    def keys_path(self) -> Path:
        """The one file the daemon reads its signing keys from, `{"current": kid, "keys": {kid: hex}}`, mode 0600:
        `key_file` (or the systemd credential, which `load_settings` puts there), else `<state_dir>/keys.json`.
        What an agent must never read: the sandbox hides this path."""
        return self.key_file or self.state_dir / "keys.json"

    @property
    def db_path(self) -> Path:
        """The SQLite views projected from the stream (rebuildable at any time)."""
        return self.state_dir / "views.sqlite3"

    @property
    def connection_path(self) -> Path:
        """Where the running daemon tells `numerusctl` how to reach it."""
        return self.state_dir / connection.FILE_NAME

    @property
    def worker_connection_path(self) -> Path:
        """Where the daemon running the embedded server tells `numerusd worker` how to log in (`--connection`)."""
        return self.state_dir / connection.WORKER_FILE_NAME

    @property
    def nats_store_dir(self) -> Path:
        """The embedded nats-server's configuration and JetStream store."""
        return self.state_dir / "nats"


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT`, `:PORT` or `PORT` as (host, port), 127.0.0.1 when no host is given;
    ConfigError, in one line, for anything else."""
    host, colon, port = address.strip().rpartition(":")
    if not colon:
        host, port = "", address.strip()
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(
            f"metrics_address {address!r} is not PORT or HOST:PORT (e.g. 9464 or 127.0.0.1:9464)",
            setting="metrics_address",
        )
    return host, int(port)


#: The flag of a setting whose flag is not `--<setting>`.
_FLAGS = {"metrics_address": "--metrics"}


def _dec_hook(type_: type, value: Any) -> Any:
    # msgspec has no Path type of its own; a path is a string in TOML and in the environment.
    if type_ is Path and isinstance(value, (str, Path)):
        return Path(value).expanduser()
    raise ValueError(f"expected a path, got {type(value).__name__}")


_FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Settings)}
_PROFILE_FIELDS = frozenset(f.name for f in msgspec.structs.fields(AgentProfile))


def _field_path(error: msgspec.ValidationError, prefix: str) -> str:
    """Put `prefix` in front of the error's `$…` path (or add it when the error is about the value itself)."""
    text = str(error)
    if " - at `$" in text:
        return text.replace(" - at `$", f" - at `{prefix}", 1)
    return f"{text} - at `{prefix}`"


def _read_file(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file not found", path=str(path)) from None
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", path=str(path)) from e
    try:
        table = msgspec.toml.decode(data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", path=str(path)) from e
    return table


def _file_layer(path: Path, table: dict[str, Any]) -> dict[str, Any]:
    """Validate a file's table field by field; agents are merged over the built-in profiles."""
    table = dict(table)
    agents_table = table.pop("agents", {})
    try:
        fields = msgspec.convert(table, Settings, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {e}", path=str(path)) from e
    layer = {name: getattr(fields, name) for name in table}
    for name, value in layer.items():
        if isinstance(value, Path) and not value.is_absolute():
            layer[name] = path.parent / value  # a relative path in a file means relative to that file
    if not isinstance(agents_table, dict):
        raise ConfigError(f"{path}: Expected `object`, got `{type(agents_table).__name__}` - at `$.agents`")
    agents = dict(BUILTIN_AGENTS)
    for name, profile in agents_table.items():
        # AgentProfile itself lets unknown fields through; in a file a stray key is a typo, so refuse it here.
        unknown = sorted(set(profile) - _PROFILE_FIELDS) if isinstance(profile, dict) else []
        if unknown:
            raise ConfigError(
                f"{path}: Object contains unknown field `{unknown[0]}` - at `$.agents.{name}`", path=str(path)
            )
        base = msgspec.to_builtins(BUILTIN_AGENTS[name]) if name in BUILTIN_AGENTS else {}
        merged = {**base, **profile} if isinstance(profile, dict) else profile
        try:
            agents[name] = msgspec.convert(merged, AgentProfile)
        except msgspec.ValidationError as e:
            raise ConfigError(f"{path}: {_field_path(e, f'$.agents.{name}')}", path=str(path)) from e
    if agents_table:
        layer["agents"] = agents
    return layer


def _value(source: str, name: str, value: Any, strict: bool) -> Any:
    """One setting from the environment (a string) or a flag, checked against its field's type."""
    try:
        return msgspec.convert(value, _FIELD_TYPES[name], strict=strict, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {e}", setting=name) from e


def load_settings(
    *,
    config_file: str | Path | None = None,
    state_dir: str | Path | None = None,
    nats_url: str | None = None,
    nats_user: str | None = None,
    nats_password: str | None = None,
    nats_creds: str | Path | None = None,
    metrics_address: str | None = None,
    log_format: str | None = None,
    replicas: str | int | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: defaults, then the TOML file, then the environment, then these arguments (the flags).

    An argument left None does not override. `env` defaults to `os.environ` (tests pass their own). Raises
    ConfigError with one line naming the file, variable or flag and the path of the bad field.
    """
    env = os.environ if env is None else env
    flags = {
        "state_dir": state_dir,
        "nats_url": nats_url,
        "nats_user": nats_user,
        "nats_password": nats_password,
        "nats_creds": nats_creds,
        "metrics_address": metrics_address,
        "log_format": log_format,
        "replicas": replicas,
    }
    flag_layer = {
        # A flag's text as typed (`--replicas three`) is checked as the environment's is, with the same message.
        name: _value(_FLAGS.get(name, f"--{name.replace('_', '-')}"), name, value, strict=not isinstance(value, str))
        for name, value in flags.items()
        if value is not None
    }
    env_layer = {
        name: _value(f"${var}", name, env[var], strict=False)
        for name, var in ENV_VARS.items()
        if env.get(var)  # an empty variable counts as unset, as shells make them easily
    }
    where = flag_layer.get("state_dir") or env_layer.get("state_dir") or Settings().state_dir
    explicit = config_file if config_file is not None else env.get(CONFIG_ENV_VAR) or None
    path = Path(explicit).expanduser() if explicit else Path(where) / CONFIG_FILE_NAME
    file_layer = _file_layer(path, _read_file(path, explicit=bool(explicit)))

    merged = {**file_layer, **env_layer, **flag_layer}
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if "key_file" not in merged and credentials and (Path(credentials) / KEYS_CREDENTIAL).is_file():
        merged["key_file"] = Path(credentials) / KEYS_CREDENTIAL
    if "state_dir" in merged:
        # Relative to where the daemon was started, fixed now so a later chdir cannot move the state.
        merged["state_dir"] = Path(merged["state_dir"]).expanduser().absolute()
    settings = Settings(**merged)
    if settings.metrics_address is not None:
        parse_address(settings.metrics_address)  # refused now, in one line, not when the daemon is half up
    _check_replicas(settings)
    known = ", ".join(sorted(settings.agents))
    if settings.default_agent not in settings.agents:
        raise ConfigError(
            f"default_agent {settings.default_agent!r} is not a configured agent profile (known: {known})",
            setting="default_agent",
        )
    for name, profile in settings.agents.items():
        if profile.escalate is not None and profile.escalate not in settings.agents:
            raise ConfigError(
                f"agents.{name}.escalate: {profile.escalate!r} is not a configured agent profile (known: {known})",
                setting="agents",
            )
        if profile.escalate == name:
            raise ConfigError(f"agents.{name}.escalate: a profile cannot escalate to itself", setting="agents")
    for role, profile in settings.roles.items():
        if role not in ROLES:
            raise ConfigError(f"roles: unknown role {role!r}; the roles are {', '.join(ROLES)}", setting="roles")
        if profile not in settings.agents:
            raise ConfigError(
                f"roles.{role}: {profile!r} is not a configured agent profile (known: {known})", setting="roles"
            )
    return settings


def _check_replicas(settings: Settings) -> None:
    """A replica count Numerus runs with, on a server that can hold it (the embedded one is a single node)."""
    if settings.replicas not in REPLICAS:
        raise ConfigError(
            f"replicas = {settings.replicas}: the streams are kept on 1 server or replicated on 3 "
            "(a three-node cluster); set replicas to 1 or 3",
            setting="replicas",
        )
    if settings.replicas > 1 and not settings.nats_url:
        raise ConfigError(
            f"replicas = {settings.replicas} needs a cluster: set nats_url to its nodes' client URLs, comma separated "
            "(the embedded server is a single node)",
            setting="replicas",
        )


def write_connection_file(
    path: Path,
    url: str,
    user: str | None,
    password: str | None,
    roles: Mapping[str, connection.RoleLogin] | None = None,
) -> None:
    """Tell numerusctl how to reach this daemon (`protocol.connection.ConnectionInfo`), mode 0600, replaced
    atomically: `user`/`password` for tools that know no roles, `roles` the login of each client role.

    The file holds a password, so it is created 0600 from the start (never chmod'ed after), in a temporary name
    beside the target and renamed over it, so a reader sees the old file or the new one, never half of one.
    """
    body = connection.encode_connection(
        connection.ConnectionInfo(url=url, user=user, password=password, pid=os.getpid(), roles=dict(roles or {}))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # a stale tmp file left by a crash keeps its own mode: set it again
        out.write(body)
        out.flush()
        os.fsync(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
