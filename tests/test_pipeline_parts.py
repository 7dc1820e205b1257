"""The pipeline's small parts: slots that serve granted work before new claims, and claims from plan intents."""

from __future__ import annotations

import asyncio

from numerusd.pipeline import intents_claim
from numerusd.protocol.claims import ClaimedPath
from numerusd.protocol.plan import FileIntent
from numerusd.slots import Slots


async def test_slots_limit_concurrency_and_serve_lower_priority_numbers_first():
    slots = Slots(2)
    running: list[str] = []
    peak = 0
    order: list[str] = []
    gate = asyncio.Event()

    async def work(name: str, priority: int) -> None:
        nonlocal peak
        async with slots.taken(priority):
            order.append(name)
            running.append(name)
            peak = max(peak, len(running))
            await gate.wait()
            running.remove(name)

    first = [asyncio.create_task(work(f"early{n}", 1)) for n in range(2)]
    await asyncio.sleep(0)
    later = [asyncio.create_task(work("claim-a", 1)), asyncio.create_task(work("claim-b", 1))]
    await asyncio.sleep(0)
    urgent = asyncio.create_task(work("executor", 0))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*first, *later, urgent)
    assert peak == 2
    assert order == ["early0", "early1", "executor", "claim-a", "claim-b"]
    assert slots.free == 2


async def test_a_cancelled_waiter_gives_its_turn_away_and_loses_no_slot():
    slots = Slots(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with slots.taken(0):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await holder
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.free == 1
    async with slots.taken(5):
        assert slots.free == 0


def test_plan_intents_become_a_claim_globs_claiming_the_directory_above_their_wildcard():
    intents = (
        FileIntent(path="src/app.py", mode="modify"),
        FileIntent(path="docs/", mode="create"),
        FileIntent(path="tests/**/*.py", mode="create"),
        FileIntent(path="*.md", mode="delete"),
    )
    assert intents_claim(intents).paths == (
        ClaimedPath("src/app.py", "file", "modify"),
        ClaimedPath("docs/", "dir", "create"),
        ClaimedPath("tests", "dir", "create"),
        ClaimedPath(".", "dir", "delete"),
    )
