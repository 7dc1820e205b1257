"""One writer per stream: the lease a numerusd takes before it replays or answers anything, and keeps while it runs.

The lease is one key of the JetStream key-value bucket `NUMERUS_LEASE`, named after the stream it guards
(`NUMERUS_EVENTS`). Its value names the holder: host, pid, state directory, a random id of this run of numerusd,
the epoch, and whether it is `held` or `released`. Every write to it is a compare-and-set on the revision read
(`create`, or `update(key, value, last=revision)`), so of two daemons that try to take it at once exactly one wins.

Taking it (`take`). A key that is missing or `released` is taken at once; so is one whose holder is provably gone
(on this host, with this state directory, whose lock this process now holds, or with a pid that no longer runs).
Otherwise the holder renews it every `ttl_s / 4` seconds, each renewal a new revision; it has lapsed when its
revision has not changed for `ttl_s` seconds as the one waiting sees it. No clocks of different hosts are ever
compared. A plain start waits at most that long: a renewal seen means a live holder, and the start is refused in
one line naming it (`LeaseHeld`); a `--standby` start waits, however long, and takes over once the lease is
released (a graceful stop of the holder) or lapses (a holder killed, frozen or cut off from the bus).

Epochs. Each new holder's epoch is one more than the previous holder's (and than the epoch of the stream's last
event, should the bucket have been lost). The event store stamps it on every event it seals (the envelope's
`epoch`), and every reader refuses an event whose epoch is lower than one seen before it in the stream
(`protocol.envelope.EpochFence`, reason `stale_epoch`): a daemon that went on writing after another took over
cannot get its events accepted.

Keeping it (`keep`). The holder renews the lease while it runs. A renewal refused because the revision moved on,
or a value naming another holder, means the lease was taken over: the holder is told (`on_lost`) and must stop at
once; `may_append` is false from then on and the event store appends nothing more. A renewal that cannot reach the
server is not a loss, but from `ttl_s` after the last renewal sent a standby may take over, so from then on the
event store publishes nothing (`may_publish`), keeping new events in its write-ahead log, until a renewal proves
the lease is still this daemon's. A graceful stop releases the lease (`release`) once every event is published, so
a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from numerusd.errors import LeaseHeld, NatsUnavailable, NumerusError
from numerusd.protocol.envelope import InvalidEvent, decode_wire
from numerusd.protocol.subjects import EVENTS
from numerusd.streams import ensure_kv, jetstream_errors

log = logging.getLogger(__name__)

#: The key-value bucket of the leases, one key per stream.
BUCKET = "NUMERUS_LEASE"


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds (or last held) the lease of a stream: the value of its key."""

    #: A random id of one run of numerusd: two runs never share it, whatever their host and pid.
    instance: str
    host: str
    pid: int
    state_dir: str
    epoch: int
    state: Literal["held", "released"] = "held"
    #: When this holder took the lease, by its own clock: shown to people, never compared.
    since: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def named(self) -> str:
        """The holder in a few words, for a log line or a refusal."""
        return (
            f"numerusd pid {self.pid} on {self.host} (state {self.state_dir}, epoch {self.epoch}, since {self.since})"
        )


_holder_decoder = msgspec.json.Decoder(Holder)


def _decode(value: bytes | None) -> Holder | None:
    """The holder a value names; None for a value that is not one (written by hand, or by a future numerusd)."""
    try:
        return _holder_decoder.decode(value or b"")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


class Lease:
    """The lease of one stream, as taken by this numerusd: its epoch, and whether it still holds it.

    `Lease.take(...)` returns one once it is taken; `keep` renews it (run it as a task until the stop), `release`
    gives it back. The event store asks `may_append` before every append and `may_publish` before every publish.
    """

    def __init__(self, kv: KeyValue, key: str, holder: Holder, revision: int, ttl_s: float, sent: float) -> None:
        self._kv = kv
        self._key = key
        self.holder = holder
        self._revision = revision
        self.ttl_s = ttl_s
        #: Until when no standby can have taken over: the last renewal that went through, sent, plus ttl_s.
        self._deadline = sent + ttl_s
        #: Why the lease was lost, once it was (None while it is held).
        self.lost: str | None = None
        self._released = False
        self._paused = False

    @property
    def epoch(self) -> int:
        """This holder's epoch, stamped on every event it appends."""
        return self.holder.epoch

    def may_append(self) -> bool:
        """False once the lease has passed to another numerusd (or was released)."""
        return self.lost is None and not self._released

    def may_publish(self) -> bool:
        """True while no standby can have taken over: the last renewal went through less than ttl_s ago."""
        return self.may_append() and time.monotonic() < self._deadline

    @classmethod
    async def take(
        cls,
        js: JetStreamContext,
        *,
        state_dir: Path,
        ttl_s: float,
        standby: bool = False,
        stop: asyncio.Event,
        stream: str = EVENTS,
        replicas: int = 1,
    ) -> Lease | None:
        """Take the lease of `stream` for this process; see the module docstring. None if `stop` is set while
        waiting. Raises LeaseHeld (without `standby`) when a live numerusd holds it."""
        kv = await open_bucket(js, replicas=replicas)
        me = {"instance": secrets.token_hex(8), "host": socket.gethostname(), "pid": os.getpid()}
        poll = min(0.5, ttl_s / 8)
        seen: tuple[int, float] | None = None  # the holder's revision as last seen, and when it was first seen
        told: str | None = None  # the holder the log last named
        while not stop.is_set():
            try:
                entry = await _read(kv, stream)
                now = time.monotonic()
                if entry is None:  # never taken, or the key was removed by hand
                    holder = Holder(**me, state_dir=str(state_dir), epoch=await newest_epoch(js, stream) + 1)
                    if (revision := await _write(kv.create(stream, msgspec.json.encode(holder)))) is not None:
                        return cls._taken(kv, stream, holder, revision, ttl_s, now, previous=None)
                    continue  # another numerusd created it first
                revision, previous = entry
                lapsed = seen is not None and seen[0] == revision and now - seen[1] >= ttl_s
                free = previous is not None and (previous.state == "released" or _gone(previous, state_dir))
                if free or lapsed:
                    last = previous.epoch if previous is not None else 0
                    epoch = max(last, await newest_epoch(js, stream)) + 1
                    holder = Holder(**me, state_dir=str(state_dir), epoch=epoch)
                    if (
                        written := await _write(kv.update(stream, msgspec.json.encode(holder), last=revision))
                    ) is not None:
                        return cls._taken(kv, stream, holder, written, ttl_s, now, previous=previous)
                    seen = None  # another numerusd took it first: watch the new holder
                    continue
            except NatsUnavailable as e:
                if not standby:
                    raise
                log.warning("standing by: %s; trying again", e.message)
                await _wait(stop, 1.0)
                continue
            who = previous.named() if previous is not None else "a numerusd whose lease this one cannot read"
            if seen is None or seen[0] != revision:
                if seen is not None and not standby:  # renewed while we watched: its holder is alive
                    raise LeaseHeld(
                        f"{stream} is written by {who}; stop that one first, or start this one with --standby to "
                        "take over when it stops",
                        host=previous.host if previous is not None else None,
                        pid=previous.pid if previous is not None else None,
                    )
                seen = (revision, now)
                if told != who:
                    told = who
                    what = "standing by" if standby else f"waiting up to {ttl_s:g} s to see whether it is renewed"
                    log.info("the lease of %s is held by %s: %s", stream, who, what)
            await _wait(stop, poll)
        return None

    @classmethod
    def _taken(
        cls, kv: KeyValue, key: str, holder: Holder, revision: int, ttl_s: float, sent: float, previous: Holder | None
    ) -> Lease:
        after = f", after {previous.named()} ({previous.state})" if previous is not None else ""
        log.info("took the lease of %s: epoch %d%s", key, holder.epoch, after)
        return cls(kv, key, holder, revision, ttl_s, sent)

    async def keep(self, on_lost: Callable[[str], None], stop: asyncio.Event) -> None:
        """Renew the lease every ttl_s / 4 until `stop` is set or it is lost (then `on_lost(why)`, once). Set
        `stop` and await this before `release`: a renewal cut half-way would leave the revision unknown."""
        while self.may_append():
            await _wait(stop, self.ttl_s / 4)
            if stop.is_set() or not self.may_append():
                return
            await self.renew()
            if self.lost is not None:
                on_lost(self.lost)

    async def renew(self) -> None:
        """One renewal: a compare-and-set on the revision this holder last wrote. Sets `lost` when the lease has
        passed to another numerusd; a bus that does not answer only holds publication back (see the module doc)."""
        sent = time.monotonic()
        value = msgspec.json.encode(self.holder)
        try:
            revision = await _write(self._kv.update(self._key, value, last=self._revision), timeout=self.ttl_s)
            if revision is None:
                # Taken over, or our own last renewal went through and its answer was lost: the value says which.
                entry = await _read(self._kv, self._key)
                holder = entry[1] if entry is not None else None
                if entry is None or holder is None or holder.instance != self.holder.instance or holder.state != "held":
                    who = holder.named() if holder is not None else "another numerusd (the value was replaced)"
                    self.lost = f"the lease of {self._key} (epoch {self.epoch}) is now held by {who}"
                    return
                revision = await _write(self._kv.update(self._key, value, last=entry[0]), timeout=self.ttl_s)
                if revision is None:
                    return  # moved on again in between: the next renewal looks once more
        except NumerusError as e:
            if time.monotonic() >= self._deadline and not self._paused:
                self._paused = True
                log.warning(
                    "the lease of %s was not renewed for %g s (%s): events are kept in the write-ahead log, not "
                    "published, until it is",
                    self._key,
                    self.ttl_s,
                    e.message,
                )
            return
        self._revision = revision
        self._deadline = sent + self.ttl_s
        if self._paused:
            self._paused = False
            log.info("the lease of %s is renewed: publishing events again", self._key)

    async def release(self) -> None:
        """Give the lease back (a graceful stop, every event published), so that a standby takes over at once.
        Never raises: a lease not released lapses."""
        if not self.may_append():
            return
        self._released = True  # nothing is appended or published from here on
        released = msgspec.json.encode(msgspec.structs.replace(self.holder, state="released"))
        try:
            written = await _write(self._kv.update(self._key, released, last=self._revision), timeout=self.ttl_s)
            why = "it was taken over"
        except NumerusError as e:
            written, why = None, e.message
        if written is None:
            log.warning("could not release the lease of %s (%s); a standby takes over once it lapses", self._key, why)
            return
        log.info("released the lease of %s (epoch %d)", self._key, self.epoch)


async def open_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The lease bucket on `replicas` servers, created when missing (one value per key: renewals do not grow it)."""
    return await ensure_kv(
        js,
        BUCKET,
        replicas=replicas,
        description="Numerus: which numerusd writes each stream, and its epoch (numerusd/lease.py)",
        history=1,
        storage=StorageType.FILE,
    )


async def newest_epoch(js: JetStreamContext, stream: str = EVENTS) -> int:
    """The epoch of the last message of `stream` (0 when empty or not an event): a new holder's epoch is above it."""
    with jetstream_errors(f"read the last message of {stream}"):
        info = await js.stream_info(stream)
        if info.state.last_seq == 0:
            return 0
        message = await js.get_msg(stream, info.state.last_seq)
    try:
        return decode_wire(message.data or b"").epoch
    except InvalidEvent:
        return 0


async def _read(kv: KeyValue, key: str) -> tuple[int, Holder | None] | None:
    """The key's revision and holder, None when it has none (never written, deleted or purged)."""
    with jetstream_errors(f"read the lease {key}"):
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
    return entry.revision or 0, _decode(entry.value)


async def _write(call: Awaitable[int], timeout: float = 5.0) -> int | None:
    """Await a compare-and-set write of the lease: its new revision, or None when the key's revision was no longer
    the one given (another numerusd wrote it since it was read). Other errors become NumerusError."""
    with jetstream_errors("write the lease"):
        try:
            return await asyncio.wait_for(call, timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None


def _gone(holder: Holder, state_dir: Path) -> bool:
    """Whether the holder provably runs no more: on this host, either with our state directory (whose lock this
    process holds, so its holder has exited) or with a pid that no longer exists."""
    if holder.host != socket.gethostname():
        return False
    if holder.state_dir == str(state_dir):
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
