"""The pipeline's small parts: slots served in order and kept from a claim for its executor; plan intents."""

from __future__ import annotations

import asyncio
import contextlib

from numerusd.pipeline import intents_claim
from numerusd.protocol.claims import ClaimedPath
from numerusd.protocol.plan import FileIntent
from numerusd.slots import Slots


async def test_slots_limit_concurrency_and_serve_waiters_in_order():
    slots = Slots(2)
    running: list[str] = []
    peak = 0
    order: list[str] = []
    gate = asyncio.Event()

    async def work(name: str) -> None:
        nonlocal peak
        async with slots.taken():
            order.append(name)
            running.append(name)
            peak = max(peak, len(running))
            await gate.wait()
            running.remove(name)

    names = ["a", "b", "c", "d", "e"]
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(work(name)))
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 2
    assert order == names
    assert slots.free == 2


async def test_a_slot_handed_on_stays_with_its_task_until_used_or_given_back():
    slots = Slots(1)
    async with slots.taken(task="t1", hand_on=True):
        pass
    assert slots.free == 0  # kept by t1: a stranger waits
    stranger = asyncio.create_task(_take(slots))
    await asyncio.sleep(0.01)
    assert not stranger.done()
    async with slots.taken(task="t1"):  # t1 uses its kept slot at once
        assert not stranger.done()
    await asyncio.wait_for(stranger, 1)  # and frees it when done
    async with slots.taken(task="t2", hand_on=True):
        pass
    slots.give_back("t2")
    slots.give_back("t2")  # a second time: nothing more to give
    assert slots.free == 1


async def test_a_body_that_fails_keeps_no_slot_for_its_task():
    slots = Slots(1)
    with contextlib.suppress(RuntimeError):
        async with slots.taken(task="t1", hand_on=True):
            raise RuntimeError("the claim call failed")
    assert slots.free == 1


async def _take(slots: Slots) -> None:
    async with slots.taken():
        pass


async def test_a_cancelled_waiter_gives_its_turn_away_and_loses_no_slot():
    slots = Slots(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with slots.taken():
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
    async with slots.taken():
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
