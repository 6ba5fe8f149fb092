"""Durable state behind one interface per role: inbox, actor state, outbox, dead letters."""

from gateway.store.base import (
    ActorState,
    Counts,
    DeadLetter,
    DeadLetters,
    Inbox,
    InboxRow,
    Known,
    Outbox,
    OutboxItem,
    Queued,
    Store,
    StoredLetter,
    Turn,
)
from gateway.store.sqlite import SqliteStore

__all__ = [
    "ActorState",
    "Counts",
    "DeadLetter",
    "DeadLetters",
    "Inbox",
    "InboxRow",
    "Known",
    "Outbox",
    "OutboxItem",
    "Queued",
    "SqliteStore",
    "Store",
    "StoredLetter",
    "Turn",
]
