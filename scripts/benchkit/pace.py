"""How well a run kept to an upstream's capacity, from the mock's journal. Pure functions.

Times are seconds (the journal's wall clock); `ok` are the times of accepted calls (202),
`limited` of the calls answered 429.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

CONVERGE_WINDOW = 1.0  # seconds a window must hold the pace to count as converged
CONVERGE_STEP = 0.1
NEAR = 0.8  # "within 0.8 x of the capacity": accepted calls a second at least this share
MAX_429_SHARE = 0.05  # ... with at most this share of the calls answered 429


def between(times: Sequence[float], start: float, end: float) -> int:
    """How many of the sorted `times` fall in [start, end)."""
    return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)


def converged_after(
    ok: Sequence[float], limited: Sequence[float], start: float, end: float, capacity: float,
    *, window: float = CONVERGE_WINDOW,
) -> float | None:
    """Seconds from `start` to the end of the first `window` (stepping `CONVERGE_STEP`)
    in which accepted calls reach `NEAR` x `capacity` a second and at most `MAX_429_SHARE`
    of the calls got 429; None if no window before `end` does."""
    at = start
    while at + window <= end + 1e-9:
        passed = between(ok, at, at + window)
        refused = between(limited, at, at + window)
        if passed >= NEAR * capacity * window and refused <= MAX_429_SHARE * (passed + refused):
            return round(at + window - start, 2)
        at += CONVERGE_STEP
    return None


def phase(
    ok: Sequence[float], limited: Sequence[float], start: float, end: float, capacity: float,
) -> dict[str, Any]:
    """One capacity's figures: calls a second, its share of the capacity, 429s, convergence."""
    seconds = end - start
    passed = between(ok, start, end)
    refused = between(limited, start, end)
    rate = passed / seconds if seconds > 0 else 0.0
    return {
        "capacity_per_s": capacity,
        "seconds": round(seconds, 2),
        "accepted": passed,
        "answered_429": refused,
        "accepted_per_s": round(rate, 1),
        "vs_capacity": round(rate / capacity, 3),
        "share_429": round(refused / (passed + refused), 4) if passed + refused else 0.0,
        "converged_after_s": converged_after(ok, limited, start, end, capacity),
    }


def timeline(
    ok: Sequence[float], limited: Sequence[float], start: float, end: float, step: float = 1.0
) -> list[tuple[float, int, int]]:
    """(seconds since `start`, accepted, 429) per `step` seconds: the run at a glance."""
    out = []
    at = start
    while at < end:
        out.append((round(at - start, 1), between(ok, at, at + step), between(limited, at, at + step)))
        at += step
    return out
