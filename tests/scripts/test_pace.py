"""benchkit.pace: phase figures and convergence from journal times."""

from __future__ import annotations

from benchkit import pace


def ticks(start: float, end: float, per_second: float) -> list[float]:
    n = int((end - start) * per_second)
    return [start + i / per_second for i in range(n)]


def test_phase_figures() -> None:
    ok = ticks(0.0, 10.0, 90.0)
    limited = ticks(0.0, 10.0, 2.0)
    p = pace.phase(ok, limited, 0.0, 10.0, 100.0)
    assert (p["accepted"], p["answered_429"]) == (900, 20)
    assert p["accepted_per_s"] == 90.0 and p["vs_capacity"] == 0.9
    assert p["share_429"] == round(20 / 920, 4)
    assert p["converged_after_s"] == 1.0  # the first one-second window already holds


def test_convergence_waits_for_the_rate_and_for_few_429s() -> None:
    # 3 s at half the capacity, then 2 s at the capacity with many 429s, then clean
    ok = ticks(0.0, 3.0, 50.0) + ticks(3.0, 10.0, 100.0)
    limited = ticks(3.0, 5.0, 20.0)
    # [4.8, 5.8) holds 4 refusals among 104 calls: under 5%
    assert pace.converged_after(ok, limited, 0.0, 10.0, 100.0) == 5.8
    # [2.6, 3.6) holds 20 + 60 = 80 accepted calls: 0.8 x the capacity
    assert pace.converged_after(ok, [], 0.0, 10.0, 100.0) == 3.6
    assert pace.converged_after(ticks(0.0, 10.0, 50.0), [], 0.0, 10.0, 100.0) is None


def test_timeline_counts_each_second() -> None:
    ok = ticks(0.0, 3.0, 10.0)
    assert pace.timeline(ok, [1.5], 0.0, 3.0) == [(0.0, 10, 0), (1.0, 10, 1), (2.0, 10, 0)]
    assert pace.between(ok, 1.0, 2.0) == 10
