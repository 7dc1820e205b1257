"""The circuit breaker: an agent program that keeps failing to start is not spawned again for a while."""

from __future__ import annotations

from numerusd.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_after_three_failures_in_a_row_and_says_why():
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=60, clock=clock)
    for _ in range(2):
        breaker.failed("codex", "cannot start codex: no such executable (searched PATH)")
        assert breaker.refusal("codex") is None
    breaker.failed("codex", "cannot start codex: no such executable (searched PATH)")
    reason = breaker.refusal("codex")
    assert reason is not None
    assert "failed to start 3 times in a row" in reason and "no such executable" in reason and "60 s" in reason
    assert breaker.refusal("claude") is None  # other programs are not affected


def test_after_the_cooldown_one_try_goes_through_and_its_outcome_decides():
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown_s=10, clock=clock)
    breaker.failed("codex", "boom")
    breaker.failed("codex", "boom")
    assert breaker.refusal("codex") is not None
    clock.now += 10.5
    assert breaker.refusal("codex") is None  # half open
    breaker.failed("codex", "boom again")
    assert "boom again" in (breaker.refusal("codex") or "")
    clock.now += 10.5
    breaker.started("codex")
    assert breaker.refusal("codex") is None
    breaker.failed("codex", "once")
    assert breaker.refusal("codex") is None  # the count started again
