"""Actor state in Redis: dedupe keys, the ledger, known traits, user -> account links.

All of a user's state is in the user's partition (`partition.py`). The turn's side
(`StateTurn`) reads straight from Redis with the sync client (the turn runs in a thread)
and buffers its writes as ops; the async side serves the router (`accounts_of`), admin
(`ledger_rows`) and housekeeping (`prune`).

- Dedupe: one set per (partition, UTC day the keys were stored), 16-byte members; a
  lookup asks every day of the window (and tomorrow: another gateway's clock may be
  ahead) in one round trip; pruning deletes whole days.
- Ledger: per (partition, day of the event) a hash of counts and one of latest
  timestamps, fields packed (source, user, account, event); a sorted set of the days,
  scored by the last write of a row of that day, so pruning drops days no longer written.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec
from redis import Redis
from redis.cluster import RedisCluster as SyncCluster

from gateway.rules.ledger import LedgerKey, Row
from gateway.store.base import Known
from gateway.store.redis.ops import Ops, field, pack
from gateway.store.redis.partition import (
    accounts_key,
    dedupe_day_key,
    dedupe_days_key,
    known_key,
    ledger_counts_key,
    ledger_days_key,
    ledger_stamps_key,
)
from gateway.store.redis.wire import commands_sync

SyncClient = Redis | SyncCluster

_unpack_known = msgspec.msgpack.Decoder(tuple[str, bytes]).decode
_decode_traits = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.encode
_unpack_ledger = msgspec.msgpack.Decoder(tuple[str, str, str, str]).decode


def day_of(at: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(at))


def window_days(now: float, window: float) -> list[str]:
    """The days whose dedupe sets a lookup at `now` asks: the window's, and tomorrow."""
    days = []
    at = now - window - 86400
    while at <= now + 86400:
        days.append(day_of(at))
        at += 86400
    return sorted(set(days))


class StateTurn:
    def __init__(
        self, client: SyncClient, ops: Ops, now: float, window: float, days: set[str]
    ) -> None:
        """`days`: the days that have a dedupe set in this partition (its owner knows them:
        it is their only writer), so that a lookup asks only those."""
        self.client = client
        self.ops = ops
        self.p = ops.partition
        self.now = now
        self.window = window
        self.days = days
        self.new_day: str | None = None  # a day this turn gives a dedupe set

    def remember(self, keys: list[bytes]) -> set[bytes]:
        if not keys:
            return set()
        found: set[bytes] = set()
        today = day_of(self.now)
        # today's set even when not known: a turn redone after a commit whose reply was lost
        # does not know whether that commit began it
        asked = [d for d in window_days(self.now, self.window) if d in self.days or d == today]
        if asked:
            for hits in commands_sync(self.client, [
                    ("SMISMEMBER", dedupe_day_key(self.p, day), *keys) for day in asked]):
                found.update(k for k, hit in zip(keys, hits, strict=True) if hit)
        new = [k for k in dict.fromkeys(keys) if k not in found]
        if new:
            self.ops.sadd(dedupe_day_key(self.p, today), new)
            if today not in self.days:
                self.ops.sadd(dedupe_days_key(self.p), [today])
                self.new_day = today
        return found

    def ledger(self, keys: Iterable[LedgerKey]) -> dict[LedgerKey, Row]:
        by_day: dict[str, list[LedgerKey]] = {}
        for key in keys:
            by_day.setdefault(key.day, []).append(key)
        if not by_day:
            return {}
        commands: list[tuple[str | bytes | int, ...]] = []
        for day, ks in by_day.items():
            fields = [_ledger_field(k) for k in ks]
            commands.append(("HMGET", ledger_counts_key(self.p, day), *fields))
            commands.append(("HMGET", ledger_stamps_key(self.p, day), *fields))
        replies = commands_sync(self.client, commands)
        found: dict[LedgerKey, Row] = {}
        for i, ks in enumerate(by_day.values()):
            counts, stamps = replies[2 * i], replies[2 * i + 1]
            for key, n, ts in zip(ks, counts, stamps, strict=True):
                if n is not None:
                    found[key] = Row(key, int(n), ts.decode() if ts is not None else "")
        return found

    def put_ledger(self, rows: list[Row]) -> None:
        by_day: dict[str, list[Row]] = {}
        for row in rows:
            by_day.setdefault(row.key.day, []).append(row)
        for day, rs in by_day.items():
            fields = [_ledger_field(r.key) for r in rs]  # (a msgpack encode each: once)
            self.ops.hset(ledger_counts_key(self.p, day),
                          zip(fields, [r.events for r in rs], strict=True))
            self.ops.hset(ledger_stamps_key(self.p, day),
                          zip(fields, [r.last_ts for r in rs], strict=True))
            self.ops.zadd_gt(ledger_days_key(self.p), self.now, day)

    def known(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Known]:
        pairs = list(keys)
        if not pairs:
            return {}
        (values,) = commands_sync(
            self.client, [("HMGET", known_key(self.p), *(field(s, k) for s, k in pairs))])
        found: dict[tuple[str, str], Known] = {}
        for (source, key), value in zip(pairs, values, strict=True):
            if value is not None:
                day, traits = known_value(value)
                found[(source, key)] = Known(source, key, day, _decode_traits(traits))
        return found

    def put_known(self, rows: list[Known]) -> None:
        if rows:
            self.ops.hset(known_key(self.p), [
                (field(k.source, k.key), pack((k.day, _encode(k.traits)))) for k in rows])

    def put_accounts(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            self.ops.hset(accounts_key(self.p), [(field(s, u), a) for s, u, a in rows])


def _ledger_field(key: LedgerKey) -> bytes:
    return field(key.source, key.user, key.account, key.event)


def ledger_key_of(raw: bytes, day: str) -> LedgerKey:
    source, user, account, event = _unpack_ledger(raw)
    return LedgerKey(source, day, user, account, event)


def known_value(value: Any) -> tuple[str, bytes]:
    """(day, traits as JSON) of a known-traits field."""
    return _unpack_known(value)


def known_day(value: Any) -> str:
    return _unpack_known(value)[0]
