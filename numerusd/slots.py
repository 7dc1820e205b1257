"""Agent slots of a job: at most `parallel` agents at once, and a freed slot goes to the most urgent waiter.

Granted work (executors, reviewers) takes a slot before new claims, so tasks that hold locks finish and release
them, rather than every claim of the job being asked before any task runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections.abc import AsyncIterator


class Slots:
    """At most `size` agents at once; a freed slot goes to the waiter of lowest priority number, FIFO within."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = 0

    @contextlib.asynccontextmanager
    async def taken(self, priority: int) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._order += 1
            heapq.heappush(self._waiters, (priority, self._order, waiter))
            try:
                await waiter  # the slot was handed over: `free` already counts it
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed over, then cancelled: pass it on
                else:
                    self._waiters = [entry for entry in self._waiters if entry[2] is not waiter]
                    heapq.heapify(self._waiters)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
