"""A partition turn's writes, buffered for the one script that commits them (`scripts.COMMIT`).

Reads go straight to Redis while a turn runs (the partition's owner is its only writer, so
what it reads stays true until it commits); writes are collected here as ops, and the turn
commits them with the inbox cursor in one fenced script, or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from gateway.store.redis.scripts import (
    DEAD_ADD,
    DEAD_JOIN,
    HSET,
    OUTBOX_ADD,
    OUTBOX_REPLACE,
    SADD,
    ZADD_GT,
    fixed_keys,
)

CHUNK = 1000  # arguments of one command inside the script (Lua's stack is bounded)
OUTBOX_OP = 3 + 5 * 200  # an outbox op's length at most: its head and 200 calls

pack = msgspec.msgpack.encode  # fields and values Python reads back (Lua never does)


def field(*parts: Any) -> bytes:
    """A hash field naming several values (source, user, ...): unambiguous whatever they hold."""
    return pack(parts)


class Ops:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.keys = fixed_keys(partition)
        self._index = {k: i + 1 for i, k in enumerate(self.keys)}
        self.ops: list[list[Any]] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    def key(self, name: str) -> int:
        """The index (in KEYS) of a key the script is to change."""
        i = self._index.get(name)
        if i is None:
            self.keys.append(name)
            i = self._index[name] = len(self.keys)
        return i

    def sadd(self, key: str, members: Sequence[bytes | str]) -> None:
        k = self.key(key)
        for i in range(0, len(members), CHUNK):
            self.ops.append([SADD, k, *members[i : i + CHUNK]])

    def hset(self, key: str, pairs: Iterable[tuple[bytes | str, Any]]) -> None:
        k = self.key(key)
        flat: list[Any] = [x for pair in pairs for x in pair]
        for i in range(0, len(flat), CHUNK * 2):
            self.ops.append([HSET, k, *flat[i : i + CHUNK * 2]])

    def zadd_gt(self, key: str, score: float, member: str) -> None:
        self.ops.append([ZADD_GT, self.key(key), score, member])

    def outbox(
        self, replace: bool, due: str, slot: bytes, meta: bytes, path: str, body: bytes,
        repeat: int, now: float,
    ) -> None:
        """An upsert of a call; consecutive ones of a kind, due set and time share one op
        (its due key and time sent once, not once a call: fewer arguments to pack and for
        the script to read), applied in order."""
        code = OUTBOX_REPLACE if replace else OUTBOX_ADD
        due_at = self.key(due)
        last = self.ops[-1] if self.ops else None
        if (last is None or last[0] != code or last[1] != due_at or last[2] != now
                or len(last) >= OUTBOX_OP):
            last = [code, due_at, now]
            self.ops.append(last)
        last += (slot, meta, path, body, repeat)

    def dead(self, meta: bytes, body: bytes, repeat: int, now: float, group: bytes) -> None:
        self.ops.append([DEAD_ADD, meta, body, repeat, now, group])

    def join(self, letter: int, occurrences: int, now: float) -> None:
        self.ops.append([DEAD_JOIN, str(letter), occurrences, now])

    def args(self) -> list[Any]:
        """The ops as the script's arguments: each its code, its length and its values."""
        out: list[Any] = []
        for op in self.ops:
            out += [op[0], len(op) - 1, *op[1:]]
        return out
