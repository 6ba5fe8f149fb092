"""The store's interface: every piece of durable state the gateway keeps.

The interface is deliberately narrow and coarse: one call per request (`accept`), one per
actor flush (`flush`), one per upstream outcome. Each call is atomic, so a backend on a
distributed engine (Redis, planned) needs one transaction or script per method.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

import msgspec

Stage = Literal["ingest", "mapping", "forward"]
TrackMode = Literal["exact", "daily-unique"]


class DeadLetter(msgspec.Struct, kw_only=True):
    """Something that could not be taken or forwarded, kept with the reason."""

    source: str
    stage: Stage
    reason: str
    payload: bytes  # the message (ingest, mapping) or the call body (forward), as JSON
    status: int | None = None
    path: str | None = None
    # forward stage: how many occurrences of the call this stands for; grouped letters: how
    # many messages with this reason
    repeat: int = 1
    account: str | None = None
    # one letter per (source, stage, reason) while not replayed: for messages whose own
    # content is at fault (invalid, anonymous-only), which a browser can send without end
    grouped: bool = False
    # kept once per key: an inbox row routed again after a crash must not keep its invalid
    # messages twice
    key: str | None = None


class StoredLetter(msgspec.Struct, kw_only=True):
    id: int
    source: str
    stage: Stage
    reason: str
    payload: bytes
    status: int | None
    path: str | None
    repeat: int
    account: str | None
    created_at: float
    replayed_at: float | None
    last_at: float  # the latest occurrence (grouped letters); else created_at


class InboxRow(msgspec.Struct, array_like=True):
    id: int
    source: str
    received_at: float
    body: bytes
    count: int


class TrackHit(msgspec.Struct, array_like=True):
    """One occurrence of a counted call (track, page, screen), for the ledger."""

    message_id: str
    day: str  # UTC day of the call's timestamp, YYYY-MM-DD
    user_id: str
    event: str
    timestamp: str  # ISO 8601; the ledger keeps the latest per key
    path: str
    body: dict[str, Any]


class CallPut(msgspec.Struct, array_like=True):
    """An identify or group call to forward; replaces (merging traits) an unsent one of the same key."""

    key: str
    kind: str
    path: str
    body: dict[str, Any]


class Known(msgspec.Struct, array_like=True):
    """The traits already queued for a key on a UTC day (for same-day no-change suppression)."""

    key: str
    day: str
    traits: dict[str, Any]


class Flush(msgspec.Struct, kw_only=True):
    """Everything one actor commits at once."""

    source: str
    account: str
    track_mode: TrackMode
    tracks: list[TrackHit] = []
    calls: list[CallPut] = []
    seen: list[str] = []  # message ids of the other messages, for dedupe
    known: list[Known] = []
    accounts: list[tuple[str, str]] = []  # (user, account) from group calls
    dead: list[DeadLetter] = []
    inbox: dict[int, int] = {}  # inbox row id -> messages of it this flush completes
    now: float = 0.0


class FlushResult(msgspec.Struct):
    counted: int  # track occurrences new to the ledger
    duplicates: int  # messages whose id was seen before
    calls: int  # upstream calls this flush added to the outbox


class OutboxItem(msgspec.Struct, kw_only=True):
    id: int
    source: str
    key: str
    kind: str
    path: str
    body: bytes
    repeat: int
    version: int
    attempts: int


class Counts(msgspec.Struct):
    inbox: int  # messages accepted and not yet applied by an actor
    outbox: int  # upstream calls waiting to be forwarded
    dead_letters: int
    ledger_rows: int
    ledger_events: int


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # ingest
    async def accept(self, source: str, received_at: float, body: bytes, count: int) -> int:
        """Make a request's body durable, `count` messages valid or not, as one inbox record;
        its id. Ids only grow, and are never reused."""
        ...

    # router
    async def restart_inbox(self) -> None:
        """Mark every inbox row as wholly unapplied again; called once before replaying it."""
        ...

    def take(self, row_id: int, count: int) -> asyncio.Future[None]:
        """The router takes an inbox row: `count` of its messages are now pending. Queued,
        not awaited; the future says whether it was recorded. A take and the flushes that
        complete the row's messages add up in any order (a refused take may be made again
        later), and a row is deleted (`reap`) only once its count is recorded as done."""
        ...

    async def reap(self, taken: int) -> int:
        """Delete what of the inbox is wholly applied, up to record `taken` (the router has
        taken every record up to it since the start); how many pieces went."""
        ...

    async def inbox_after(self, cursor: int, limit: int) -> list[InboxRow]: ...

    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]: ...

    # actors
    async def known(self, source: str, keys: list[str], day: str) -> dict[str, dict[str, Any]]: ...

    async def flush(self, flush: Flush) -> FlushResult: ...

    # forwarder
    async def due(self, source: str, now: float, limit: int) -> list[OutboxItem]: ...

    async def delivered(self, item: OutboxItem) -> None: ...

    async def retry(self, item: OutboxItem, next_at: float, error: str) -> None: ...

    async def reject(self, item: OutboxItem, status: int, reason: str) -> None: ...

    async def next_due(self, source: str) -> float | None: ...

    # admin and housekeeping
    async def dead_letters(
        self, source: str | None, after: int, limit: int, include_replayed: bool
    ) -> list[StoredLetter]: ...

    async def replayable(self, ids: list[int] | None, source: str | None) -> list[StoredLetter]:
        ...

    async def requeue(self, ids: list[int], now: float) -> int: ...

    async def counts(self) -> Counts: ...

    async def ledger(self, source: str | None, day: str | None) -> list[dict[str, Any]]: ...

    async def prune(self, before: float) -> int: ...

    async def prune_dead_letters(self, before: float) -> int: ...

    async def checkpoint(self) -> None:
        """Move what the write-ahead log holds into the database, so that later writes reuse
        the log's space instead of growing it (a backend without one does nothing)."""
        ...
