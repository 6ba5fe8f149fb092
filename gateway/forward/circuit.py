"""A circuit breaker per source: stop calling an Accoil that keeps failing.

closed --threshold consecutive failures--> open --cooldown--> half-open
half-open lets one probe through: its success closes the circuit, its failure
re-opens it with the cooldown doubled (up to `max_cooldown`). Only retryable
failures count; a rejected call (4xx) shows the upstream is up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]

# A cooldown grows to at most this many seconds (or the base cooldown, if longer).
MAX_COOLDOWN = 60.0


class Circuit:
    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_cooldown: float | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be positive")
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max(cooldown, MAX_COOLDOWN if max_cooldown is None else max_cooldown)
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._cooldown = cooldown
        self._opened_at = 0.0
        self._probe_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"Circuit(state={self.state!r}, failures={self._failures}, cooldown={self._cooldown})"
        )

    @property
    def state(self) -> State:
        """Reads "half-open" as soon as the cooldown has passed, before the probe is taken."""
        if self._state == "open" and self._clock() >= self._opened_at + self._cooldown:
            return "half-open"
        return self._state

    @property
    def cooldown(self) -> float:
        """The current cooldown: the base one, doubled by each failed probe."""
        return self._cooldown

    def allow(self) -> bool:
        """May a call go now? In half-open, True once: the caller's call is the probe.

        A probe that never reports back (its task cancelled) does not wedge the
        circuit: after another cooldown the next caller becomes the probe.
        """
        if self._state == "closed":
            return True
        now = self._clock()
        if self._state == "open":
            if now < self._opened_at + self._cooldown:
                return False
            self._state = "half-open"
        if self._probe_at is not None and now < self._probe_at + self._cooldown:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        """A delivered (or rejected) call: the upstream answers, close the circuit."""
        self._state = "closed"
        self._failures = 0
        self._cooldown = self.base_cooldown
        self._probe_at = None

    def failure(self) -> None:
        """A retryable failure (a `Retry` outcome)."""
        if self._state == "closed":
            self._failures += 1
            if self._failures >= self.threshold:
                self._open()
        elif self._state == "half-open":
            self._cooldown = min(self._cooldown * 2, self.max_cooldown)
            self._open()
        # Already open: failures of calls sent before it opened change nothing,
        # or they would keep pushing the probe back.

    def wait_time(self) -> float:
        """Seconds until `allow()` may return True (0 when it would now)."""
        now = self._clock()
        if self._state == "open":
            return max(0.0, self._opened_at + self._cooldown - now)
        if self._state == "half-open" and self._probe_at is not None:
            return max(0.0, self._probe_at + self._cooldown - now)
        return 0.0

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_at = None
        self._failures = 0
