from __future__ import annotations

import pytest

from gateway.forward import Circuit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opened(threshold: int = 3, cooldown: float = 5.0) -> tuple[Circuit, Clock]:
    clock = Clock()
    c = Circuit(threshold, cooldown, clock)
    for _ in range(threshold):
        c.failure()
    assert c.state == "open"
    return c, clock


def test_starts_closed_and_allows() -> None:
    c = Circuit(3, 5.0, Clock())
    assert c.state == "closed"
    assert c.allow()
    assert c.wait_time() == 0.0


def test_opens_after_threshold_consecutive_failures() -> None:
    c = Circuit(3, 5.0, Clock())
    c.failure()
    c.failure()
    assert c.state == "closed" and c.allow()
    c.failure()
    assert c.state == "open"  # type: ignore[comparison-overlap]  # mypy keeps the narrowing
    assert not c.allow()


def test_success_resets_the_consecutive_count() -> None:
    c = Circuit(3, 5.0, Clock())
    c.failure()
    c.failure()
    c.success()
    c.failure()
    c.failure()
    assert c.state == "closed"
    c.failure()
    assert c.state == "open"  # type: ignore[comparison-overlap]  # mypy keeps the narrowing


def test_open_blocks_until_cooldown_then_one_probe() -> None:
    c, clock = opened()
    assert c.wait_time() == 5.0
    clock.now += 4.9
    assert not c.allow()
    assert c.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    assert c.state == "half-open"
    assert c.wait_time() == 0.0
    assert c.allow()  # the probe
    assert c.state == "half-open"
    assert not c.allow()  # only one
    assert not c.allow()
    assert c.wait_time() == pytest.approx(5.0)


def test_probe_success_closes() -> None:
    c, clock = opened()
    clock.now += 5.0
    assert c.allow()
    c.success()
    assert c.state == "closed"
    assert c.allow() and c.allow()
    assert c.cooldown == 5.0


def test_probe_failure_reopens_with_growing_capped_cooldown() -> None:
    c, clock = opened(cooldown=5.0)
    seen = []
    for _ in range(7):
        clock.now += c.cooldown
        assert c.allow()
        c.failure()
        assert c.state == "open"
        assert not c.allow()
        seen.append(c.cooldown)
        assert c.wait_time() == c.cooldown
    assert seen == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]
    clock.now += 60.0
    assert c.allow()
    c.success()
    assert c.cooldown == 5.0  # back to base once closed
    # and it takes a full threshold of failures to open again
    c.failure()
    c.failure()
    assert c.state == "closed"


def test_max_cooldown_is_configurable_but_never_below_base() -> None:
    c = Circuit(1, 5.0, Clock(), max_cooldown=8.0)
    assert c.max_cooldown == 8.0
    assert Circuit(1, 90.0, Clock()).max_cooldown == 90.0


def test_failures_while_open_do_not_push_the_probe_back() -> None:
    c, clock = opened()
    clock.now += 3.0
    c.failure()  # a call sent before the circuit opened
    c.failure()
    clock.now += 2.0
    assert c.allow()


def test_late_success_while_open_closes() -> None:
    c, _ = opened()
    c.success()
    assert c.state == "closed" and c.allow()


def test_lost_probe_does_not_wedge_the_circuit() -> None:
    c, clock = opened()
    clock.now += 5.0
    assert c.allow()  # probe taken, never reported
    clock.now += 4.0
    assert not c.allow()
    clock.now += 1.0
    assert c.allow()  # a new probe after another cooldown


def test_threshold_one() -> None:
    c = Circuit(1, 1.0, Clock())
    c.failure()
    assert c.state == "open"


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid(threshold: int, cooldown: float) -> None:
    with pytest.raises(ValueError):
        Circuit(threshold, cooldown)


def test_default_clock_is_monotonic() -> None:
    c = Circuit(1, 0.01)
    c.failure()
    assert not c.allow()
    assert 0.0 < c.wait_time() <= 0.01
