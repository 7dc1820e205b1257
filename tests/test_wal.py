"""The write-ahead log: group commit, recovery from a torn tail, refusal of damage, acks, compaction."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from numerusd.errors import StoreError, WalCorrupted
from numerusd.wal import MAGIC, WalEntry, WriteAheadLog


def entry(i: int, size: int = 100) -> WalEntry:
    return WalEntry(f"id{i:06d}", f"numerus.job.j{i % 3}.job_submitted", b"w" * size + str(i).encode())


@pytest.fixture
def wal_path(tmp_path):
    return tmp_path / "state" / "events.wal"


async def test_concurrent_appends_share_syncs(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(0)])  # the first write syncs alone
    before = wal.syncs
    await asyncio.gather(*(wal.append([entry(i)]) for i in range(1, 301)))
    syncs = wal.syncs - before
    assert 1 <= syncs <= 30, f"{syncs} fdatasyncs for 300 concurrent appends"
    assert [e.id for e in wal.pending()] == [entry(i).id for i in range(301)]
    await wal.close()


async def test_append_order_is_call_order(wal_path):
    wal = WriteAheadLog.open(wal_path)
    futures = [wal.submit([entry(2 * i), entry(2 * i + 1)]) for i in range(50)]
    await asyncio.gather(*futures)
    await wal.close()
    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == [entry(i).id for i in range(100)]
    await reopened.close()


async def test_durable_entries_survive_a_crash_and_acks_are_recorded(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(i) for i in range(10)])
    wal.ack([entry(i).id for i in range(0, 10, 2)])
    await wal.sync()
    wal.ack([entry(1).id])  # noted, never written: the "crash" below loses it
    crashed = WriteAheadLog.open(wal_path)  # the first handle is abandoned, as by kill -9
    assert [e.id for e in crashed.pending()] == [entry(i).id for i in (1, 3, 5, 7, 9)]
    assert crashed.pending()[0] == entry(1)
    assert crashed.is_pending(entry(3).id) and not crashed.is_pending(entry(2).id)
    await crashed.close()
    await wal.close()


async def test_torn_last_record_is_truncated(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(1)])
    await wal.append([entry(2)])
    good = wal_path.stat().st_size
    await wal.append([entry(3)])
    await wal.close()
    whole = wal_path.read_bytes()
    wal_path.write_bytes(whole[: good + (len(whole) - good) // 2])  # the crash hit mid-write

    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == [entry(1).id, entry(2).id]
    assert wal_path.stat().st_size == good
    await reopened.append([entry(4)])  # and the log goes on from there
    await reopened.close()
    again = WriteAheadLog.open(wal_path)
    assert [e.id for e in again.pending()] == [entry(1).id, entry(2).id, entry(4).id]
    await again.close()


@pytest.mark.parametrize("tail", [b"\0\0\0", b"\0" * 4096, struct.pack("<II", 50, 0) + b"x" * 10])
async def test_zero_filled_or_short_tail_is_truncated(wal_path, tail):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(1)])
    await wal.close()
    good = wal_path.stat().st_size
    with open(wal_path, "ab") as f:
        f.write(tail)
    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == [entry(1).id]
    assert wal_path.stat().st_size == good
    await reopened.close()


async def test_checksum_failure_before_the_end_is_refused(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(1)])
    await wal.append([entry(2)])
    await wal.close()
    data = bytearray(wal_path.read_bytes())
    data[len(MAGIC) + 8 + 5] ^= 0xFF  # inside the first record's payload
    wal_path.write_bytes(bytes(data))
    with pytest.raises(WalCorrupted, match=f"damaged at byte {len(MAGIC)}"):
        WriteAheadLog.open(wal_path)
    assert wal_path.read_bytes() == bytes(data)  # nothing was truncated


async def test_checksum_failure_of_the_last_record_is_a_torn_write(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.append([entry(1)])
    await wal.append([entry(2)])
    await wal.close()
    data = bytearray(wal_path.read_bytes())
    data[-3] ^= 0xFF
    wal_path.write_bytes(bytes(data))
    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == [entry(1).id]
    await reopened.close()


def test_a_file_that_is_not_a_wal_is_refused(wal_path):
    wal_path.parent.mkdir(parents=True)
    wal_path.write_bytes(b"something else entirely\n")
    with pytest.raises(WalCorrupted, match="bad header"):
        WriteAheadLog.open(wal_path)


async def test_new_log_is_private(wal_path):
    wal = WriteAheadLog.open(wal_path)
    assert wal_path.stat().st_mode & 0o777 == 0o600
    assert wal_path.read_bytes() == MAGIC
    await wal.close()


async def test_compaction_keeps_only_unacknowledged_entries(wal_path):
    wal = WriteAheadLog.open(wal_path, segment_bytes=8_000)
    for i in range(200):
        await wal.append([entry(i)])
        if i % 50 != 7:  # a few stay unacknowledged across compactions
            wal.ack([entry(i).id])
    assert wal.compactions >= 3
    assert wal_path.stat().st_size < 8_000 + 2_000
    assert not wal_path.with_name(wal_path.name + ".compact").exists()
    expected = [entry(i).id for i in range(200) if i % 50 == 7]
    assert [e.id for e in wal.pending()] == expected
    await wal.close()
    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == expected
    await reopened.close()


async def test_closed_log_refuses_appends(wal_path):
    wal = WriteAheadLog.open(wal_path)
    await wal.close()
    with pytest.raises(StoreError, match="closed"):
        await wal.append([entry(1)])


def test_unreadable_location_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open write-ahead log"):
        WriteAheadLog.open(blocker / "events.wal")
    assert os.path.exists(blocker)


async def test_on_durable_runs_in_order_even_for_a_caller_that_gave_up(wal_path):
    wal = WriteAheadLog.open(wal_path)
    calls: list[int] = []
    first = wal.submit([entry(1)], lambda: calls.append(1))
    second = wal.submit([entry(2)], lambda: calls.append(2))
    first.cancel()
    await second
    assert calls == [1, 2]
    await wal.close()
    reopened = WriteAheadLog.open(wal_path)
    assert [e.id for e in reopened.pending()] == [entry(1).id, entry(2).id]
    await reopened.close()
