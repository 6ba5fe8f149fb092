"""A partition turn's reads as data: the commands of a read and how to read their replies.

A turn role (`state.StateTurn`, `outbox.OutboxTurn`, `dead.DeadTurn`) builds each of its
reads as a `Read`. Asked alone, a read is one round trip; fetched ahead (`RedisStore`, with
what the turn says it will read, `base.Wants`), the reads of every partition of a
dispatcher turn go in one round trip, and the roles serve the turn's reads from what came
back (`Cached`), going to Redis only for a key that was not asked ahead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from redis import Redis
from redis.cluster import RedisCluster as SyncCluster

from gateway.store.redis.wire import commands_sync

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

Command = tuple[str | bytes | int, ...]
SyncClient = Redis | SyncCluster


class Read(Generic[T]):
    """Commands, and what their replies (in order) say."""

    __slots__ = ("commands", "parse")

    def __init__(self, commands: list[Command], parse: Callable[[list[Any]], T]) -> None:
        self.commands = commands
        self.parse = parse


def nothing(default: T) -> Read[T]:
    """A read with nothing to ask (no keys): no command."""
    return Read([], lambda _: default)


def run(client: SyncClient, reads: Sequence[Read[Any]]) -> list[Any]:
    """Every read's commands in one round trip; each read's value, in order."""
    replies = commands_sync(client, [c for r in reads for c in r.commands])
    out: list[Any] = []
    at = 0
    for r in reads:
        n = len(r.commands)
        out.append(r.parse(replies[at : at + n]))
        at += n
    return out


class Cached(Generic[K, V]):
    """A read fetched ahead: the keys it asked, the values it found."""

    __slots__ = ("asked", "found", "_asked")

    def __init__(self, asked: list[K], found: dict[K, V]) -> None:
        self.asked = asked
        self.found = found
        self._asked: set[K] | None = None  # made only when a turn asks other keys

    def serve(self, keys: Sequence[K]) -> dict[K, V] | None:
        """The values found of `keys`; None when one of them was not asked ahead (the
        turn read more than it said: it reads it from Redis)."""
        found = self.found
        if keys == self.asked:  # the common case, compared in C: what it found
            return dict(found)
        if self._asked is None:
            self._asked = set(self.asked)
        if not self._asked.issuperset(keys):
            return None
        return {k: found[k] for k in keys if k in found}
