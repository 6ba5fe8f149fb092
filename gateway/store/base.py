"""The store's interfaces, one per role: inbox, actor state, outbox, dead letters.

A store only stores and fetches; every rule (dedupe, ledger, trait merge, track mode) is
in `gateway.rules`. Each role has an async side, for the pipeline's loop, and a
transactional side (`Turn`): the dispatcher runs a whole turn (fetch, decide, write) as
one script inside one transaction, `Store.transact`, so that a turn's effects and its
progress through the inbox commit together. A backend on a distributed engine (Redis)
runs the same script shape: one Lua script per partition's turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from gateway.rules.dead_letters import DeadLetter as DeadLetter  # the store keeps it
from gateway.rules.dead_letters import Stage
from gateway.rules.ledger import LedgerKey, Row

T = TypeVar("T")


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
    partition: int = 0  # whose state its messages change (a partitioned store; SQLite has one)


class Queued(msgspec.Struct, array_like=True):
    """A call for the outbox."""

    source: str
    key: str  # `gateway.keys`: one unsent row per key
    account: str | None
    kind: str  # "identify" | "group" | "track"
    path: str
    body: bytes
    repeat: int = 1


class Known(msgspec.Struct, array_like=True):
    """The traits already queued for a key on a UTC day (for same-day suppression)."""

    source: str
    key: str
    day: str
    traits: dict[str, Any]


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


class PartitionLost(Exception):
    """A partitioned store's turn was refused: this gateway no longer owns the partition
    (or owns it under a new epoch). Not to be tried again: the new owner applies it."""

    def __init__(self, partition: int) -> None:
        super().__init__(f"partition {partition} is no longer this gateway's")
        self.partition = partition


class Counts(msgspec.Struct):
    inbox: int  # messages accepted and not yet applied by an actor
    outbox: int  # upstream calls waiting to be forwarded
    dead_letters: int
    ledger_rows: int
    ledger_events: int


# the transactional side of each role, as a turn's script sees it


class InboxTurn(Protocol):
    def applied(self, done: Mapping[int, int]) -> None:
        """Messages of inbox records (id -> how many) are applied."""


class StateTurn(Protocol):
    def remember(self, keys: list[bytes]) -> set[bytes]:
        """Store dedupe keys; those of them already stored within the window."""

    def ledger(self, keys: Iterable[LedgerKey]) -> dict[LedgerKey, Row]: ...

    def put_ledger(self, rows: list[Row]) -> None: ...

    def known(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Known]:
        """The traits stored for (source, key) pairs, with their day."""

    def put_known(self, rows: list[Known]) -> None: ...

    def put_accounts(self, rows: list[tuple[str, str, str]]) -> None:
        """(source, user, account): the account a group call put the user in."""


class OutboxTurn(Protocol):
    def unsent(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """The bodies of the queued calls of (source, key) pairs."""

    def add(self, calls: list[Queued]) -> None:
        """Queue `repeat` more occurrences of each call, the body replaced."""

    def replace(self, calls: list[Queued]) -> None:
        """Queue each call, replacing an unsent one of its key."""


class DeadTurn(Protocol):
    def add(self, letters: list[DeadLetter]) -> None: ...

    def open_groups(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], int]:
        """The id of the grouped letter, not replayed, of each (source, stage, reason)."""

    def join(self, occurrences: Mapping[int, int]) -> None:
        """More occurrences of grouped letters (id -> how many), last seen now."""


class Turn(Protocol):
    @property
    def now(self) -> float: ...

    @property
    def inbox(self) -> InboxTurn: ...

    @property
    def state(self) -> StateTurn: ...

    @property
    def outbox(self) -> OutboxTurn: ...

    @property
    def dead(self) -> DeadTurn: ...


# the async side of each role


class Inbox(Protocol):
    async def accept(self, source: str, received_at: float, body: bytes, count: int) -> int:
        """Make a request's body durable, `count` messages valid or not, as one inbox record;
        its id. Ids only grow, and are never reused."""
        ...

    async def restart_inbox(self) -> None:
        """Mark every inbox row as wholly unapplied again; called once before replaying it."""
        ...

    def take(self, row_id: int, count: int) -> asyncio.Future[None] | None:
        """The router takes an inbox row: `count` of its messages are now pending. Queued,
        not awaited; the future says whether it was recorded. A take and the flushes that
        complete the row's messages add up in any order (a refused take may be made again
        later), and a row is deleted (`reap`) only once its count is recorded as done.
        None: the store keeps no takes (a partitioned store's commits move its cursor)."""
        ...

    async def reap(self, taken: int) -> int:
        """Delete what of the inbox is wholly applied, up to record `taken`; how many
        pieces went."""
        ...

    async def inbox_after(self, cursor: int, limit: int) -> list[InboxRow]: ...


class ActorState(Protocol):
    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]: ...

    async def ledger(self, source: str | None, day: str | None) -> list[dict[str, Any]]: ...

    async def prune(self, before: float) -> int:
        """Forget dedupe keys, ledger rows and known traits older than `before`."""
        ...


class Outbox(Protocol):
    async def due(self, source: str, now: float, limit: int) -> list[OutboxItem]: ...

    async def delivered(self, item: OutboxItem) -> None: ...

    async def retry(self, item: OutboxItem, next_at: float, error: str) -> None: ...

    async def reject(self, item: OutboxItem, status: int, reason: str) -> None: ...

    async def next_due(self, source: str) -> float | None: ...


class DeadLetters(Protocol):
    async def dead_letters(
        self, source: str | None, after: int, limit: int, include_replayed: bool
    ) -> list[StoredLetter]: ...

    async def replayable(self, ids: list[int] | None, source: str | None) -> list[StoredLetter]:
        ...

    async def requeue(self, letters: Sequence[tuple[int, str | None]], now: float) -> int:
        """Mark dead letters replayed; a letter given a call kind goes back to the outbox
        as that kind of call."""
        ...

    async def prune_dead_letters(self, before: float) -> int:
        """Delete dead letters whose last occurrence is older than `before`, replayed or not."""
        ...


class Store(Inbox, ActorState, Outbox, DeadLetters, Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transact(
        self, script: Callable[[Turn], T], now: float | None = None, partition: int = 0
    ) -> Awaitable[T]:
        """Run `script` in one transaction: all of its writes commit, or none. `now`: the
        time its writes are stamped with (default: the clock). `partition`: the one whose
        state the script reads and writes (a partitioned store; SQLite has one)."""
        ...

    async def counts(self) -> Counts: ...

    async def checkpoint(self) -> None:
        """Move what the write-ahead log holds into the database, so that later writes reuse
        the log's space instead of growing it (a backend without one does nothing)."""
        ...
