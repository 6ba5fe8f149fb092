"""Percentiles, a plain-text progress line and tables: no dependencies."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TextIO


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max of latencies in seconds, in milliseconds."""
    ordered = sorted(values)

    def at(q: float) -> float | None:
        v = percentile(ordered, q)
        return None if v is None else round(v * 1000.0, 3)

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": at(100), "count": len(ordered)}


def table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
        )
        lines.append(line.rstrip())
        if header and n == 0:
            lines.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


class Progress:
    """One status line on stderr, redrawn in place on a terminal, every few seconds otherwise."""

    def __init__(self, total: float, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._last_plain = -math.inf

    def update(self, done: float, text: str) -> None:
        frac = 0.0 if self.total <= 0 else min(1.0, max(0.0, done / self.total))
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {frac * 100:5.1f}% {text}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif done - self._last_plain >= 5.0 or frac >= 1.0:
            self._last_plain = done
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
