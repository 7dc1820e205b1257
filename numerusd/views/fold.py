"""Opening and folding a batch of stream messages in memory, with what is refused and why.

Each message is decoded and verified once (`open_messages`); an event that does not open (forged, bad signature,
unknown key or type, malformed), that arrives on a subject other than its own, or that was written under a lower
epoch than one before it (`stale_epoch`: by a daemon that had lost its lease) is not folded. `fold_events`
evolves each job through its events with the same `domain.evolve` the daemon uses, and refuses an event id seen
before and an event `evolve` refuses. No I/O here: the projector reads job states before and writes rows after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from numerusd.domain import JobState, evolve_untyped
from numerusd.protocol.envelope import EpochFence, InvalidEvent, WireEnvelope, open_untyped
from numerusd.views.rows import utc_text

log = logging.getLogger(__name__)

#: One stream message as the projector takes it: (stream sequence, subject, wire bytes, anything else). The
#: stream reader's StreamMessage is one; the projector takes them as they come rather than copying them into tuples.
Message = tuple[int, str, bytes] | tuple[int, str, bytes, int]

#: A message that opened: (stream sequence, subject, wire bytes, the envelope with its payload not yet typed).
Opened = tuple[int, str, bytes, WireEnvelope]


class Rejected(msgspec.Struct, frozen=True):
    """A message that was not folded into the views, with a short `reason` code and the bytes as received."""

    seq: int
    subject: str
    reason: str
    message: str
    wire: bytes


def open_messages(
    batch: Sequence[Message], keys: dict[str, bytes], rejected: list[Rejected], fence: EpochFence
) -> Iterator[Opened]:
    """Decode and verify each message once, its payload left for `fold_events` to type (the views need the
    payloads of a few events only); a message that does not open is appended to `rejected`, not yielded. `fence`
    follows the writer epochs along the stream: messages must come in stream order."""
    for message in batch:
        seq, subject, wire = message[0], message[1], message[2]  # a Message, or the reader's StreamMessage
        try:
            event = open_untyped(wire, keys)
            fence.admit(event)
        except InvalidEvent as e:
            rejected.append(Rejected(seq, subject, e.reason, str(e), wire))
            continue
        # The subject is not signed: a valid event republished elsewhere would mislead subscribers.
        own = event.subject
        if own != subject:
            rejected.append(Rejected(seq, subject, "wrong_subject", f"event {event.id} belongs on {own}", wire))
            continue
        yield seq, subject, wire, event


def fold_events(
    opened: Iterable[Opened],
    *,
    cache: dict[str, JobState],
    before: dict[str, JobState | None],
    known: set[str],
    work: dict[str, JobState],
    rows: list[tuple[Any, ...]],
    rejected: list[Rejected],
) -> None:
    """Evolve each job through its events into `work`, noting in `before` how it was; append `events` rows.

    A job's state comes from `work` (changed earlier in the batch), else `before` (read from the file), else
    `cache` (None: a new job). An id in `known` was applied before: the event is rejected as a duplicate.
    """
    for seq, subject, wire, event in opened:
        job = event.job
        id = event.id
        if id in known:
            message = f"event {id} was applied before"
            rejected.append(Rejected(seq, subject, "duplicate", message, wire))
            continue
        state = work.get(job)
        if state is None:
            state = before[job] if job in before else before.setdefault(job, cache.get(job))
        try:
            work[job] = evolve_untyped(state, event)
        except InvalidEvent as e:
            rejected.append(Rejected(seq, subject, e.reason, str(e), wire))
            continue
        except ValueError as e:
            rejected.append(Rejected(seq, subject, "refused", str(e), wire))
            continue
        except Exception as e:  # a domain bug must not wedge the projector on one poison event
            log.exception("evolve failed on event %s (seq %d)", id, seq)
            rejected.append(Rejected(seq, subject, "evolve_error", f"{type(e).__name__}: {e}", wire))
            continue
        known.add(id)  # a repeat later in the same batch
        rows.append((seq, id, job, event.task, event.type, utc_text(event.time), subject))
