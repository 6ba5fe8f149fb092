"""The adaptive limit's arithmetic on a fake clock, and its asyncio waiting."""

from __future__ import annotations

import asyncio
import heapq
import math
import random

import pytest

from gateway.forward.backoff import MAX_RETRY_AFTER
from gateway.forward.limiter import (
    BACKOFF,
    CEILING,
    INITIAL,
    MARGIN,
    RECOVER,
    Limit,
    Limiter,
    signal_of,
)
from gateway.forward.outcome import Delivered, Reject, Retry

RTT = 0.05


def fill(limit: Limit, now: float) -> list[float]:
    """Start every call the limit allows at `now`; their start times."""
    started = []
    while limit.wait_time(now) == 0:
        limit.start(now)
        started.append(now)
    return started


class Upstream:
    """Drives a limit as the forwarder does, against an upstream answering in `rtt`:
    always work queued, calls started whenever the limit allows. With a `capacity` (calls
    a second, bursts of a tenth of a second's worth), calls past it get an immediate 429
    and a Retry-After pause of 1 s."""

    def __init__(self, limit: Limit, rtt: float = RTT, capacity: float | None = None,
                 seed: int = 1) -> None:
        self.limit = limit
        self.rtt = rtt
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.bucket = self.burst = max(1.0, (capacity or 0) * 0.1)
        self.filled_at = 0.0
        self.ends: list[tuple[float, float, bool]] = []
        self.now = 0.0
        self.accepted = self.refused = 0
        self.samples: list[tuple[float, float]] = []

    def _admit(self) -> bool:
        if self.capacity is None:
            return True
        self.bucket = min(self.burst, self.bucket + (self.now - self.filled_at) * self.capacity)
        self.filled_at = self.now
        if self.bucket >= 1:
            self.bucket -= 1
            return True
        return False

    def run(self, seconds: float) -> Upstream:
        until = self.now + seconds
        while self.now < until:
            while (wait := self.limit.wait_time(self.now)) == 0:
                self.limit.start(self.now)
                if self._admit():
                    end = self.now + self.rtt + self.rng.uniform(0, self.rtt / 20)
                    heapq.heappush(self.ends, (end, self.now, True))
                else:
                    heapq.heappush(self.ends, (self.now + 0.002, self.now, False))
            self.now = min(self.ends[0][0] if self.ends else math.inf, self.now + wait, until)
            while self.ends and self.ends[0][0] <= self.now:
                end, sent, ok = heapq.heappop(self.ends)
                self.limit.done(end, sent, "ok" if ok else "overload", end - sent)
                if ok:
                    self.accepted += 1
                else:
                    self.refused += 1
                    self.limit.pause(end, 1.0)
            self.samples.append((self.now, self.limit.limit))
        return self


def round_trip(limit: Limit, now: float, rtt: float = RTT) -> float:
    """Fill the limit at `now` and answer every call ok one `rtt` later; the time after."""
    sent = fill(limit, now)
    for at in sent:
        limit.done(now + rtt, at, "ok", rtt)
    return now + rtt


# -- growth ------------------------------------------------------------------------------


def test_starts_at_initial_and_doubles_each_round_trip() -> None:
    limit = Limit()
    assert limit.limit == INITIAL and limit.slow_start
    up = Upstream(limit).run(RTT * 1.2)
    assert 1.4 * INITIAL <= limit.limit <= 2 * INITIAL
    up.run(RTT * 3)
    assert limit.limit >= 5 * INITIAL and limit.slow_start


def test_does_not_grow_when_the_limit_is_not_used() -> None:
    limit = Limit()
    for i in range(100):
        # one call at a time: a limit of 8 is not what holds this source back
        limit.start(i * 1.0)
        limit.done(i * 1.0 + RTT, i * 1.0, "ok", RTT)
    assert limit.limit == INITIAL


def test_never_grows_past_the_concurrency_cap_or_the_ceiling() -> None:
    capped = Limit(max_concurrency=12)
    up = Upstream(capped).run(3.0)
    assert capped.limit == 12 and capped.in_flight <= 12
    assert up.accepted / 3.0 == pytest.approx(12 / (RTT * 1.025), rel=0.1)
    free = Limit()
    Upstream(free).run(3.0)
    assert free.limit == CEILING
    assert Limit(max_concurrency=3).limit == 3  # the initial limit obeys the cap too


def test_a_slot_frees_when_a_call_ends_or_is_cancelled() -> None:
    limit = Limit(initial=2)
    assert len(fill(limit, 0.0)) == 2
    assert limit.wait_time(0.0) == math.inf
    limit.cancel()
    assert limit.wait_time(0.0) == 0
    limit.start(0.0)
    limit.done(0.05, 0.0, "neutral", 0.05)
    assert limit.wait_time(0.05) == 0 and limit.limit == 2  # neutral: no growth


# -- back-off ----------------------------------------------------------------------------


def test_overload_in_the_start_halves_the_limit_of_a_round_trip_before() -> None:
    limit = Limit()
    up = Upstream(limit).run(0.2)
    assert limit.slow_start
    rtt = limit.long_rtt
    assert rtt is not None
    then = max(lim for t, lim in up.samples if t <= up.now - rtt)
    # the upstream refuses at once; the calls it overtook went out at the limit of one
    # round trip ago, which is what it took
    limit.start(up.now)
    assert limit.done(up.now + 0.002, up.now, "overload", 0.002)
    assert limit.limit == pytest.approx(then / 2, abs=1.0)
    assert not limit.slow_start


def test_one_cut_per_episode() -> None:
    limit = Limit()
    now = Upstream(limit).run(0.2).now
    sent = fill(limit, now) + [now - 0.01] * 19  # and calls sent a little earlier
    assert limit.done(now + 0.01, sent[0], "overload", 0.01)
    after = limit.limit
    # the other calls of that round went out before the cut: they tell the same story
    for at in sent[1:]:
        assert not limit.done(now + 0.02, at, "overload", 0.02)
    assert limit.limit == after
    # a call sent after the cut that is refused is a new overload
    limit.start(now + 0.03)
    assert limit.done(now + 0.04, now + 0.03, "overload", 0.01)
    assert limit.limit < after


def steady_after_a_cut(cap: int = 20) -> Upstream:
    """A limit out of its start, held at `cap` calls in flight for a few seconds."""
    limit = Limit(max_concurrency=cap)
    up = Upstream(limit).run(1.0)
    limit.start(up.now)
    assert limit.done(up.now + 0.002, up.now, "overload", 0.002)  # leaves the start
    return up.run(RECOVER + 2.0)


def test_overload_after_a_steady_spell_cuts_to_what_was_delivered() -> None:
    up = steady_after_a_cut()
    limit = up.limit
    assert limit.limit == 20 and not limit.slow_start
    delivered = limit.delivered(up.now)
    assert delivered is not None and delivered == pytest.approx(20, rel=0.05)  # 20 in flight, answered in a round trip
    limit.start(up.now)
    assert limit.done(up.now + 0.002, up.now, "overload", 0.002)
    assert limit.limit == pytest.approx(delivered * MARGIN * BACKOFF, rel=0.01)


def test_regrows_to_the_ceiling_then_probes_beyond() -> None:
    up = steady_after_a_cut()
    limit = up.limit
    limit.start(up.now)
    limit.done(up.now + 0.002, up.now, "overload", 0.002)
    floor = limit.limit
    ceiling = floor / BACKOFF
    limit.ceiling = CEILING  # no cap from now on: an upstream that takes everything
    levels = [up.run(seconds).limit.limit for seconds in (1.0, RECOVER - 1.0, 2.0, 3.0)]
    # part of the way back after a second, then flat near the old ceiling, then beyond it
    assert floor + 0.2 * (ceiling - floor) < levels[0] < ceiling
    assert ceiling * 0.97 <= levels[1] <= ceiling * 1.03
    assert levels[1] < levels[2] < levels[3]
    assert levels[3] > ceiling * 1.2


def test_timeouts_and_503_cut_too_but_not_other_failures() -> None:
    assert signal_of(Retry("rate_limited", 429, 1.0, 0.01)) == ("overload", "rate_limited")
    assert signal_of(Retry("server_error", 503, None, 0.01)) == ("overload", "unavailable")
    assert signal_of(Retry("timeout", None, None, 10.0)) == ("overload", "timeout")
    assert signal_of(Retry("timeout", 408, None, 0.01)) == ("overload", "timeout")
    assert signal_of(Retry("server_error", 500, None, 0.01)) == ("neutral", None)
    assert signal_of(Retry("connection", None, None, 0.01)) == ("neutral", None)
    assert signal_of(Reject(400, "bad", 0.01)) == ("neutral", None)
    assert signal_of(Delivered(202, 0.05)) == ("ok", None)


def test_a_round_trip_well_above_its_baseline_cuts() -> None:
    up = steady_after_a_cut()
    limit, now = up.limit, up.now
    before = limit.limit
    # one slow answer is noise
    limit.start(now)
    assert not limit.done(now + 0.3, now, "ok", 0.3)
    assert not limit.queueing
    # a stall of half a second stretches every call in flight, then passes
    for i in range(50):
        at = now + 1.0 + i * 0.01
        limit.start(at)
        assert not limit.done(at + 0.2, at, "ok", 0.2)
    now += 2.0
    for i in range(100):
        limit.start(now + i * 0.01)
        limit.done(now + i * 0.01 + RTT, now + i * 0.01, "ok", RTT)
    assert not limit.queueing and limit.limit >= before
    # answers that take four times as long, call after call, for seconds: a queue upstream
    cut_at = None
    for i in range(300):
        at = now + 2.0 + i * 0.01
        limit.start(at)
        if limit.done(at + 0.2, at, "ok", 0.2) and cut_at is None:
            cut_at = at + 0.2
    assert cut_at is not None and limit.limit < before
    assert cut_at - (now + 2.2) >= 1.0  # held for a second before it cut


def test_latency_guard_ignores_small_absolute_rises() -> None:
    # 1 ms to 3 ms triples the round trip, but 2 ms of queueing is no overload
    limit = Limit(max_concurrency=20)
    now = Upstream(limit, rtt=0.001).run(1.0).now
    for i in range(200):
        limit.start(now + i)
        assert not limit.done(now + i + 0.003, now + i, "ok", 0.003)
    assert limit.limit == 20


def test_an_outage_restarts_the_start_up_to_the_old_limit() -> None:
    up = steady_after_a_cut(cap=40)
    limit = up.limit
    assert limit.limit == 40
    limit.ceiling = CEILING
    # Accoil answers 503 for ten seconds: each of the circuit's probes cuts the limit
    for i in range(10):
        at = up.now + 3.0 + i
        limit.start(at)
        limit.done(at + 0.01, at, "overload", 0.01)
    assert limit.limit == 1 and limit.slow_start
    # back: doubling each round trip to where it was, then probing on from there
    up.now += 14.0
    up.run(0.5)
    assert limit.limit >= 40 and not limit.slow_start
    assert up.run(RECOVER).limit.limit > 40


# -- pause and caps ------------------------------------------------------------------------


def test_retry_after_pauses_every_start() -> None:
    limit = Limit()
    limit.pause(10.0, 2.0)
    assert limit.wait_time(10.0) == 2.0 and limit.paused_for(11.5) == 0.5
    limit.pause(10.5, 1.0)  # a shorter pause does not end the longer one
    assert limit.wait_time(11.0) == 1.0
    assert limit.wait_time(12.0) == 0
    limit.pause(0.0, 10 * MAX_RETRY_AFTER)
    assert limit.paused_for(0.0) == MAX_RETRY_AFTER


def test_rate_cap_allows_a_tenth_of_a_second_burst_then_spaces_calls() -> None:
    limit = Limit(rate_per_second=100.0, initial=50)
    assert len(fill(limit, 0.0)) == 10  # 100/s: 10 at once
    assert limit.wait_time(0.0) == pytest.approx(0.01)
    starts = 0
    now = 0.0
    while now < 1.0:
        wait = limit.wait_time(now)
        if wait == 0:
            limit.start(now)
            limit.done(now, now, "neutral", 0.0)
            starts += 1
        else:
            now += wait
    assert 100 <= 10 + starts <= 111  # the rate, plus the first burst


def test_pacing_spreads_a_round_trip_of_starts() -> None:
    up = Upstream(Limit(max_concurrency=20)).run(1.0)
    limit = up.limit
    now = up.now + 2.0
    limit.pause(up.now, 1.0)
    Upstream(limit).run(0.0)  # nothing: all answered
    while limit.in_flight:
        limit.cancel()
    # after the pause all 20 slots are free, but the starts spread over a round trip
    assert len(fill(limit, now)) <= 2
    assert 0 < limit.wait_time(now) < RTT / 10
    started = 0
    while now < up.now + 2.0 + RTT * 0.9:
        wait = limit.wait_time(now)
        if wait == 0:
            limit.start(now)
            started += 1
        else:
            now += wait
    assert 15 <= started <= 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"rate_per_second": 0.0}, "rate_per_second"),
        ({"rate_per_second": math.inf}, "rate_per_second"),
        ({"initial": 0}, "initial"),
    ],
)
def test_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limit(**kwargs)  # type: ignore[arg-type]


# -- against a rate-limited upstream, simulated ----------------------------------------------


@pytest.mark.parametrize("capacity", [100.0, 400.0, 2000.0])
def test_settles_near_an_unknown_capacity(capacity: float) -> None:
    seconds = 60.0
    up = Upstream(Limit(), capacity=capacity).run(seconds)
    needed = capacity * RTT * 1.025  # Little's law: calls in flight at the capacity
    late = [lim for t, lim in up.samples if t > 20.0]
    assert needed * 0.7 <= min(late) and max(late) <= needed * 1.5
    assert up.accepted / seconds >= 0.75 * capacity
    assert up.refused <= 0.05 * (up.accepted + up.refused)


# -- Limiter: the asyncio side -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_acquire_waits_for_a_slot_and_done_frees_it() -> None:
    clock = Clock()
    limiter = Limiter(Limit(initial=2), clock)
    first = await limiter.acquire()
    await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    clock.now += 0.05
    assert limiter.done(first, Delivered(202, 0.05)) is None
    assert await asyncio.wait_for(waiting, 1.0) == clock.now
    assert limiter.limit.in_flight == 2
    limiter.cancel()  # a slot taken, never used
    assert limiter.limit.in_flight == 1


async def test_acquire_waits_out_a_pause() -> None:
    clock = Clock()
    limiter = Limiter(Limit(), clock)
    limiter.pause(0.05)  # real seconds pass in this test; the fake clock stands still
    assert limiter.paused_for() == pytest.approx(0.05)
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.02)
    assert not waiting.done()
    clock.now += 0.05
    await asyncio.wait_for(waiting, 1.0)


async def test_done_reports_cuts_and_stats_count_them() -> None:
    clock = Clock()
    limiter = Limiter(Limit(max_concurrency=50, rate_per_second=300.0), clock)
    sent = await limiter.acquire()
    clock.now += 0.05
    assert limiter.done(sent, Delivered(202, 0.05)) is None
    sent = await limiter.acquire()
    clock.now += 0.01
    assert limiter.done(sent, Retry("rate_limited", 429, 1.0, 0.01)) == "rate_limited"
    sent = await limiter.acquire()
    clock.now += 0.01
    # sent after the cut: a 503 is a new overload
    assert limiter.done(sent, Retry("server_error", 503, None, 0.01)) == "unavailable"
    stats = limiter.stats()
    assert stats["answered_429"] == 1 and stats["answered_503"] == 1 and stats["timeouts"] == 0
    assert stats["cuts"] == {"rate_limited": 1, "unavailable": 1}
    assert stats["max_concurrency"] == 50 and stats["rate_per_second"] == 300.0
    assert stats["rtt_p50_ms"] is not None and stats["rtt_baseline_ms"] == 50.0
    assert stats["calls_per_s"] == pytest.approx(0.3)  # three calls in the last 10 s
    assert set(stats) >= {"limit", "in_flight", "slow_start", "paused_for_s", "rtt_p99_ms"}


# -- a gateway's share of the caps (many gateways on one Redis) ------------------------------

SHARES = (22 / 64, 21 / 64, 21 / 64)  # three gateways over 64 partitions


def test_shares_of_a_rate_cap_add_up_to_it() -> None:
    seconds, rate = 20.0, 90.0
    limits = [Limit(rate_per_second=rate) for _ in SHARES]
    for limit, share in zip(limits, SHARES, strict=True):
        limit.set_share(share)
    ups = [Upstream(limit).run(seconds) for limit in limits]
    for up, share in zip(ups, SHARES, strict=True):
        # each its share, give or take its burst (a tenth of a second's worth)
        assert up.accepted == pytest.approx(rate * share * seconds, abs=rate * share * 0.1 + 2)
    total = sum(up.accepted for up in ups)
    # together no faster than the one cap (with its one burst)
    assert rate * seconds * 0.97 <= total <= rate * seconds + rate * 0.1 + 1


def test_shares_of_a_concurrency_cap_stay_within_it() -> None:
    limits = [Limit(max_concurrency=30) for _ in SHARES]
    for limit, share in zip(limits, SHARES, strict=True):
        limit.set_share(share)
    seconds = 3.0
    ups = [Upstream(limit).run(seconds) for limit in limits]
    # 30 x 22/64 and 30 x 21/64, rounded down; each limit grew to its part and no further
    assert [limit.ceiling for limit in limits] == [10, 9, 9]
    assert [limit.limit for limit in limits] == [10, 9, 9]
    # Little's law: together they deliver what 28 calls in flight deliver, not 30 x 3
    total = sum(up.accepted for up in ups) / seconds
    assert total == pytest.approx(28 / (RTT * 1.025), rel=0.1)


def test_a_share_keeps_one_call_when_the_cap_is_smaller_than_the_gateways() -> None:
    limit = Limit(max_concurrency=2)
    limit.set_share(21 / 64)
    assert limit.ceiling == 1 and len(fill(limit, 0.0)) == 1


def test_a_lowered_share_lowers_the_limit_and_waits_for_calls_above_it() -> None:
    limit = Limit(max_concurrency=40)
    up = Upstream(limit).run(3.0)
    assert limit.limit == 40
    limit.set_share(0.25)  # a gateway joined the deployment: 16 of 64 partitions left
    assert limit.ceiling == 10 and limit.limit == 10
    # the calls already in flight end as they will; none starts while 10 or more are
    assert limit.in_flight > 10
    while limit.in_flight >= 10:
        assert limit.wait_time(up.now) == math.inf
        end, sent, _ = heapq.heappop(up.ends)
        up.now = end
        limit.done(end, sent, "ok", end - sent)
    up.run(3.0)
    assert limit.limit == 10 and limit.in_flight <= 10
    limit.set_share(1.0)  # back to the whole deployment: the ceiling, and growth, return
    assert limit.ceiling == 40
    up.run(15.0)
    assert limit.limit == 40


def test_no_share_starts_nothing_and_a_share_restores_the_rate() -> None:
    limit = Limit(rate_per_second=100.0)
    limit.set_share(0.0)
    assert limit.wait_time(0.0) == math.inf
    limit.set_share(0.5)
    assert limit.rate_per_second == 50.0
    assert len(fill(limit, 0.0)) == 5  # a tenth of a second's worth of 50 a second
    limit.set_share(1.0)
    assert limit.rate_per_second == 100.0


def test_a_share_without_caps_changes_nothing_but_the_stop_at_zero() -> None:
    limit = Limit()
    limit.set_share(1 / 64)
    assert limit.ceiling == CEILING and limit.rate_per_second is None
    assert len(fill(limit, 0.0)) == INITIAL


@pytest.mark.parametrize("share", [-0.1, 1.5, math.nan])
def test_bad_share(share: float) -> None:
    with pytest.raises(ValueError, match="share must be from 0 to 1"):
        Limit().set_share(share)


async def test_a_share_given_back_wakes_a_waiting_acquire() -> None:
    limiter = Limiter(Limit(max_concurrency=8), Clock())
    limiter.set_share(0.0)
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    limiter.set_share(0.5)
    await asyncio.wait_for(waiting, 1.0)
    stats = limiter.stats()
    assert stats["share"] == 0.5 and stats["max_concurrency"] == 8
