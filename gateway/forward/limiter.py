"""A source's adaptive concurrency limit: how many calls to Accoil may be in flight.

`Limit` is the arithmetic, driven by explicit times so that tests can use a fake clock;
`Limiter` waits on it in asyncio. The forwarder takes a slot before each call and reports
how the call ended. docs/forwarding.md explains the choices; in short:

A rate-limited Accoil says "too fast" with a quick 429, not with a slower answer, so a
purely latency-driven limit (Netflix's Gradient2, Envoy's gradient controller) would never
see it. The limit is loss-driven, as Netflix's AIMD limit and TCP are, with TCP CUBIC's
growth (RFC 9438) because every overload costs a Retry-After pause:

- start: +1 per answered call (the limit doubles each round trip) up to the first
  overload, then half the limit of a round trip before it;
- on 429, 503, a timeout, or a round trip far above its baseline: once per episode (calls
  sent before a cut report the same overload again), the ceiling becomes what the
  delivery rate showed the upstream takes (answered calls a second x round trip, Little's
  law) and the limit `BACKOFF` x that;
- regrowth in time since the cut: back to the ceiling in `RECOVER` seconds, slowing down
  as it nears it, flat around it, then faster and faster beyond it, so that a capacity
  that grew is found within seconds and a steady one is probed rarely;
- calls start paced over the round trip, so that the slots a pause frees do not all go at
  once into the upstream's burst allowance.

The latency guard follows Gradient2: a short (recent) and a long (baseline) average of
the round trip; the short one above `RTT_TOLERANCE` x the long one, by at least
`RTT_SLACK` seconds, for `QUEUE_HOLD` seconds, means calls queue upstream. A Retry-After pauses the whole source.
`rate_per_second` and `max_concurrency` are optional hard caps on top. They are the
deployment's: with many gateways on one Redis, each holds its `share` of them (the
partitions it owns over all of them), so that the gateways together stay within the caps.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from gateway.forward.backoff import MAX_RETRY_AFTER
from gateway.forward.outcome import Delivered, Outcome, Retry

# How a call ended, for the limit: "ok" (answered in time), "overload" (429, 503,
# timeout), "neutral" (tells nothing about capacity: a 4xx, a 500, a refused connection).
Signal = Literal["ok", "overload", "neutral"]
Reason = Literal["rate_limited", "unavailable", "timeout", "latency"]

INITIAL = 8  # the limit a source starts with
CEILING = 256  # the most calls in flight without a max_concurrency cap
BACKOFF = 0.85  # on overload, the limit becomes this much of the new ceiling
HALVE = 0.5  # ... or this much of the limit, with no delivery rate to go by
# The delivery rate before an overload includes the upstream's burst allowance that the
# excess spent, so it overstates the capacity a little: the ceiling is this much of it.
MARGIN = 0.97
# It understates the capacity when the limit was still climbing back from the last cut
# for most of the span: the last ceiling then carries over, this much lower each time.
CARRY = 0.98
RATE_SPAN = 2.0  # seconds of answered calls behind a delivery-rate estimate
# Regrowth after a cut, in seconds since it: back to the ceiling along a concave cubic in
# RECOVER seconds, then beyond it along a convex one that adds PROBE x the ceiling after
# one second, 8 x PROBE after two, and so on: 3.2 x the ceiling about 5.7 s after.
RECOVER = 7.0
PROBE = 0.012
RTT_TOLERANCE = 2.0
RTT_SLACK = 0.02
QUEUE_HOLD = 1.0  # seconds the round trip must stay that high before it cuts
SHORT_RTT = 0.05  # EWMA weight of a sample in the short round trip (about the last 20)
LONG_RTT = 0.005  # ... and in the long one (about the last 200)
# Calls start at most PACING times faster than the limit per round trip, fractions
# included, but may start PACING_EARLY seconds early; with starts less than that apart,
# they are not paced at all: a timer per call would cost more than it spreads.
PACING = 1.0
PACING_EARLY = 0.001
# A rate cap lets this many seconds' worth of calls start at once.
BURST = 0.1


class Limit:
    """The limit's state and arithmetic; every method takes `now` (monotonic seconds)."""

    def __init__(
        self,
        *,
        max_concurrency: int | None = None,
        rate_per_second: float | None = None,
        initial: int = INITIAL,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if rate_per_second is not None and not (
            rate_per_second > 0 and math.isfinite(rate_per_second)
        ):
            raise ValueError("rate_per_second must be a positive number")
        if initial < 1:
            raise ValueError("initial must be at least 1")
        # the caps as configured, for the whole deployment; `ceiling` and `rate_per_second`
        # are this gateway's part of them (`set_share`)
        self.max_concurrency = max_concurrency
        self.rate_cap = rate_per_second
        self.share = 1.0
        self.ceiling = max_concurrency or CEILING
        self.rate_per_second = rate_per_second
        self.limit = float(min(initial, self.ceiling))
        self.in_flight = 0
        self.paused_until = 0.0
        self.short_rtt: float | None = None
        self.long_rtt: float | None = None
        self.slow_start = True
        # (time, limit) after each growth in the start: what the limit was when a call went out
        self._grown: list[tuple[float, float]] = [(-math.inf, self.limit)]
        # where a start after an outage ends: the limit before the outage
        self._restart_to: float | None = None
        self._w_max = 0.0  # the ceiling: what the upstream was last shown to take
        self._k = 0.0  # seconds after a cut at which regrowth reaches _w_max
        self._floor = 0.0  # the limit just after the cut
        self._cut_at = -math.inf
        # when the next call may start (pacing), and since when the round trip has looked
        # like a queue
        self._pace_at = -math.inf
        self._queueing_since: float | None = None
        # completions of answered calls over the last `RATE_SPAN`, and since when calls
        # have gone out without a pause: the delivery rate that sizes a cut
        self._oks: deque[float] = deque()
        self._active_since: float | None = None
        # rate cap as GCRA: the theoretical start time of the next call
        self._tat = -math.inf
        self._gap = self._tolerance = 0.0
        if rate_per_second is not None:
            self._set_rate(rate_per_second)

    def _set_rate(self, rate: float) -> None:
        self.rate_per_second = rate
        self._gap = 1.0 / rate
        self._tolerance = max(0, math.floor(rate * BURST) - 1) * self._gap

    def set_share(self, share: float) -> None:
        """This gateway's share of the deployment's forwarding, from 0 to 1 (Redis mode:
        partitions owned / partitions): the caps become that share of the configured ones.
        The rate splits exactly; the concurrency cap is rounded down, but a gateway with any
        share keeps one call in flight. With no share, no call starts."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be from 0 to 1, got {share}")
        self.share = share
        if self.max_concurrency is not None:
            self.ceiling = max(1, math.floor(self.max_concurrency * share + 1e-9))
            # the calls in flight above a lowered ceiling end as they will; none starts
            # until they are below it
            self.limit = min(self.limit, float(self.ceiling))
        if self.rate_cap is not None and share > 0:
            self._set_rate(self.rate_cap * share)

    def __repr__(self) -> str:
        return f"Limit(limit={self.limit:.1f}, in_flight={self.in_flight})"

    @property
    def slots(self) -> int:
        """Calls that may be in flight now: the limit rounded up (where calls are paced,
        the mean stays at the limit itself: 4.5 is 4 and 5 in turn, not 4), at least one."""
        return max(1, math.ceil(self.limit - 1e-9))

    def wait_time(self, now: float) -> float:
        """Seconds before a call may start: 0 now, `math.inf` until a call ends."""
        if now < self.paused_until:
            return self.paused_until - now
        if self.in_flight >= self.slots or self.share == 0.0:
            return math.inf
        wait = max(0.0, self._pace_at - PACING_EARLY - now)
        if self.rate_per_second is not None:
            wait = max(wait, self._tat - self._tolerance - now)
        return wait

    def start(self, now: float) -> None:
        """A call starts (after `wait_time(now)` came to 0)."""
        if self._active_since is None or self._active_since < self.paused_until:
            self._active_since = now
        self.in_flight += 1
        if self.long_rtt is not None:
            # pacing: the limit's calls spread over a round trip, so that the slots a pause
            # or a cut left free do not all go at once into the upstream's burst allowance
            gap = self.long_rtt / (self.limit * PACING)
            if gap >= PACING_EARLY:
                self._pace_at = max(self._pace_at, now) + gap
        if self.rate_per_second is not None:
            self._tat = max(self._tat, now) + self._gap

    def cancel(self) -> None:
        """A call that took a slot was never sent."""
        self.in_flight = max(0, self.in_flight - 1)

    def done(self, now: float, sent_at: float, signal: Signal, rtt: float) -> bool:
        """A call sent at `sent_at` ended after `rtt` seconds; True if that cut the limit."""
        busy = self.in_flight
        self.in_flight = max(0, self.in_flight - 1)
        if signal == "neutral":
            return False
        if signal == "overload":
            return self._cut(now, sent_at)
        self._observe(rtt)
        self._oks.append(now)
        self._forget(now)
        if not self.queueing:
            self._queueing_since = None
        elif self._queueing_since is None:
            self._queueing_since = now
        elif now - self._queueing_since >= QUEUE_HOLD:
            # a stall of this process's own event loop also stretches the round trips of
            # the calls in flight, but only for a moment: a queue upstream lasts. After the
            # cut the baseline starts from the slow round trip: if it stays, it is Accoil's
            # new normal; if it was a queue, it drains and the baseline follows it down
            self._queueing_since = None
            self.long_rtt = self.short_rtt
            return self._cut(now, sent_at)
        # a limit only half used says nothing about whether more would pass
        if busy * 2 >= self.slots:
            self._grow(now)
        return False

    @property
    def queueing(self) -> bool:
        """Is the recent round trip well above its baseline (calls queue upstream)?"""
        if self.short_rtt is None or self.long_rtt is None:
            return False
        return (
            self.short_rtt > self.long_rtt * RTT_TOLERANCE
            and self.short_rtt - self.long_rtt > RTT_SLACK
        )

    def pause(self, now: float, seconds: float) -> None:
        """Accoil's Retry-After: no call starts for `seconds` (at most `MAX_RETRY_AFTER`)."""
        self.paused_until = max(self.paused_until, now + min(seconds, MAX_RETRY_AFTER))

    def paused_for(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    def _observe(self, rtt: float) -> None:
        if self.short_rtt is None or self.long_rtt is None:
            self.short_rtt = self.long_rtt = rtt
            return
        self.short_rtt += (rtt - self.short_rtt) * SHORT_RTT
        if self._queueing_since is None:
            # frozen while the round trip looks like a queue: a baseline that learned the
            # queue would stop seeing it
            self.long_rtt += (rtt - self.long_rtt) * LONG_RTT
        # the baseline lags a recovery from a long spell of slow answers: catch it up
        # (Gradient2 does the same), or the guard would stay blind for minutes
        if self.long_rtt > 2 * self.short_rtt:
            self.long_rtt *= 0.9

    def _cut(self, now: float, sent_at: float) -> bool:
        if sent_at < self._cut_at:
            # sent before the last cut, at the old limit: the same overload, told again
            return False
        delivered = self.delivered(now)
        restart = False
        if not self._oks:
            # nothing answered for a while: an outage rather than a pace. Halve the limit
            # at each overload; when calls pass again, start over (doubling) up to the
            # limit from before the outage
            self._restart_to = self._restart_to or self.limit
            self.limit = self._w_max = max(1.0, self.limit * HALVE)
            restart = True
        elif self.slow_start:
            # the end of the start, whose limit doubles every round trip: a refusal comes
            # back at once, but the calls it overtook went out at the limit of a round trip
            # ago, and that is what the upstream was shown to take. Halve that.
            then = min(sent_at, now - (self.long_rtt or 0.0))
            i = bisect.bisect_right(self._grown, (then, math.inf)) - 1
            self.limit = max(1.0, (self._grown[i][1] if i >= 0 else self.limit) * HALVE)
            self._w_max = self.limit
            self._restart_to = None
        elif delivered is None:
            # an overload with no steady spell behind it (just after a pause): the limit
            # is far off and the delivery rate no guide, so halve it and grow from there
            self.limit = self._w_max = max(1.0, self.limit * HALVE)
        else:
            # the limit at the overload overstates what passed when the upstream's burst
            # allowance hid the excess for a while: the delivery rate does not
            self._w_max = min(self.limit, max(delivered * MARGIN, self._w_max * CARRY))
            self.limit = max(1.0, self._w_max * BACKOFF)
        self._k = RECOVER if self.limit < self._w_max else 0.0
        self._floor = self.limit
        self._cut_at = now
        self.slow_start = restart
        self._grown = [(-math.inf, self.limit)]
        return True

    def _forget(self, now: float) -> None:
        while self._oks and self._oks[0] < now - RATE_SPAN:
            self._oks.popleft()

    def delivered(self, now: float) -> float | None:
        """Calls in flight that the recent delivery rate supports (Little's law: answered
        calls a second x baseline round trip); None without enough unpaused history."""
        self._forget(now)
        if self._active_since is None or self.long_rtt is None:
            return None
        # no answer comes back in the first round trip after a start or a pause
        since = max(self._active_since, self.paused_until) + self.long_rtt
        span = min(RATE_SPAN, now - since)
        if span < 4 * self.long_rtt:
            return None
        oks = len(self._oks) - bisect.bisect_left(self._oks, now - span)
        return oks / span * self.long_rtt

    def _grow(self, now: float) -> None:
        if self.slow_start:
            if self.limit >= self.ceiling:
                return  # held at a cap: nothing to remember
            self.limit = min(self.limit + 1, self.ceiling)
            self._grown.append((now, self.limit))
            if self._restart_to is not None and self.limit >= self._restart_to:
                # back where the outage found it: probe on from there
                self.slow_start = False
                self._w_max = self._floor = self.limit
                self._k, self._cut_at, self._restart_to = 0.0, now, None
            return
        t = max(0.0, now - self._cut_at)
        if t < self._k:
            left = (self._k - t) / self._k
            target = self._w_max - (self._w_max - self._floor) * left * left * left
        else:
            t -= self._k
            target = self._w_max * (1 + PROBE * t * t * t)
        if target > self.limit:
            # at most +1 a call, so a long quiet spell does not jump the limit at once
            self.limit = min(target, self.limit + 1, self.ceiling)


def signal_of(outcome: Outcome) -> tuple[Signal, Reason | None]:
    """What an outcome tells the limit, and the overload's kind."""
    if isinstance(outcome, Delivered):
        return "ok", None
    if isinstance(outcome, Retry):
        if outcome.status == 429:
            return "overload", "rate_limited"
        if outcome.status == 503:
            return "overload", "unavailable"
        if outcome.reason == "timeout":
            return "overload", "timeout"
    return "neutral", None


class Recent:
    """Calls ended in the last `span` seconds, and their last round trips: for stats."""

    def __init__(self, span: float = 10.0, keep: int = 2048) -> None:
        self.span = span
        self._ends: deque[float] = deque()
        self._rtts: deque[float] = deque(maxlen=keep)

    def add(self, now: float, rtt: float) -> None:
        self._ends.append(now)
        self._rtts.append(rtt)
        self._trim(now)

    def calls_per_second(self, now: float) -> float:
        self._trim(now)
        return len(self._ends) / self.span

    def rtt_quantile(self, q: float) -> float | None:
        if not self._rtts:
            return None
        ordered = sorted(self._rtts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def _trim(self, now: float) -> None:
        while self._ends and self._ends[0] < now - self.span:
            self._ends.popleft()


class Limiter:
    """`Limit` in asyncio, for one waiter (the forwarder's loop) and many reporters."""

    def __init__(self, limit: Limit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.recent = Recent()
        self.overloads: dict[Reason, int] = {}
        self.cuts: dict[Reason, int] = {}
        self._changed = asyncio.Event()

    async def acquire(self) -> float:
        """Wait for a slot (and the end of any pause, and the rate cap); returns the
        start time to pass back to `done`."""
        while True:
            now = self.clock()
            wait = self.limit.wait_time(now)
            if wait <= 0:
                self.limit.start(now)
                return now
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(wait) else wait):
                    await self._changed.wait()

    def cancel(self) -> None:
        self.limit.cancel()
        self._changed.set()

    def done(self, sent_at: float, outcome: Outcome) -> Reason | None:
        """A call that `acquire` let start at `sent_at` ended; returns why that cut the
        limit, if it did."""
        now = self.clock()
        signal, kind = signal_of(outcome)
        if kind is not None:
            self.overloads[kind] = self.overloads.get(kind, 0) + 1
        cut: Reason | None = None
        if self.limit.done(now, sent_at, signal, outcome.latency):
            cut = kind or "latency"
            self.cuts[cut] = self.cuts.get(cut, 0) + 1
        self.recent.add(now, outcome.latency)
        self._changed.set()
        return cut

    def pause(self, seconds: float) -> None:
        self.limit.pause(self.clock(), seconds)

    def set_share(self, share: float) -> None:
        """See `Limit.set_share`; a waiting `acquire` looks again."""
        self.limit.set_share(share)
        self._changed.set()

    def paused_for(self) -> float:
        return self.limit.paused_for(self.clock())

    def stats(self) -> dict[str, object]:
        """For /admin/stats: where the limit is and what it has seen."""
        now = self.clock()
        lim = self.limit
        p50, p99 = self.recent.rtt_quantile(0.5), self.recent.rtt_quantile(0.99)
        return {
            "limit": round(lim.limit, 2),
            "in_flight": lim.in_flight,
            "slow_start": lim.slow_start,
            "paused_for_s": round(lim.paused_for(now), 3),
            "calls_per_s": round(self.recent.calls_per_second(now), 1),
            "rtt_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "rtt_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "rtt_baseline_ms": None if lim.long_rtt is None else round(lim.long_rtt * 1000, 1),
            "answered_429": self.overloads.get("rate_limited", 0),
            "answered_503": self.overloads.get("unavailable", 0),
            "timeouts": self.overloads.get("timeout", 0),
            "cuts": dict(self.cuts),
            "max_concurrency": lim.max_concurrency,
            "rate_per_second": lim.rate_cap,
            "share": round(lim.share, 4),
        }
