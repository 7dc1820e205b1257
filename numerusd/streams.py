"""The JetStream streams Numerus owns, created or brought up to date idempotently at startup.

Their names and subjects are the protocol's (`numerusd.protocol.subjects`); what each keeps is decided here:

| stream | subjects | kept |
|---|---|---|
| `NUMERUS_EVENTS` | `numerus.job.>` | for ever: file storage, no limits; delete, purge, rollup, TTLs refused |
| `NUMERUS_LOGS` | `numerus.log.>` | bounded by size and age, oldest dropped first |
| `NUMERUS_DLQ` | `numerus.dlq.>` | bounded by age, size (oldest dropped first) and message size |
| `NUMERUS_SNAPSHOTS` | `numerus.snapshot.>` | the last message of each subject (a job's latest snapshot) |

A stream that already exists is compared with what we want. A difference that would break an invariant (events
that could be deleted, purged or aged out, subjects that are not ours) raises `StreamMismatch` naming the setting
and what to do: we never weaken an operator's stream behind their back, nor silently run on a weakened one. Any
other difference (a description, the duplicate window, the log and dead-letter limits) is updated in place.

Each stream is kept on `replicas` servers (the `replicas` setting: 1, or 3 on a three-node cluster). A stream
made with another count is brought to it in place, which a cluster does (it copies the stream to the new peers,
or drops the extra ones); a server that cannot (a single node asked for 3, a cluster short of nodes) is reported
as a `StreamMismatch` saying what to do. `ensure_kv` gives a key-value bucket the same replicas, and
`ensure_object_store` an object store.

This module is also the one place where nats-py's JetStream errors become ours (`jetstream_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from numerusd.embedded_nats import MIN_SERVER_VERSION
from numerusd.errors import NatsUnavailable, StoreError, StreamMismatch
from numerusd.protocol.subjects import (
    DLQ,
    DLQ_SUBJECTS,
    EVENTS,
    EVENTS_SUBJECTS,
    LOGS,
    LOGS_SUBJECTS,
    SNAPSHOTS,
    SNAPSHOTS_SUBJECTS,
)

#: A republished event within this window is dropped by the server on its `Nats-Msg-Id`; past it the event
#: store's own check against the stream (see event_store.py) still keeps it from being stored twice.
DEFAULT_DUPLICATE_WINDOW = 600.0
DEFAULT_LOGS_MAX_BYTES = 1 << 30
DEFAULT_LOGS_MAX_AGE = 7 * 24 * 3600.0
DEFAULT_DLQ_MAX_AGE = 30 * 24 * 3600.0
DEFAULT_DLQ_MAX_BYTES = 64 << 20
#: The largest dead letter the stream takes, headers included; `DeadLetters` cuts a larger input to fit.
DLQ_MAX_MSG_SIZE = 128 << 10


#: JetStream's `err_code` for "stream not found", which a `StoreError` carries.
STREAM_NOT_FOUND = 10059


@contextlib.contextmanager
def jetstream_errors(doing: str) -> Iterator[None]:
    """Translate nats-py errors raised while `doing` something into Numerus errors.

    Connection trouble (no server, no JetStream, no answer) becomes `NatsUnavailable`; an answer that says no
    (a JetStream API error) becomes `StoreError` carrying its `code`, `err_code` and description.
    """
    try:
        yield
    except nats.js.errors.ServiceUnavailableError as e:
        raise NatsUnavailable(
            f"cannot {doing}: JetStream is not available on the server (enabled? still starting?)",
            description=e.description,
        ) from e
    except nats.js.errors.APIError as e:
        raise StoreError(
            f"cannot {doing}: JetStream refused ({e.code}/{e.err_code}: {e.description})",
            status=e.code,
            err_code=e.err_code,
            description=e.description,
        ) from e
    except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError) as e:
        raise NatsUnavailable(f"cannot {doing}: no JetStream answered (is JetStream enabled?)") from e
    except (nats.errors.TimeoutError, TimeoutError) as e:
        raise NatsUnavailable(f"cannot {doing}: the NATS server did not answer in time") from e
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
    ) as e:
        raise NatsUnavailable(f"cannot {doing}: not connected to NATS ({type(e).__name__})") from e
    except nats.js.errors.Error as e:
        raise StoreError(f"cannot {doing}: {e}") from e


def check_server_version(nc: Client) -> None:
    """Raise NatsUnavailable unless the connected server is at least MIN_SERVER_VERSION."""
    version = nc.connected_server_version
    have = (version.major, version.minor, version.patch)
    if have < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise NatsUnavailable(
            f"nats-server {'.'.join(map(str, have))} is too old: numerusd needs {need} or newer "
            "(upgrade the server at --nats-url, or let numerusd start its embedded one)",
            server_version=str(version),
        )


@dataclass(frozen=True)
class StreamSpec:
    """What one stream must be (`required`: an invariant) and should be (`desired`: fixed in place)."""

    name: str
    subjects: tuple[str, ...]
    required: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def config(self) -> StreamConfig:
        """The configuration that creates this stream from nothing."""
        return StreamConfig(name=self.name, subjects=list(self.subjects), **self.required, **self.desired)


def stream_specs(
    *,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
    logs_max_bytes: int = DEFAULT_LOGS_MAX_BYTES,
    logs_max_age: float = DEFAULT_LOGS_MAX_AGE,
    dlq_max_age: float = DEFAULT_DLQ_MAX_AGE,
    dlq_max_bytes: int = DEFAULT_DLQ_MAX_BYTES,
    replicas: int = 1,
) -> list[StreamSpec]:
    """The streams, with their limits, each kept on `replicas` servers."""
    events = StreamSpec(
        name=EVENTS,
        subjects=EVENTS_SUBJECTS,
        required={
            # Anything that could remove an event breaks "the stream is the truth".
            "retention": RetentionPolicy.LIMITS,
            "storage": StorageType.FILE,
            "deny_delete": True,
            "deny_purge": True,
            "allow_rollup_hdrs": False,
            "max_age": 0,
            "max_msgs": -1,
            "max_bytes": -1,
            "max_msgs_per_subject": -1,
        },
        desired={
            "description": "Numerus job events: signed, chained, kept until archived by an operator",
            "duplicate_window": duplicate_window,
            "discard": DiscardPolicy.OLD,
            # Without acks the store still gets every event in (it checks the stream after `resend_after`),
            # but slowly; with them it knows at once.
            "no_ack": False,
            "num_replicas": replicas,
        },
        why="job events must never be deleted, purged or aged out",
    )
    logs = StreamSpec(
        name=LOGS,
        subjects=LOGS_SUBJECTS,
        desired={
            "description": "Numerus agent terminal output, bounded by size and age",
            "retention": RetentionPolicy.LIMITS,
            "storage": StorageType.FILE,
            "max_bytes": logs_max_bytes,
            "max_age": logs_max_age,
            "discard": DiscardPolicy.OLD,
            "num_replicas": replicas,
        },
    )
    dlq = StreamSpec(
        name=DLQ,
        subjects=DLQ_SUBJECTS,
        desired={
            "description": "Numerus dead letters: poison events, failed projections, rejected inputs",
            "retention": RetentionPolicy.LIMITS,
            "storage": StorageType.FILE,
            "max_age": dlq_max_age,
            # A client can send garbage as fast as it likes: the dead letters it leaves must not fill the disk.
            "max_bytes": dlq_max_bytes,
            "max_msg_size": DLQ_MAX_MSG_SIZE,
            "discard": DiscardPolicy.OLD,
            "num_replicas": replicas,
        },
    )
    snapshots = StreamSpec(
        name=SNAPSHOTS,
        subjects=SNAPSHOTS_SUBJECTS,
        desired={
            "description": "Numerus job snapshots: each job's last, signed; the events stay the truth",
            "retention": RetentionPolicy.LIMITS,
            "storage": StorageType.FILE,
            # A newer snapshot of a job replaces the older one: only the last is ever read.
            "max_msgs_per_subject": 1,
            "discard": DiscardPolicy.OLD,
            "num_replicas": replicas,
        },
    )
    return [events, logs, dlq, snapshots]


# Settings the server refuses to change on an existing stream: a difference there is reported, not updated.
_IMMUTABLE = frozenset({"storage", "retention"})


def _normalise(value: Any) -> Any:
    # The server answers "no limit" as -1 or 0 (or leaves it out) depending on the setting and the version.
    if value is None or value == -1:
        return 0
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def mismatches(spec: StreamSpec, current: StreamConfig) -> tuple[list[str], dict[str, Any]]:
    """Compare an existing stream with `spec`: (invariant violations, harmless differences to update)."""
    broken: list[str] = []
    if sorted(current.subjects or []) != sorted(spec.subjects):
        broken.append(f"subjects are {current.subjects}, expected {list(spec.subjects)}")
    if getattr(current, "allow_msg_ttl", None) and spec.required:
        broken.append("allow_msg_ttl is true (a publisher could make events expire)")
    for key, want in spec.required.items():
        have = getattr(current, key)
        if _normalise(have) != _normalise(want):
            broken.append(f"{key} is {have!r}, expected {want!r}")
    update: dict[str, Any] = {}
    for key, want in spec.desired.items():
        have = getattr(current, key)
        if _normalise(have) != _normalise(want) and key not in _IMMUTABLE:
            update[key] = want
    return broken, update


async def ensure_streams(js: JetStreamContext, specs: list[StreamSpec] | None = None) -> None:
    """Create the streams that are missing, update harmless differences, refuse broken invariants."""
    for spec in specs if specs is not None else stream_specs():
        await ensure_stream(js, spec)


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> None:
    """Create `spec`'s stream, or check and update the existing one; raise StreamMismatch if it is unsafe."""
    try:
        with jetstream_errors(f"look up stream {spec.name}"):
            info = await js.stream_info(spec.name)
    except StoreError as e:
        if e.fields.get("status") != 404:
            raise
        with (
            _replicas_refused(spec.name, spec.desired.get("num_replicas")),
            jetstream_errors(f"create stream {spec.name}"),
        ):
            await js.add_stream(spec.config())
        return
    broken, update = mismatches(spec, info.config)
    if broken:
        raise StreamMismatch(
            f"stream {spec.name} exists with settings Numerus will not run on: {'; '.join(broken)}. "
            f"{spec.why + ': ' if spec.why else ''}fix the stream (nats stream edit {spec.name}) or point "
            "numerusd at another server or account",
            stream=spec.name,
            problems=broken,
        )
    if update:
        with _replicas_refused(spec.name, update.get("num_replicas")), jetstream_errors(f"update stream {spec.name}"):
            await js.update_stream(info.config.evolve(**update))


@contextlib.contextmanager
def _replicas_refused(stream: str, replicas: int | None) -> Iterator[None]:
    """A refusal from JetStream while asking for `replicas` (>1) becomes a StreamMismatch saying what to do."""
    try:
        yield
    except StoreError as e:
        if replicas is None or replicas == 1:
            raise
        raise StreamMismatch(
            f"stream {stream} cannot be kept on {replicas} servers here (JetStream: {e.fields.get('description')}): "
            f"point nats_url at a cluster of {replicas} JetStream nodes, all of them up, or set replicas = 1",
            stream=stream,
            problems=[f"num_replicas {replicas} refused"],
        ) from e


async def ensure_kv(js: JetStreamContext, name: str, *, replicas: int = 1, **limits: Any) -> KeyValue:
    """The key-value bucket `name`, created with `replicas` and `limits` (KeyValueConfig's fields: `history`,
    `ttl`, `max_bytes`...) when missing; an existing one is brought to `replicas` in place as the streams are (a
    StreamMismatch when the server cannot), its other settings left as they are."""
    with jetstream_errors(f"look up bucket {name}"):
        try:
            bucket: KeyValue | None = await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            bucket = None
    if bucket is None:
        with _replicas_refused(f"KV_{name}", replicas), jetstream_errors(f"create bucket {name}"):
            return await js.create_key_value(KeyValueConfig(bucket=name, replicas=replicas, **limits))
    with jetstream_errors(f"look up bucket {name}"):
        config = (await bucket.status()).stream_info.config
    await _keep_replicas(js, config, replicas, f"bucket {name}")
    return bucket


async def ensure_object_store(js: JetStreamContext, name: str, *, replicas: int = 1, **settings: Any) -> ObjectStore:
    """The object store `name`, created with `replicas` and `settings` (ObjectStoreConfig's fields: `description`,
    `max_bytes`...) when missing; an existing one is brought to `replicas` in place, as `ensure_kv` does."""
    with jetstream_errors(f"look up object store {name}"):
        try:
            store: ObjectStore | None = await js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            store = None
    if store is None:
        config = ObjectStoreConfig(bucket=name, replicas=replicas, **settings)
        with _replicas_refused(f"OBJ_{name}", replicas), jetstream_errors(f"create object store {name}"):
            return await js.create_object_store(name, config)
    with jetstream_errors(f"look up object store {name}"):
        stream = (await store.status()).stream_info.config
    await _keep_replicas(js, stream, replicas, f"object store {name}")
    return store


async def _keep_replicas(js: JetStreamContext, config: StreamConfig, replicas: int, what: str) -> None:
    """Bring the stream of a bucket (`config`, as the server has it) to `replicas`; a StreamMismatch if it cannot."""
    if _normalise(config.num_replicas) != replicas:
        with _replicas_refused(config.name or what, replicas), jetstream_errors(f"update {what}"):
            await js.update_stream(config.evolve(num_replicas=replicas))
