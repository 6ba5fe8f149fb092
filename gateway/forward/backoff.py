"""Retry delays: exponential backoff with full jitter, floored by Retry-After.

Full jitter (a uniform draw over the whole exponential window) spreads the
retries of many stalled calls, so a recovering Accoil is not hit by them in
lockstep.
"""

from __future__ import annotations

import random

# The longest Retry-After honoured, in seconds. A larger value (or a far-future
# date) is more likely a misconfigured upstream than a real request to go quiet
# for a day; the data is held meanwhile, so one hour bounds the pause.
MAX_RETRY_AFTER = 3600.0

# 2.0 ** attempt overflows a float past 1023; any cap is reached long before.
_MAX_EXPONENT = 1000


def delay(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None,
    rng: random.Random,
) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    A uniform draw from [0, min(cap, base * 2**attempt)], but never less than
    `retry_after` (itself capped at `MAX_RETRY_AFTER`). The server's
    Retry-After wins over `cap`: it is the server's explicit ask.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if base <= 0 or cap <= 0:
        raise ValueError("base and cap must be positive")
    window = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    wait = rng.uniform(0.0, window)
    if retry_after is not None and retry_after > 0:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
    return wait
