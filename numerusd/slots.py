"""Slots of a job: at most `size` holders at once, served in the order they asked.

A job has two kinds (see `JobPipeline`): `parallel` slots for the agents that work (executors, reviews, the
planner, the queen), and as many for tasks asked their claim ahead of them. A task keeps its claim's slot
(`hand_on`) until its executor runs or it is told NO GO (`give_back`), so claims run ahead of the executors by
at most one round, while the executors sleep or wait on a model, instead of every claim of the job first.

Given the job's `Seat` in the daemon's pool (`numerusd.agent_pool`), a holder also takes a slot of the daemon
once it has its job's, for the body of `taken` only: a claim's slot kept for its executor holds none.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from numerusd.agent_pool import Seat


class Slots:
    """At most `size` holders at once; a freed slot goes to the longest waiter."""

    def __init__(self, size: int, seat: Seat | None = None) -> None:
        self.free = size
        self.seat = seat
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Tasks that kept their slot when the body of `taken` ended (`hand_on`).
        self._kept: set[str] = set()

    @contextlib.asynccontextmanager
    async def taken(self, *, task: str | None = None, hand_on: bool = False, local: bool = True) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`.

        With `task`, a slot the task kept is used at once. With `hand_on`, the task keeps the slot when the body
        ends without an error, until `give_back` or its next `taken`. Not `local` (an agent a remote worker runs),
        no slot of the daemon's is taken: the job's slot alone.
        """
        if task is not None and task in self._kept:
            self._kept.discard(task)
        else:
            await self._acquire()
        kept = False
        try:
            async with self.seat.taken() if self.seat is not None and local else contextlib.nullcontext():
                yield
            if hand_on and task is not None:
                self._kept.add(task)
                kept = True
        finally:
            if not kept:
                self._release()

    def give_back(self, task: str) -> None:
        """Free the slot `task` kept, if it kept one."""
        if task in self._kept:
            self._kept.discard(task)
            self._release()

    async def _acquire(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot was handed over: `free` already counts it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed over, then cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
