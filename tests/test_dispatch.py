"""The daemon's side of a remote attempt, without a bus: how a worker's reports reach the daemon's pump."""

from __future__ import annotations

import asyncio

import pytest

from numerusd.dispatch import OUTPUT_BACKLOG, Dispatcher, RemoteAttempt, WorkLost
from numerusd.protocol import work

OFFER = work.WorkOffer(
    job="J",
    task="t1",
    attempt=1,
    lease="l" * 32,
    pool="p",
    agent="a",
    prompt="",
    base_sha="0" * 40,
    bundles=(),
    branch="numerus/J/t1",
    commit_message="m",
    result_object="result/J/t1/1.bundle",
)


async def _noted(_observation: object) -> None:
    return None


def _attempt() -> RemoteAttempt:
    dispatcher = Dispatcher(None, None, lease_s=lambda: 10.0)  # type: ignore[arg-type]  # reports need no bus
    return RemoteAttempt(offer=OFFER, dispatcher=dispatcher, observe=_noted)


async def test_a_flood_of_output_waits_for_the_pump_instead_of_filling_the_daemons_memory() -> None:
    attempt = _attempt()
    for n in range(OUTPUT_BACKLOG):
        await attempt.report(work.Output(data=b"%d\n" % n))
    held = asyncio.create_task(attempt.report(work.Output(data=b"one more\n")))
    await asyncio.sleep(0.05)
    assert not held.done()  # the worker's next report is not answered while the backlog is unread
    terminal = attempt.terminal
    read = [await terminal.read()]
    await asyncio.wait_for(held, 1)
    await attempt.report(work.Exited(exit_code=0, signal=None))
    while chunk := await terminal.read():
        read.append(chunk)
    assert b"".join(read) == b"".join(b"%d\n" % n for n in range(OUTPUT_BACKLOG)) + b"one more\n"
    assert await terminal.wait() == (0, None)


async def test_a_lost_attempt_ends_its_output_even_with_a_full_backlog_and_refuses_more() -> None:
    attempt = _attempt()
    for _ in range(OUTPUT_BACKLOG):
        await attempt.report(work.Output(data=b"x"))
    attempt.lose("worker w1 stopped heart-beating")
    await asyncio.wait_for(attempt.report(work.Output(data=b"late")), 1)  # dropped, not waited on
    chunks = []
    while chunk := await attempt.terminal.read():
        chunks.append(chunk)
    assert b"".join(chunks) == b"x" * OUTPUT_BACKLOG
    with pytest.raises(WorkLost, match="stopped heart-beating"):
        await attempt.terminal.wait()
