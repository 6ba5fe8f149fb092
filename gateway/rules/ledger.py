"""The daily-count ledger and the track mode (DESIGN 4).

Track, page and screen calls are counted per (source, UTC day, userId, account, event).
The ledger keeps one row per key: how many occurrences, and the latest timestamp seen.
What goes upstream depends on the source's track mode: `exact` sends every new
occurrence, `daily-unique` one call per key and day. Calls drained from a row carry the
latest timestamp seen for its key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

from gateway.config import TrackMode
from gateway.keys import ledger_key

T = TypeVar("T")


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
    """Occurrences of one key: how many, and the latest call."""

    __slots__ = ("count", "timestamp", "path", "body")

    def __init__(self, timestamp: str, path: str, body: dict[str, Any], count: int = 1) -> None:
        self.count = count
        self.timestamp, self.path, self.body = timestamp, path, body

    def add(self, timestamp: str, path: str, body: dict[str, Any]) -> None:
        self.count += 1
        if timestamp >= self.timestamp:
            self.timestamp, self.path, self.body = timestamp, path, body


class Latest(Generic[T]):
    """Occurrences of one key as an actor takes them: how many, and the latest (by time; the
    later taken among equal times), whose call is built once, when the turn ends."""

    __slots__ = ("count", "at", "item")

    def __init__(self, at: datetime, item: T) -> None:
        self.count = 1
        self.at, self.item = at, item

    def add(self, at: datetime, item: T) -> None:
        self.count += 1
        if at >= self.at:
            self.at, self.item = at, item


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


def count(
    tallies: dict[LedgerKey, Tally], key: LedgerKey, timestamp: str, path: str,
    body: dict[str, Any],
) -> None:
    """One more occurrence of `key`."""
    t = tallies.get(key)
    if t is None:
        tallies[key] = Tally(timestamp, path, body)
    else:
        t.add(timestamp, path, body)


def discount(tallies: Mapping[LedgerKey, Tally], repeats: Iterable[LedgerKey]) -> dict[LedgerKey, Tally]:
    """`tallies` without occurrences that dedupe found to be repeats (a new dict; the
    tallies given are left as they are). A repeat's call may stay the latest: it was
    seen, when it first came."""
    out = dict(tallies)
    for key, n in Counter(repeats).items():
        t = tallies[key]
        if t.count > n:
            less = out[key] = Tally(t.timestamp, t.path, t.body)
            less.count = t.count - n
        else:
            del out[key]
    return out


def tally(hits: Iterable[Hit]) -> dict[LedgerKey, Tally]:
    tallies: dict[LedgerKey, Tally] = {}
    for hit in hits:
        count(tallies, *hit)
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
