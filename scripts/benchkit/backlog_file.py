"""The gateway's backlog counters, read from outside: in two-process mode the front and the
worker map one small file in the data folder (`gateway.backlog`), ingest counting the
messages it accepted and the pipeline those it applied. Reading it costs the gateway
nothing, where every `/admin/stats` makes the store count the whole outbox and ledger."""

from __future__ import annotations

from pathlib import Path

ACCEPTED, APPLIED = 0, 1  # gateway.backlog's slots: ingest's and the pipeline's counters


def backlog_counters(path: Path) -> tuple[int, int] | None:
    """(accepted, applied) so far; None without the file (inline mode keeps them in memory)."""
    try:
        raw = path.read_bytes()[:16]
    except OSError:
        return None
    if len(raw) < 16:
        return None
    return (int.from_bytes(raw[0:8], "little", signed=True),
            int.from_bytes(raw[8:16], "little", signed=True))
