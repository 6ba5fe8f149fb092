"""OutcomeRecorder: an outcome the store refuses is written again, never dropped silently."""

from __future__ import annotations

import asyncio
import random
import sqlite3

import pytest

from gateway.forward import recorder as recorder_module
from gateway.forward.recorder import OutcomeRecorder


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "RETRY_BASE", 0.01)
    monkeypatch.setattr(recorder_module, "RETRY_MAX", 0.02)


class Store:
    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.writes = 0
        self.recorded = 0

    async def write(self) -> None:
        self.writes += 1
        if self.refusals:
            self.refusals -= 1
            raise sqlite3.OperationalError("database or disk is full")
        self.recorded += 1


async def test_a_write_that_lands_holds_nothing() -> None:
    changes: list[int] = []
    rec = OutcomeRecorder("s", on_change=changes.append)
    store = Store(0)
    await rec.record(store.write)
    assert (store.writes, store.recorded, changes, rec.blocked) == (1, 1, [], False)


async def test_refused_writes_are_held_then_written_once() -> None:
    changes: list[int] = []
    rec = OutcomeRecorder("s", on_change=changes.append, rng=random.Random(1))
    store = Store(3)
    task = asyncio.create_task(rec.record(store.write))
    await asyncio.sleep(0)
    assert rec.blocked and rec.waiting == 1
    other = Store(1)  # another call's outcome, refused meanwhile
    second = asyncio.create_task(rec.record(other.write))
    await asyncio.wait_for(asyncio.gather(task, second), 5)
    assert not rec.blocked
    await asyncio.wait_for(rec.wait_clear(), 1)
    assert (store.writes, store.recorded) == (4, 1)
    assert (other.writes, other.recorded) == (2, 1)
    assert changes[0] == 1 and changes[-1] == 0 and max(changes) == 2


async def test_a_stop_gives_up_the_held_outcome_and_unblocks() -> None:
    rec = OutcomeRecorder("s")
    store = Store(10**6)  # the store never takes it
    task = asyncio.create_task(rec.record(store.write))
    await asyncio.sleep(0.05)
    assert rec.blocked
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not rec.blocked and rec.waiting == 0 and store.recorded == 0
