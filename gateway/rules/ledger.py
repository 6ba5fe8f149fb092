"""The daily-count ledger and the track mode (DESIGN 4).

Track, page and screen calls are counted per (source, UTC day, userId, account, event).
The ledger keeps one row per key: how many occurrences, and the latest timestamp seen.
What goes upstream depends on the source's track mode: `exact` sends every new
occurrence, `daily-unique` one call per key and day. Calls drained from a row carry the
latest timestamp seen for its key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from gateway.config import TrackMode
from gateway.keys import ledger_key


class LedgerKey(NamedTuple):
    source: str
    day: str  # UTC day of the call's timestamp, YYYY-MM-DD
    user: str
    account: str
    event: str


class Hit(NamedTuple):
    """One occurrence of a counted call."""

    key: LedgerKey
    timestamp: str  # ISO 8601 UTC, as the call's body carries it
    path: str
    body: dict[str, Any]


class Tally:
    """A turn's occurrences of one key: how many, and the latest call."""

    __slots__ = ("count", "timestamp", "path", "body")

    def __init__(self, hit: Hit) -> None:
        self.count = 1
        self.timestamp, self.path, self.body = hit.timestamp, hit.path, hit.body

    def add(self, hit: Hit) -> None:
        self.count += 1
        if hit.timestamp >= self.timestamp:
            self.timestamp, self.path, self.body = hit.timestamp, hit.path, hit.body


class Row(NamedTuple):
    """A ledger row as stored."""

    key: LedgerKey
    events: int
    last_ts: str


class Send(NamedTuple):
    """Occurrences of a counted call to queue: `repeat` more of the call `body`."""

    source: str
    key: str  # the outbox key: one queued row per ledger row
    account: str
    path: str
    body: dict[str, Any]
    repeat: int


def tally(hits: Iterable[Hit]) -> dict[LedgerKey, Tally]:
    tallies: dict[LedgerKey, Tally] = {}
    for hit in hits:
        t = tallies.get(hit.key)
        if t is None:
            tallies[hit.key] = Tally(hit)
        else:
            t.add(hit)
    return tallies


def settle(
    tallies: Mapping[LedgerKey, Tally],
    stored: Mapping[LedgerKey, Row],
    modes: Mapping[str, TrackMode],
) -> tuple[list[Row], list[Send]]:
    """The rows to store and the calls to queue for a turn's new occurrences."""
    rows: list[Row] = []
    sends: list[Send] = []
    for key, t in tallies.items():
        before = stored.get(key)
        ts, body = t.timestamp, t.body
        if before is not None and before.last_ts > ts:
            ts = before.last_ts
            body = {**body, "timestamp": ts}
        rows.append(Row(key, t.count + (before.events if before is not None else 0), ts))
        repeat = t.count if modes.get(key.source, "exact") == "exact" else int(before is None)
        if repeat:
            outbox = ledger_key(key.day, key.user, key.account, key.event)
            sends.append(Send(key.source, outbox, key.account, t.path, body, repeat))
    return rows, sends
