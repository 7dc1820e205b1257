"""The job book: every job's state as the event stream folds it, and the one way to change it.

`decide(job, message)` decides the message (a command or an observation, see `numerusd.domain`) against the
job's latest state, appends the events durably, and folds them in. Nothing else writes a job's events, and
nothing else moves `jobs`, which `status` and the pipelines read.

Being the one way in, it is where any text from outside (a goal, a check's output, a review's reasons, a plan)
has its secrets redacted before they are decided and sealed (`numerusd.redaction`): here, before `decide`, the
state folds the same redacted events the stream keeps, so `status` stays what a rebuild makes it. Agent output
is redacted earlier, as it is read (it goes to the run log and `NUMERUS_LOGS` too).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping

from numerusd import domain, logs
from numerusd.domain.observations import Command, Observation, Redacted
from numerusd.errors import NotFound, StoreError
from numerusd.event_store import EventStore
from numerusd.protocol.envelope import Envelope, Sealed, WireEnvelope
from numerusd.redaction import Redactor

#: The fewest characters of a job id that may name it (`numerusctl status 7KQ2`).
MIN_REF = 4


class JobBook:
    """Every job of the stream, by id, and `decide`: the daemon's one piece of mutable state."""

    def __init__(self, store: EventStore, redactor: Redactor | None = None) -> None:
        self.store = store
        self.redactor = redactor or Redactor()
        self._jobs: dict[str, domain.JobState] = {}
        #: Each job's state with its events still on their way to disk, while there are any (see `decide`).
        self._ahead: dict[str, domain.JobState] = {}

    @property
    def jobs(self) -> Mapping[str, domain.JobState]:
        """Every job as its durable events made it."""
        return self._jobs

    def job(self, ref: str) -> domain.JobState:
        """The job `ref` names, or NotFound (none, or several) with a hint.

        `ref` is a job id, `last` (the newest job), or at least MIN_REF characters of one id, from its start or its
        end: ULIDs share their first characters for months (they begin with the time), so the end is what tells
        jobs apart, and what a user copies from `status`.
        """
        job = self._jobs.get(ref)
        if job is not None:
            return job
        if ref == "last":
            if not self._jobs:
                raise NotFound("no job yet: 'last' names the newest job; 'numerusctl run GOAL' submits one")
            return self._jobs[max(self._jobs)]  # ULIDs sort by time
        if len(ref) >= MIN_REF:
            wanted = ref.upper()
            # Over a copy: `status` looks jobs up from the command thread while the daemon's loop adds them.
            jobs = list(self._jobs.items())
            found = [job for job_id, job in jobs if job_id.startswith(wanted) or job_id.endswith(wanted)]
            if len(found) == 1:
                return found[0]
            if found:
                shown = ", ".join(sorted(job.id for job in found)[:3]) + (", …" if len(found) > 3 else "")
                raise NotFound(f"{ref!r} names {len(found)} jobs ({shown}); give more of the id")
        raise NotFound(f"no job {ref!r}; 'numerusctl status' lists the jobs")

    def restore(self, state: domain.JobState) -> None:
        """Take a job's state from its snapshot (at start, before the stream's tail is folded over it)."""
        self._jobs[state.id] = state

    def fold(self, event: Envelope | WireEnvelope) -> None:
        """Fold an event read from the stream or the WAL (a replay), its payload decoded only if needed."""
        if isinstance(event, WireEnvelope):
            self._jobs[event.job] = domain.evolve_untyped(self._jobs.get(event.job), event)
        else:
            self._jobs[event.job] = domain.evolve(self._jobs.get(event.job), event)

    async def decide(
        self,
        job_id: str,
        message: Command | Observation,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> list[Sealed]:
        """Decide `message` against the job's latest state, append the events durably, and fold them in.

        Deciding, sealing and queueing for the WAL are one synchronous step, against the state that includes
        the job's events still on their way to disk (`_ahead`): decisions of one job follow one another without
        each waiting for the fdatasync of the one before, and share it. `jobs` moves only once the events are
        durable, in WAL order, whether or not the caller still waits. A refusal raises and records nothing.
        Secrets in `message` are redacted first, and what was, recorded next (`Redacted`).

        The events carry `traceparent`, else the one of the command being handled (`logs.TRACEPARENT`), else
        the job's own (from its submission): a job's later events stay in the trace that started it.
        """
        found: Counter[str] = Counter()
        message = self.redactor.redact_value(message, found)
        sealed = await self._decide(job_id, message, correlation_id, traceparent)
        if found and sealed:
            task = getattr(message, "task", "") or ""
            sealed += await self._decide(job_id, Redacted(task=task, counts=dict(found)), correlation_id, traceparent)
        return sealed

    async def _decide(
        self,
        job_id: str,
        message: Command | Observation,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> list[Sealed]:
        state = self._ahead.get(job_id) or self._jobs.get(job_id)
        decision = domain.decide(state, message)
        if not decision:
            return []
        after: list[domain.JobState] = []  # filled below, before the WAL can call back
        sealed, durable = self.store.submit(
            job_id,
            decision,
            correlation_id=correlation_id or job_id,
            causation_id=state.last_event_id if state is not None else None,
            on_durable=lambda: self._landed(job_id, after[0], sealed),
            traceparent=traceparent or logs.TRACEPARENT.get() or (state.traceparent if state is not None else ""),
        )
        for event in sealed:
            state = domain.evolve(state, event.envelope)
        assert state is not None
        after.append(state)
        self._ahead[job_id] = state
        try:
            await asyncio.shield(durable)  # a caller that gives up does not take the events back
        except StoreError:
            self._ahead.pop(job_id, None)  # never durable: nothing may build on it (the WAL refuses more anyway)
            raise
        return sealed

    def _landed(self, job_id: str, state: domain.JobState, sealed: list[Sealed]) -> None:
        """A decision's events are durable: the job is now as they left it (called in WAL order), and its
        steps are logged."""
        self._jobs[job_id] = state
        logs.decision_lines(job_id, state, sealed)
        if self._ahead.get(job_id) is state:
            del self._ahead[job_id]  # nothing of this job is on its way any more
