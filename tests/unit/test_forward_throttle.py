from __future__ import annotations

import asyncio
import time

import pytest

from gateway.forward import Throttle


async def run(throttle: Throttle, calls: int, hold: float = 0.0) -> tuple[float, int]:
    """Elapsed time for `calls` concurrent calls, and the most seen in flight at once."""
    active = peak = 0

    async def call() -> None:
        nonlocal active, peak
        async with throttle:
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(hold)
            active -= 1

    started = time.monotonic()
    await asyncio.gather(*(call() for _ in range(calls)))
    return time.monotonic() - started, peak


@pytest.mark.parametrize(
    ("rate", "burst", "period"),
    [(0.5, 1, 2.0), (2.5, 1, 0.4), (10, 1, 0.1), (50, 5, 0.1), (200, 20, 0.1), (1000, 100, 0.1)],
)
def test_rate_is_expressed_exactly_in_the_throttler(rate: float, burst: int, period: float) -> None:
    t = Throttle(rate, 4)
    assert t.throttler.rate_limit == burst
    assert t.throttler.period == pytest.approx(period)
    assert t.throttler.rate_limit / t.throttler.period == pytest.approx(rate)


async def test_rate_50_per_second_is_enforced() -> None:
    # 20 calls at 50/s: bursts of 5 every 0.1 s, so the last starts at >= 0.3 s.
    elapsed, _ = await run(Throttle(50, 100), 20)
    assert 0.28 <= elapsed < 1.0


async def test_rate_200_per_second_is_enforced_and_reached() -> None:
    # 100 calls at 200/s: the last starts at >= 0.4 s; polling must not halve the rate.
    elapsed, _ = await run(Throttle(200, 100), 100)
    assert 0.38 <= elapsed < 0.9


async def test_fractional_rate_below_one() -> None:
    t = Throttle(0.5, 4)
    started = time.monotonic()
    async with t:
        pass
    assert time.monotonic() - started < 0.1  # the first call goes at once
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # the next is 2 s away
            async with t:
                pytest.fail("second call at 0.5/s went through within 0.3 s")
    # the cancelled waiter gave its concurrency slot back
    assert t._slots._value == 4
    assert t.in_flight == 0


async def test_concurrency_never_exceeds_limit() -> None:
    t = Throttle(10_000, 3)
    _, peak = await run(t, 30, hold=0.01)
    assert peak == 3
    assert t.in_flight == 0


async def test_slot_released_on_error_inside() -> None:
    t = Throttle(10_000, 1)
    with pytest.raises(RuntimeError):
        async with t:
            raise RuntimeError("boom")
    async with asyncio.timeout(0.5), t:
        assert t.in_flight == 1


async def test_no_window_holds_more_starts_than_the_rate_allows() -> None:
    # At 50/s (5 per 0.1 s), with calls of uneven length and a concurrency limit,
    # no 0.1 s window ever sees a 6th start.
    t = Throttle(50, 4)
    starts: list[float] = []

    async def call(i: int) -> None:
        async with t:
            starts.append(time.monotonic())
            await asyncio.sleep(0.005 * (i % 7))

    await asyncio.gather(*(call(i) for i in range(20)))
    starts.sort()
    gaps = [later - first for first, later in zip(starts, starts[5:], strict=False)]
    assert min(gaps) >= 0.09


@pytest.mark.parametrize(
    ("rate", "conc"), [(0, 1), (-1, 1), (float("inf"), 1), (float("nan"), 1), (1, 0)]
)
def test_invalid(rate: float, conc: int) -> None:
    with pytest.raises(ValueError):
        Throttle(rate, conc)
