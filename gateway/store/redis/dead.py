"""Dead letters in Redis: per partition, one hash per part of a letter
(`scripts.DEAD_PARTS`: meta, body, repeat, last occurrence, replayed) and `groups`, the
open grouped letter of each (source, stage, reason) of that partition.

A letter's id names its partition (`partition.id_partition`), so admin on any gateway
lists, pages and replays letters across every partition. Grouping is per partition: a
reason repeated in several partitions is one letter in each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from gateway.store.base import DeadLetter, StoredLetter
from gateway.store.redis.ops import Ops, field, pack
from gateway.store.redis.partition import dead_key
from gateway.store.redis.state import SyncClient

# source, stage, reason, status, path, account, created_at, grouped
Meta = tuple[str, str, str, int | None, str | None, str | None, float, bool]
_unpack_meta = msgspec.msgpack.Decoder(Meta).decode


def letter_meta(letter: DeadLetter, now: float) -> bytes:
    return pack((letter.source, letter.stage, letter.reason, letter.status, letter.path,
                 letter.account, now, letter.grouped))


def unpack_meta(raw: Any) -> Meta:
    return _unpack_meta(raw)


def group_field(source: str, stage: str, reason: str) -> bytes:
    return field(source, stage, reason)


class DeadTurn:
    def __init__(self, client: SyncClient, ops: Ops, now: float) -> None:
        self.client = client
        self.ops = ops
        self.p = ops.partition
        self.now = now

    def add(self, letters: list[DeadLetter]) -> None:
        for d in letters:
            group = group_field(d.source, d.stage, d.reason) if d.grouped else b""
            self.ops.dead(letter_meta(d, self.now), d.payload, d.repeat, self.now, group)

    def open_groups(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], int]:
        wanted = list(keys)
        if not wanted:
            return {}
        ids = self.client.hmget(dead_key(self.p, "groups"), [group_field(*k) for k in wanted])
        return {k: int(i) for k, i in zip(wanted, ids, strict=True) if i is not None}  # type: ignore[arg-type]

    def join(self, occurrences: Mapping[int, int]) -> None:
        for letter, n in occurrences.items():
            self.ops.join(letter, n, self.now)


def letters_of(ids: list[int], parts: dict[str, list[Any]]) -> list[StoredLetter]:
    """Letters read back (the hashes' values for `ids`); those deleted meanwhile left out."""
    out: list[StoredLetter] = []
    for j, letter_id in enumerate(ids):
        meta = parts["meta"][j]
        if meta is None:
            continue
        source, stage, reason, status, path, account, created, _ = unpack_meta(meta)
        replayed = parts["replayed"][j]
        last = parts["last"][j]
        out.append(StoredLetter(
            id=letter_id, source=source, stage=stage, reason=reason,  # type: ignore[arg-type]
            payload=parts["body"][j] or b"", status=status, path=path,
            repeat=int(parts["n"][j] or 1), account=account, created_at=created,
            replayed_at=None if replayed is None else float(replayed),
            last_at=created if last is None else float(last),
        ))
    return out


LETTER_PARTS = ("meta", "body", "n", "last", "replayed")
