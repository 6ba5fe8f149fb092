"""Capacity: how much the mock takes before it answers 429, as a rate-limited Accoil would.

No I/O. A token bucket allows `rate` calls a second with bursts of up to `burst`, and at
most `concurrency` calls may be in flight (admitted and not yet answered); a call past
either gets 429 with `Retry-After`, at once and without touching state. `latency` is the
time every admitted call takes. Capacity covers every ingest call of every API key,
after faults (a faulted call neither spends nor needs capacity).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec

# a burst allowance of this many seconds' worth of calls, unless `burst` is given
BURST_SECONDS = 0.1

Refusal = Literal["rate", "concurrency"]


class Capacity(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The body of `PUT /_mock/capacity`: every field optional, none means no limit."""

    rate: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    latency: Annotated[float, msgspec.Meta(ge=0.0, le=300.0)] = 0.0
    retry_after: Annotated[int, msgspec.Meta(ge=0)] = 1

    def __post_init__(self) -> None:
        if self.burst is not None and self.rate is None:
            raise ValueError("burst needs a rate")

    @property
    def bucket(self) -> float:
        """Tokens the bucket holds when full."""
        if self.rate is None:
            return math.inf
        return float(self.burst) if self.burst is not None else max(1.0, self.rate * BURST_SECONDS)


class Report(msgspec.Struct, kw_only=True):
    """What `GET /_mock/capacity` answers: the capacity (null when none) and its counts."""

    capacity: Capacity | None
    in_flight: int
    admitted: int
    refused_rate: int
    refused_concurrency: int


class Gate:
    """Admits calls under a capacity; the owner locks. Counts survive capacity changes."""

    def __init__(self) -> None:
        self.capacity: Capacity | None = None
        self.in_flight = 0
        self.admitted = 0
        self.refused: dict[Refusal, int] = {"rate": 0, "concurrency": 0}
        self._tokens = 0.0
        self._at = 0.0

    def set(self, capacity: Capacity | None, now: float) -> None:
        """A new capacity starts with a full bucket; calls in flight stay counted."""
        self.capacity = capacity
        self._tokens = capacity.bucket if capacity is not None else 0.0
        self._at = now

    def admit(self, now: float) -> Refusal | None:
        """Take one call in (the caller must `release` it once answered), or say why not."""
        cap = self.capacity
        if cap is not None:
            if cap.concurrency is not None and self.in_flight >= cap.concurrency:
                self.refused["concurrency"] += 1
                return "concurrency"
            if cap.rate is not None:
                self._tokens = min(cap.bucket, self._tokens + (now - self._at) * cap.rate)
                self._at = now
                if self._tokens < 1.0:
                    self.refused["rate"] += 1
                    return "rate"
                self._tokens -= 1.0
        self.in_flight += 1
        self.admitted += 1
        return None

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def reset(self, now: float) -> None:
        self.set(None, now)
        self.admitted = 0
        self.refused = {"rate": 0, "concurrency": 0}

    def report(self) -> Report:
        return Report(
            capacity=self.capacity,
            in_flight=self.in_flight,
            admitted=self.admitted,
            refused_rate=self.refused["rate"],
            refused_concurrency=self.refused["concurrency"],
        )
