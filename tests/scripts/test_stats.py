"""Percentiles, tables and the progress line."""

from __future__ import annotations

import io

from benchkit.stats import Progress, latency_ms, percentile, table


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(list(reversed(values)), 95) == 95.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def test_latency_in_milliseconds() -> None:
    lat = latency_ms([0.001] * 98 + [0.5, 1.0])
    assert lat == {"p50": 1.0, "p95": 1.0, "p99": 500.0, "max": 1000.0, "count": 100}


def test_table_aligns_columns() -> None:
    text = table([("a", 1234567, 0.5), ("long name", 3, None)], header=("name", "n", "x"))
    lines = text.splitlines()
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    assert "1,234,567" in lines[2] and "0.50" in lines[2]
    assert lines[3].endswith("-")  # None
    assert len({len(line) for line in lines[:3]}) == 1


def test_progress_off_a_terminal_prints_whole_lines_now_and_then() -> None:
    out = io.StringIO()
    p = Progress(10.0, stream=out)
    for t in range(11):
        p.update(float(t), f"t={t}")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[........................]   0.0% t=0",
        "[############............]  50.0% t=5",
        "[########################] 100.0% t=10",
    ]
