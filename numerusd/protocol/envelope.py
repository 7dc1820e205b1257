"""The envelope every event travels in, its canonical bytes, its HMAC signature and its place in the chain.

On the wire an event is one JSON object whose members come in this order:

    id, type, job, task, time, actor, epoch, correlation_id, causation_id, traceparent, data, prev, kid, sig

`sig` is always the last member. The signature is HMAC-SHA256, under the key named by `kid`, of the message
body with its final `,"sig":"…"` member removed; `prev` is the SHA-256 of the complete body of the previous event
of the same job (empty for a job's first event). An auditor holding the key can therefore check any event from
its bytes alone, in any language, without trusting the daemon, and can tell a modified, deleted, inserted or
reordered event by the chain.

`epoch` is the writer's: the epoch of the lease (numerusd/lease.py) under which the daemon that wrote the event held
the stream. It is omitted when 0 (events written before leases, or by a store given none), so those events keep
their bytes and their signatures. Epochs never go down along a stream: an event whose epoch is lower than one
already seen earlier in the stream was written by a daemon that had lost its lease, and every reader refuses it
(`EpochFence`, reason `stale_epoch`).

`traceparent` (the W3C trace context of the command that caused the event, `numerusd.tracing`) is there only
when there is one: an event without it has exactly the bytes events had before the member existed, so events
written then still verify byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from datetime import datetime
from typing import Any

import msgspec

from numerusd.protocol.events import EVENT_TYPES, EventData
from numerusd.protocol.subjects import job_event

_SIG_MARK = b',"sig":"'


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One event: who did what to which job (and task), when, in answer to what, signed and chained."""

    id: str
    type: str
    job: str
    task: str | None
    time: datetime
    actor: str
    epoch: int = 0
    correlation_id: str
    causation_id: str | None
    traceparent: str = ""
    data: Any
    prev: str
    kid: str
    sig: str = ""

    @property
    def subject(self) -> str:
        """The NATS subject this event is published on."""
        return job_event(self.job, self.type, self.task)


class _Unsigned(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The envelope without its signature: exactly the bytes that are signed (`epoch` left out when 0,
    `traceparent` when empty)."""

    id: str
    type: str
    job: str
    task: str | None
    time: datetime
    actor: str
    epoch: int = 0
    correlation_id: str
    causation_id: str | None
    traceparent: str = ""
    data: Any
    prev: str
    kid: str


class WireEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """The envelope as read off the wire, its payload left as raw bytes until its type is known."""

    id: str
    type: str
    job: str
    task: str | None
    time: datetime
    actor: str
    epoch: int = 0
    correlation_id: str
    causation_id: str | None
    traceparent: str = ""
    data: msgspec.Raw
    prev: str
    kid: str
    sig: str

    @property
    def subject(self) -> str:
        """The NATS subject this event is published on."""
        return job_event(self.job, self.type, self.task)


class Sealed(msgspec.Struct, frozen=True):
    """A signed event: the decoded envelope, its exact wire bytes and their SHA-256 (the next event's `prev`)."""

    envelope: Envelope
    wire: bytes
    digest: str


class InvalidEvent(ValueError):
    """Bytes that are not a well-formed, correctly signed event; `reason` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EpochFence:
    """The highest writer epoch seen so far along one stream, and the refusal of an event written under a lower one.

    Every reader of the stream (the daemon's replay, the views, the auditor) keeps one and passes it each event
    whose signature holds, in stream order: an event of a daemon that went on writing after another took the
    lease from it is refused with reason `stale_epoch`. A reader that starts part-way (from a snapshot) starts
    the fence at the highest epoch folded into what it starts from.
    """

    __slots__ = ("highest",)

    def __init__(self, highest: int = 0) -> None:
        self.highest = highest

    def admit(self, event: WireEnvelope | Envelope) -> None:
        """Raise InvalidEvent(`stale_epoch`) if `event` was written under an epoch lower than one seen before it;
        otherwise take note of its epoch."""
        if event.epoch < self.highest:
            raise InvalidEvent(
                "stale_epoch",
                f"event {event.id} was written under epoch {event.epoch}, after epoch {self.highest} had begun: "
                "by a numerusd that had lost its lease",
            )
        self.highest = event.epoch


_encoder = msgspec.json.Encoder(order="deterministic")
_wire_decoder = msgspec.json.Decoder(WireEnvelope)
_data_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def seal(
    data: EventData,
    *,
    id: str,
    job: str,
    task: str | None,
    time: datetime,
    actor: str,
    epoch: int = 0,
    correlation_id: str,
    causation_id: str | None,
    prev: str,
    kid: str,
    key: bytes,
    traceparent: str = "",
) -> Sealed:
    """Sign and chain one event."""
    type_name = type(data).__name__
    if (task is not None) != data.TASK_EVENT:
        raise ValueError(f"{type_name} {'needs' if data.TASK_EVENT else 'takes no'} task id")
    unsigned = _Unsigned(
        id=id,
        type=type_name,
        job=job,
        task=task,
        time=time,
        actor=actor,
        epoch=epoch,
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
        data=data,
        prev=prev,
        kid=kid,
    )
    body = _encoder.encode(unsigned)
    sig = _mac(key, body)
    wire = b'%s%s%s"}' % (body[:-1], _SIG_MARK, sig.encode())
    envelope = Envelope(
        id=id,
        type=type_name,
        job=job,
        task=task,
        time=time,
        actor=actor,
        epoch=epoch,
        correlation_id=correlation_id,
        causation_id=causation_id,
        traceparent=traceparent,
        data=data,
        prev=prev,
        kid=kid,
        sig=sig,
    )
    return Sealed(envelope, wire, hashlib.sha256(wire).hexdigest())


def _mac(key: bytes, body: bytes) -> str:
    """HMAC-SHA256 of `body` under `key`, in hex.

    Not `hmac.digest`: that one-shot call lets go of the GIL on every call, however short the body, and taking it
    back waits for whichever thread holds it then (up to the 5 ms switch interval). With the WAL's, SQLite's or
    git's threads busy, that wait cost more than the signing itself. A copy of a keyed HMAC keeps the GIL for
    bodies under 2 KiB and skips deriving the key's pads again.
    """
    mac = _keyed(key).copy()
    mac.update(body)
    return mac.hexdigest()


@functools.lru_cache(maxsize=16)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def signed_part(wire: bytes) -> tuple[bytes, str]:
    """Split an event's bytes into the part that is signed and the signature."""
    at = wire.rfind(_SIG_MARK)
    if at < 0 or not wire.endswith(b'"}'):
        raise InvalidEvent("malformed", "no trailing sig member")
    return wire[:at] + b"}", wire[at + len(_SIG_MARK) : -2].decode("ascii", "replace")


def check_signature(wire: bytes, keys: dict[str, bytes], kid: str) -> None:
    """Raise InvalidEvent unless `wire` carries a valid signature under the key `kid`."""
    key = keys.get(kid)
    if key is None:
        raise InvalidEvent("unknown_key", f"signed with unknown key id {kid!r}")
    body, sig = signed_part(wire)
    if not hmac.compare_digest(_mac(key, body), sig):
        raise InvalidEvent("bad_signature", "signature does not match its content")


def decode_wire(wire: bytes) -> WireEnvelope:
    """Decode the envelope without its payload (cheap: the payload stays raw bytes)."""
    try:
        return _wire_decoder.decode(wire)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 in a string through as the latter
        raise InvalidEvent("malformed", f"not an event envelope: {e}") from e


def open_event(wire: bytes, keys: dict[str, bytes]) -> Envelope:
    """Decode, verify and type one event from its wire bytes; raise InvalidEvent when any of that fails."""
    return typed(open_untyped(wire, keys))


def open_untyped(wire: bytes, keys: dict[str, bytes]) -> WireEnvelope:
    """Decode and verify one event of a known type, its payload left as raw bytes (`typed` decodes it): for a
    reader that needs the payloads of some events only."""
    raw = decode_wire(wire)
    check_signature(wire, keys, raw.kid)
    if raw.type not in _data_decoders:
        raise InvalidEvent("unknown_type", f"unknown event type {raw.type!r}")
    return raw


def typed(raw: WireEnvelope) -> Envelope:
    """The event with its payload decoded into its type; InvalidEvent when it does not fit the type."""
    decoder = _data_decoders.get(raw.type)
    if decoder is None:
        raise InvalidEvent("unknown_type", f"unknown event type {raw.type!r}")
    try:
        data = decoder.decode(raw.data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise InvalidEvent("malformed", f"{raw.type}: {e}") from e
    return Envelope(
        id=raw.id,
        type=raw.type,
        job=raw.job,
        task=raw.task,
        time=raw.time,
        actor=raw.actor,
        epoch=raw.epoch,
        correlation_id=raw.correlation_id,
        causation_id=raw.causation_id,
        traceparent=raw.traceparent,
        data=data,
        prev=raw.prev,
        kid=raw.kid,
        sig=raw.sig,
    )


def digest(wire: bytes) -> str:
    """The chain hash of an event: SHA-256 of its complete wire bytes."""
    return hashlib.sha256(wire).hexdigest()
