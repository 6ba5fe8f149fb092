"""A source's throttle: at most `rate_per_second` calls started per second, and at
most `max_concurrency` in flight. `async with throttle: await client.post(...)`.

asyncio-throttle's `Throttler` is a sliding-window log (at most `rate_limit`
starts in any `period` seconds) with an integer `rate_limit`. A rate r is
expressed as `rate_limit = k`, `period = k / r`, with k the starts that fit in
`WINDOW` seconds (at least 1): 0.5/s is 1 per 2 s, 50/s is 5 per 0.1 s, 200/s
is 20 per 0.1 s. So the long-run rate is exact, and bursts are at most a
tenth of a second's worth instead of a whole second's.

Two things are added around it. Its waiters poll (sleep `retry_interval`, look
again), so only one task waits on it at a time, behind an `asyncio.Lock`: that
keeps the polling to one task however many wait, and serves them in arrival
order. And `retry_interval` is a quarter of the mean gap between starts
(between 1 and 10 ms), so polling costs a few percent of the rate at most.
The semaphore is taken before the rate slot, so a slot is spent only by a
call that can start at once.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

from asyncio_throttle.throttler import Throttler

# Seconds of traffic a burst may hold: the sliding window for rates above 1/WINDOW.
WINDOW = 0.1


class Throttle:
    def __init__(self, rate_per_second: float, max_concurrency: int) -> None:
        if not (rate_per_second > 0 and math.isfinite(rate_per_second)):
            raise ValueError("rate_per_second must be a positive number")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.rate_per_second = rate_per_second
        self.max_concurrency = max_concurrency
        burst = max(1, math.floor(rate_per_second * WINDOW))
        gap = 1.0 / rate_per_second
        self.throttler = Throttler(
            rate_limit=burst,
            period=burst * gap,
            retry_interval=min(0.01, max(0.001, gap / 4)),
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self._queue = asyncio.Lock()
        self._in_flight = 0

    def __repr__(self) -> str:
        return f"Throttle(rate_per_second={self.rate_per_second}, max_concurrency={self.max_concurrency})"

    @property
    def in_flight(self) -> int:
        """Calls inside `async with` now."""
        return self._in_flight

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        try:
            async with self._queue:
                await self.throttler.acquire()  # type: ignore[no-untyped-call]  # untyped library
        except BaseException:
            # Cancelled while waiting for the rate: give the slot back.
            self._slots.release()
            raise
        self._in_flight += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in_flight -= 1
        self._slots.release()
