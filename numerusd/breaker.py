"""A circuit breaker per agent program: stop spawning one that keeps failing to start, and say why.

An agent that cannot start (its binary missing, not executable, its working directory gone) fails the same way
for every task of every job; spawning it again at once only turns each task's retries into the same failure.
After `threshold` failures in a row the breaker opens: spawns of that program are refused, without trying, for
`cooldown_s`, with a reason naming the last failure. Then one spawn is let through; its success closes the
breaker, its failure opens it again. Any successful start resets the count.

Operational state only, kept in memory: what it decides shows up in the events as `AgentSpawnFailed` reasons.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Program:
    failures: int = 0
    last_reason: str = ""
    open_until: float = 0.0


@dataclass
class CircuitBreaker:
    """Counts start failures per program; `refusal(program)` says why it must not be spawned now, if so."""

    threshold: int = 3
    cooldown_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _programs: dict[str, _Program] = field(default_factory=dict)

    def refusal(self, program: str) -> str | None:
        """None when `program` may be spawned; else the one-line reason it may not."""
        state = self._programs.get(program)
        if state is None or state.failures < self.threshold:
            return None
        left = state.open_until - self.clock()
        if left <= 0:
            return None  # half open: one try
        return (
            f"not starting {program}: it failed to start {state.failures} times in a row "
            f"(last: {state.last_reason}); next try in {left:.0f} s"
        )

    def failed(self, program: str, reason: str) -> None:
        """`program` could not be started; opens the breaker at the threshold (again after a failed try)."""
        state = self._programs.setdefault(program, _Program())
        state.failures += 1
        state.last_reason = reason
        if state.failures >= self.threshold:
            state.open_until = self.clock() + self.cooldown_s

    def started(self, program: str) -> None:
        """`program` started: it is healthy again."""
        self._programs.pop(program, None)
