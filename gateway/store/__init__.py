"""Durable state: the inbox, dedupe keys, the daily-count ledger, the outbox, dead letters."""

from gateway.store.base import (
    CallPut,
    Counts,
    DeadLetter,
    Flush,
    FlushResult,
    InboxRow,
    Known,
    OutboxItem,
    Store,
    StoredLetter,
    TrackHit,
)
from gateway.store.sqlite import SqliteStore

__all__ = [
    "CallPut",
    "Counts",
    "DeadLetter",
    "Flush",
    "FlushResult",
    "InboxRow",
    "Known",
    "OutboxItem",
    "SqliteStore",
    "Store",
    "StoredLetter",
    "TrackHit",
]
