"""The daemon's agent slots: at most `max_agents` agent processes across all jobs at once.

The runner owns one `AgentPool` and gives each job's pipeline a `Seat` in it. Every agent a pipeline runs
(planner, queen, claimers, executors, reviewers) holds a slot of its job (`numerusd.slots`, the job's
`parallel`) and, inside it, a slot of the pool, for as long as the agent runs. A freed slot goes to the waiting
job that `domain.slot_rank` puts first (killed jobs, then jobs moved to the front, then priority, then fewer
slots held, then the older job), never to a paused job; a pause, a start or a kill makes the pool look again
(`reconsider`).

A seat records what the queue means in the job's events, through `JobBook.decide`: its first agent waiting is
`JobQueued` (the job is `queued`), the slot it then gets is `JobStarted`. A job that ended while it waited
(killed in the queue) leaves with `Withdrawn`, and its pipeline ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from numerusd import domain
from numerusd.book import JobBook
from numerusd.domain.observations import AgentSlotAwaited, AgentSlotTaken
from numerusd.protocol.commands import JOB_DONE

log = logging.getLogger(__name__)


class Withdrawn(Exception):
    """The job ended while its agent waited for a slot: nothing more of it runs."""


@dataclass(eq=False)
class _Waiter:
    job_id: str
    ticket: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AgentPool:
    """At most `size` agents of all jobs at once, handed out in the queue's order; see the module docstring."""

    def __init__(self, size: int, book: JobBook) -> None:
        self.size = size
        self.book = book
        #: Slots in use, in all and by job.
        self.busy = 0
        self.held: Counter[str] = Counter()
        self._waiting: list[_Waiter] = []
        self._tickets = itertools.count()

    def seat(self, job_id: str) -> Seat:
        """The way of one job's pipeline to the pool."""
        return Seat(self, job_id)

    def waiting(self, job_id: str | None = None) -> int:
        """How many agents (of `job_id`, or of every job) wait for a slot."""
        return sum(1 for waiter in self._waiting if job_id is None or waiter.job_id == job_id)

    def resize(self, size: int) -> None:
        """`max_agents` changed (a reload): more slots are handed out at once; with fewer, agents running finish
        and no new one starts until the daemon is under the new size."""
        self.size = size
        self._hand_out()

    def reconsider(self) -> None:
        """A job was paused, let go on, moved in the queue, killed or ended: hand out the free slots again."""
        self._hand_out()

    def _ask(self, job_id: str) -> _Waiter:
        """Join the line; the waiter's future is already done when a slot was free for it."""
        waiter = _Waiter(job_id, next(self._tickets))
        self._waiting.append(waiter)
        self._hand_out()
        return waiter

    def _release(self, job_id: str) -> None:
        self.busy -= 1
        self.held[job_id] -= 1
        if self.held[job_id] <= 0:
            del self.held[job_id]
        self._hand_out()

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gives up (cancelled): out of the line, or, if a slot was handed to it, the slot passed on."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self._release(waiter.job_id)

    def _hand_out(self) -> None:
        jobs = self.book.jobs
        for waiter in list(self._waiting):
            job = jobs.get(waiter.job_id)
            if job is None or job.status in JOB_DONE:
                self._waiting.remove(waiter)
                waiter.future.set_exception(Withdrawn())
        # A waiter cancelled a moment ago is still listed until its task runs again (`_leave`): never served.
        self._waiting = [waiter for waiter in self._waiting if not waiter.future.done()]
        while self.busy < self.size:
            ready = [w for w in self._waiting if jobs[w.job_id].paused_by is None or jobs[w.job_id].kill_requested]
            if not ready:
                return
            best = min(ready, key=lambda w: (domain.slot_rank(jobs[w.job_id], self.held[w.job_id]), w.ticket))
            self._waiting.remove(best)
            self.busy += 1
            self.held[best.job_id] += 1
            best.future.set_result(None)


class Seat:
    """One job's pipeline in the pool: `taken()` holds a slot of the daemon for the agent run in its body."""

    def __init__(self, pool: AgentPool, job_id: str) -> None:
        self.pool = pool
        self.job_id = job_id
        #: Whether this pipeline has had a slot: only its first agent waiting puts the job in the queue.
        self.started = False

    @contextlib.asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        """Hold a slot of the daemon for the body of the `async with`; Withdrawn if the job ends meanwhile."""
        await self._take()
        try:
            yield
        finally:
            self.pool._release(self.job_id)

    async def _take(self) -> None:
        pool = self.pool
        waiter = pool._ask(self.job_id)
        try:
            if not waiter.future.done():
                paused = pool.book.jobs[self.job_id].paused_by
                why = f"paused by {paused}" if paused else f"{pool.busy} of {pool.size} in use"
                log.debug("job %s: an agent waits for a slot (%s)", self.job_id, why)
                if not self.started:
                    await pool.book.decide(self.job_id, AgentSlotAwaited())
            await waiter.future
        except BaseException:
            pool._leave(waiter)
            raise
        self.started = True
        try:
            if pool.book.jobs[self.job_id].queued:
                await pool.book.decide(self.job_id, AgentSlotTaken())
        except BaseException:
            pool._release(self.job_id)
            raise
