"""The startup replay: the job book and the event store brought to where the stream (and the WAL) leave them.

Jobs are restored from their snapshots (`numerusd.snapshots`), then the stream's tail, after the checkpoint's
position, is folded over them; an event there that its job's snapshot already holds is passed over. Each other
event is checked as the auditor and the projector check it: its signature, its subject, its id not seen before,
its writer's epoch (not below one seen before it: `EpochFence`), and that it extends its job's chain; one that
does not is skipped, so `status` after a restart equals a rebuild whatever was republished onto the stream.
Last, what the WAL holds that the stream does not is republished and folded (`EventStore.recover`).

A long tail is read by a child process (`stream_pump`), as a rebuild reads it: this process only verifies and
folds, on the other core.
"""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.js import JetStreamContext

from numerusd.book import JobBook
from numerusd.config import NatsAddress
from numerusd.event_store import EventStore
from numerusd.protocol.envelope import InvalidEvent, open_untyped
from numerusd.protocol.subjects import EVENTS, job_of
from numerusd.snapshots import Loaded
from numerusd.stream_pump import head_started_stream
from numerusd.stream_reader import last_sequence, read_stream

log = logging.getLogger(__name__)

#: At least this many events after the checkpoint: the tail is read by a child process.
PUMPED_REPLAY_FROM = 10_000


async def replay(
    nc: Client,
    js: JetStreamContext,
    address: NatsAddress,
    book: JobBook,
    store: EventStore,
    keys: dict[str, bytes],
    loaded: Loaded,
) -> int:
    """Restore `loaded`'s jobs, fold the stream after its position, recover the WAL; the events folded."""
    for snapshot in loaded.jobs.values():
        book.restore(snapshot.state)
        store.restore(snapshot.job, snapshot.head)
    restored = {job: snapshot.head.seq for job, snapshot in loaded.jobs.items()}
    store.fence.highest = max(store.fence.highest, loaded.epoch)  # what the snapshots hold, as if read
    store.restore_epoch(loaded.epoch)
    start = loaded.position + 1
    if (last := await last_sequence(js, EVENTS)) - loaded.position >= PUMPED_REPLAY_FROM:
        log.debug("replaying %d events read by a child process", last - loaded.position)
        batches = head_started_stream(address, EVENTS, start_seq=start)
    else:
        batches = read_stream(nc, EVENTS, start_seq=start)
    count = skipped = 0
    seen: set[str] = set()  # ids folded so far: held for the replay only
    async for batch in batches:
        for message in batch:
            if restored and message.seq <= restored.get(job_of(message.subject) or "", 0):
                store.covered(message.seq, message.data)
                continue
            try:
                event = open_untyped(message.data, keys)
                # Not signed, so checked here: the subject, and the chain (a republished copy of a genuine event,
                # or one out of its place, does not extend its job's chain and is not folded twice).
                if event.subject != message.subject:
                    raise InvalidEvent("wrong_subject", f"event {event.id} belongs on {event.subject}")
                if event.id in seen:
                    raise InvalidEvent("duplicate", f"event {event.id} was folded before")
                store.fence.admit(event)  # written by a numerusd that had lost its lease: stale_epoch
                if event.prev != store.chain_head(event.job):
                    raise InvalidEvent("broken_chain", f"event {event.id} does not follow its job's last event")
                book.fold(event)
            except (InvalidEvent, ValueError) as e:
                skipped += 1
                log.warning("skipping event at seq %d on %s: %s", message.seq, message.subject, e)
                continue
            seen.add(event.id)
            store.observe(message.seq, message.data)
            count += 1
    if skipped:
        log.warning("replay: %d stream messages skipped (the projector dead-letters them)", skipped)
    for sealed in await store.recover():
        book.fold(sealed.envelope)
        count += 1
    return count
