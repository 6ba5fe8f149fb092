"""`stop_tasks`: background tasks end at a stop even when a cancellation is lost (Python
3.11's `asyncio.wait_for`, through redis-py: `gateway.tasks`), and a stop is never held for
ever by one that will not end."""

from __future__ import annotations

import asyncio
import contextlib

from structlog.testing import capture_logs

from gateway.tasks import stop_tasks


async def test_a_loop_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            if rounds == 1:
                # the first cancellation lost, as wait_for loses one when its future
                # completes in the same turn
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(loop(), name="probe")
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks([task, None]), 5)
    assert task.cancelled() and rounds >= 1


async def _stubborn(release: asyncio.Event) -> None:
    """Absorbs every cancellation until `release` is set."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


async def test_a_task_that_never_ends_is_named_and_left_behind_after_the_bound() -> None:
    release = asyncio.Event()

    task = asyncio.create_task(_stubborn(release), name="stubborn")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(stop_tasks([task], within=0.3), 5)
    assert not task.done()
    (entry,) = [e for e in logs if e["log_level"] == "error"]
    assert entry["tasks"] == ["stubborn"] and entry["within_s"] == 0.3
    release.set()
    task.cancel()
    await asyncio.wait_for(task, 5)


async def test_a_failed_task_is_logged_not_raised_and_done_ones_are_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails(), name="fails")
    finished = asyncio.create_task(asyncio.sleep(0), name="finished")
    await asyncio.sleep(0.01)
    with capture_logs() as logs:
        await stop_tasks([failed, finished])
    (entry,) = [e for e in logs if e["log_level"] == "error"]
    assert entry["task"] == "fails" and "boom" in entry["error"]


async def test_the_callers_own_cancellation_is_not_absorbed() -> None:
    release = asyncio.Event()

    task = asyncio.create_task(_stubborn(release))
    stopping = asyncio.create_task(stop_tasks([task], within=60))
    await asyncio.sleep(0.05)
    stopping.cancel()
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert stopping in done and stopping.cancelled()
    release.set()
    await asyncio.wait_for(stop_tasks([task]), 5)
    assert task.done()
