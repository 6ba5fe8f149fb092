from __future__ import annotations

import random
import statistics

import pytest

from gateway.forward import MAX_RETRY_AFTER, delay


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5])
def test_full_jitter_bounds_and_spread(attempt: int) -> None:
    rng = random.Random(1)
    window = 0.5 * 2**attempt
    samples = [delay(attempt, 0.5, 60.0, None, rng) for _ in range(4000)]
    assert all(0.0 <= s <= window for s in samples)
    # Full jitter: uniform over the whole window, not a narrow band near its top.
    assert min(samples) < 0.05 * window
    assert max(samples) > 0.95 * window
    assert statistics.fmean(samples) == pytest.approx(window / 2, rel=0.05)


def test_cap_bounds_the_window() -> None:
    rng = random.Random(2)
    samples = [delay(20, 0.5, 10.0, None, rng) for _ in range(2000)]
    assert all(0.0 <= s <= 10.0 for s in samples)
    assert max(samples) > 9.5


def test_huge_attempt_does_not_overflow() -> None:
    rng = random.Random(3)
    assert 0.0 <= delay(10_000, 0.5, 60.0, None, rng) <= 60.0


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(4)
    samples = [delay(0, 0.5, 60.0, 7.0, rng) for _ in range(500)]
    assert all(s == 7.0 for s in samples)  # window is 0.5 s, so the floor always wins
    # A jittered draw above Retry-After is kept.
    samples = [delay(6, 0.5, 60.0, 2.0, rng) for _ in range(500)]
    assert all(s >= 2.0 for s in samples)
    assert max(samples) > 20.0


def test_retry_after_may_exceed_cap_but_not_max_retry_after() -> None:
    rng = random.Random(5)
    assert delay(0, 0.5, 60.0, 120.0, rng) == 120.0
    assert delay(0, 0.5, 60.0, 86_400.0, rng) == MAX_RETRY_AFTER == 3600.0


@pytest.mark.parametrize("retry_after", [None, 0.0, -1.0])
def test_no_or_non_positive_retry_after_changes_nothing(retry_after: float | None) -> None:
    a = [delay(3, 0.5, 60.0, retry_after, random.Random(6)) for _ in range(5)]
    b = [delay(3, 0.5, 60.0, None, random.Random(6)) for _ in range(5)]
    assert a == b


def test_deterministic_with_seeded_rng() -> None:
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [delay(a, 0.5, 60.0, None, rng) for a in range(10)]

    assert run(42) == run(42)
    assert run(42) != run(43)


@pytest.mark.parametrize(
    ("attempt", "base", "cap"), [(-1, 0.5, 60.0), (0, 0.0, 60.0), (0, 0.5, 0.0), (0, -1.0, 1.0)]
)
def test_invalid_arguments(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        delay(attempt, base, cap, None, random.Random(0))
