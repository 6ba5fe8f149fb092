"""The outbox in Redis: a partition's calls waiting to be forwarded, by its owner only.

Per partition, one hash per part of an item (`scripts.OUTBOX_PARTS`: meta, path, body,
repeat, version, attempts, last error; `keys` maps (source, call key) to the one unsent
item of that key) and per source a sorted set of item ids by when they are due. An item's
id names its partition (`partition.id_partition`).

A turn queues calls through `OutboxTurn` (ops of its commit script); the forwarder reads
the due items of the partitions this gateway owns (`due`), and its outcomes are fenced
scripts (`scripts.DELIVERED`, `RETRY`, `REJECT`): a gateway that lost a partition cannot
mark its calls delivered or send them again. It cannot take back a call already on the
wire (see SCALING.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import msgspec

from gateway.store.base import OutboxItem, Queued
from gateway.store.redis.ops import Ops, field, pack
from gateway.store.redis.partition import due_key, outbox_key
from gateway.store.redis.state import SyncClient

_unpack_meta = msgspec.msgpack.Decoder(tuple[str, str, str | None, str]).decode


def item_meta(source: str, key: str, account: str | None, kind: str) -> bytes:
    return pack((source, key, account, kind))


def unpack_meta(raw: Any) -> tuple[str, str, str | None, str]:
    """(source, key, account, kind) of an item."""
    return _unpack_meta(raw)


class OutboxTurn:
    def __init__(self, client: SyncClient, ops: Ops, now: float) -> None:
        self.client = client
        self.ops = ops
        self.p = ops.partition
        self.now = now

    def unsent(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        pairs = list(keys)
        if not pairs:
            return {}
        ids = self.client.hmget(outbox_key(self.p, "keys"), [field(s, k) for s, k in pairs])
        present = [(pair, i) for pair, i in zip(pairs, ids, strict=True) if i is not None]  # type: ignore[arg-type]
        if not present:
            return {}
        bodies = self.client.hmget(outbox_key(self.p, "body"), [i for _, i in present])
        return {
            pair: cast(bytes, body)
            for (pair, _), body in zip(present, bodies, strict=True)  # type: ignore[arg-type]
            if body is not None
        }

    def add(self, calls: list[Queued]) -> None:
        self._put(calls, replace=False)

    def replace(self, calls: list[Queued]) -> None:
        self._put(calls, replace=True)

    def _put(self, calls: list[Queued], *, replace: bool) -> None:
        for c in calls:
            self.ops.outbox(
                replace, due_key(self.p, c.source), field(c.source, c.key),
                item_meta(c.source, c.key, c.account, c.kind), c.path, c.body, c.repeat,
                self.now,
            )


def items_of(
    p: int, ids: list[bytes], scores: list[float], parts: dict[str, list[Any]]
) -> list[tuple[float, OutboxItem]]:
    """Items read back (the hashes' values for `ids`), with when each is due; those deleted
    meanwhile are left out."""
    out: list[tuple[float, OutboxItem]] = []
    for j, (raw_id, at) in enumerate(zip(ids, scores, strict=True)):
        meta, n = parts["meta"][j], parts["n"][j]
        if meta is None or n is None:
            continue
        source, key, _, kind = unpack_meta(meta)
        out.append((at, OutboxItem(
            id=int(raw_id), source=source, key=key, kind=kind,
            path=parts["path"][j].decode(), body=parts["body"][j], repeat=int(n),
            version=int(parts["v"][j] or 0), attempts=int(parts["a"][j] or 0),
        )))
    return out


ITEM_PARTS = ("meta", "path", "body", "n", "v", "a")
