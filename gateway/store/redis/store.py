"""The Redis store: every role of `gateway.store.base` on one Redis or Redis Cluster.

Two uses, as the SQLite store has: the front (ingest and admin: `apply=False`) and the
pipeline (`apply=True`), which also holds this gateway's share of the partitions
(`Leases`), reads the inbox streams of the partitions it owns, commits turns and forwards
their outboxes.

- A turn is per partition (`transact(script, partition=p)`): the script (the same
  `gateway.actors.turn.commit` as in SQLite mode) runs in a thread on a sync client; its
  reads go straight to Redis, its writes are buffered (`ops.Ops`) and commit with the
  partition's inbox cursor in one fenced script (`scripts.COMMIT`). A refused fence raises
  `PartitionLost`: the dispatcher drops that turn, and the new owner applies those entries
  from the committed cursor (dedupe drops what was applied).
- The cursor moves only past entries every message of which is committed, in order (an
  entry whose routing failed holds it, as an unfinished record holds an inbox segment in
  SQLite mode); the commit trims the stream up to it.
- Inbox row ids are the stream entry ids with the partition (`row_id`), stable across
  restarts: the ids the router makes from them (for messages without a messageId, for
  rejected messages' letters) are the same when an entry is read again. An entry is one
  row, whatever number of requests' parts (records) it holds: its records are routed
  together, into one partition's turn, so the cursor never passes a record not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import structlog
from redis import Redis
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.cluster import RedisCluster as SyncCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import Settings
from gateway.keys import replay_key
from gateway.loader import shown_url
from gateway.store.base import Counts, InboxRow, OutboxItem, PartitionLost, StoredLetter, Turn
from gateway.store.redis.connect import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    Client,
    PartitionCountMismatch,
    RedisUnavailable,
    claim_partitions,
    connect,
)
from gateway.store.redis.dead import LETTER_PARTS, DeadTurn, group_field, letter_meta, letters_of
from gateway.store.redis.dead import unpack_meta as letter_fields
from gateway.store.redis.inbox import START, RedisInbox, entry_records, flat
from gateway.store.redis.lease import Leases
from gateway.store.redis.metrics import RedisMetrics
from gateway.store.redis.ops import Ops, field
from gateway.store.redis.outbox import ITEM_PARTS, OutboxTurn, item_meta, items_of, unpack_meta
from gateway.store.redis.partition import (
    ID_BITS,
    accounts_key,
    dead_key,
    dedupe_day_key,
    dedupe_days_key,
    due_key,
    id_partition,
    inbox_key,
    known_key,
    ledger_counts_key,
    ledger_days_key,
    ledger_stamps_key,
    once_key,
    outbox_key,
    partition_of,
    progress_key,
)
from gateway.store.redis.scripts import (
    COMMIT,
    COUNTS,
    DELIVERED,
    REJECT,
    REQUEUE,
    RETRY,
    fixed_keys,
)
from gateway.store.redis.state import StateTurn, SyncClient, day_of, known_day
from gateway.store.redis.state import ledger_key_of as ledger_key_from
from gateway.store.redis.wire import SyncScript, commands, exchange, pack, text
from gateway.tasks import stop_tasks

log = structlog.get_logger("gateway.store.redis")

T = TypeVar("T")
READ = 256  # inbox entries read ahead, over all owned partitions
CONNECT_RETRY = 1.0  # seconds between tries to reach Redis at start
THREADS = 4  # partition turns committed at once
UNANSWERED = 0.5  # seconds a pipeline loop waits after a read Redis did not answer


def row_id(partition: int, entry: str | bytes) -> int:
    """An inbox row's id: its stream entry id (as text, or as a reply's bytes) and its
    partition, in one int that grows with the entry id within a partition."""
    ms, _, seq = (entry.encode() if isinstance(entry, str) else entry).partition(b"-")
    return (((int(ms) << 20) | int(seq)) << ID_BITS) | partition


def entry_of(row: int) -> str:
    high = row >> ID_BITS
    return f"{high >> 20}-{high & ((1 << 20) - 1)}"


class _Reading:
    """An owned partition, as the pipeline reads it under one epoch."""

    def __init__(self, epoch: int, after: str, days: set[str]) -> None:
        self.epoch = epoch
        self.after = after  # the last entry read
        self.days = days  # the days with a dedupe set (this owner is their only writer)
        # rows read, not yet committed, in order, with their messages (a commit's count of
        # what leaves the stream)
        self.handed: deque[tuple[int, int]] = deque()
        self.done: set[int] = set()  # rows of `handed` committed (an earlier one is not)
        # an entry this version cannot read (`_read_ahead`): the partition is read no
        # further under this ownership
        self.unreadable: str | None = None


class _Applied:
    """A turn's inbox side: the rows it applied (their entries move the cursor)."""

    def __init__(self) -> None:
        self.rows: set[int] = set()

    def applied(self, done: Any) -> None:
        self.rows.update(done)


class _Turn:
    """One partition's turn: every role's transactional side."""

    def __init__(
        self, client: SyncClient, ops: Ops, now: float, window: float, days: set[str]
    ) -> None:
        self.now = now
        self.state = StateTurn(client, ops, now, window, days)
        self.outbox = OutboxTurn(client, ops, now)
        self.dead = DeadTurn(client, ops, now)
        # not the turn itself: a reference cycle would keep each turn's ops (every value
        # it wrote) until the garbage collector's rare full passes, growing with the burst
        self.inbox = _Applied()

    @property
    def rows(self) -> set[int]:
        return self.inbox.rows


class RedisStore:
    def __init__(
        self, settings: Settings, *, apply: bool, metrics: RedisMetrics | None = None
    ) -> None:
        assert settings.redis_url is not None
        self.url = settings.redis_url
        self.partitions = settings.partitions
        self.window = settings.dedupe_window
        self.wait_replicas = settings.redis_wait_replicas
        self.apply = apply
        self.metrics = metrics
        self.client: Client | None = None
        self.sync: SyncClient | None = None
        self.inbox: RedisInbox | None = None
        self.leases: Leases | None = None
        self._reading: dict[int, _Reading] = {}
        self._buffer: deque[tuple[InboxRow, _Reading]] = deque()
        self._next: asyncio.Task[None] | None = None  # the read sent ahead, in flight
        self._backlog = False  # the last read found many entries: more are waiting
        self._pool: ThreadPoolExecutor | None = None
        self._owning: asyncio.Task[None] | None = None
        self._scripts: dict[str, Any] = {}
        self._sync_commit: Any = None
        self._once = secrets.token_hex(8) + ":"  # (`_token`)
        self._runs = itertools.count()
        self.reachable = False  # the last command to Redis got an answer
        self._failing = False  # the pipeline's reads are failing
        self._probe: asyncio.Task[None] | None = None
        # told when this gateway's partitions changed: what it remembers of them may be stale
        self.on_owner_change: Callable[[], None] | None = None

    # -- opening -----------------------------------------------------------------------------

    async def open(self) -> None:
        told = False
        while True:
            try:
                self.client = await connect(self.url)
                await claim_partitions(self.client, self.partitions)
                break
            except RedisUnavailable as exc:
                if self.client is not None:
                    with contextlib.suppress(Exception):
                        await self.client.aclose()
                    self.client = None
                if not told:
                    log.warning("Redis unreachable; retrying until it answers", error=str(exc),
                                every_s=CONNECT_RETRY)
                    told = True
                await asyncio.sleep(CONNECT_RETRY)
            except PartitionCountMismatch:
                if self.client is not None:
                    await self.client.aclose()
                raise
        if told:
            log.info("Redis reached", url=shown_url(self.url))
        self.reachable = True
        client = self.client
        self.inbox = RedisInbox(client, self.partitions, wait_replicas=self.wait_replicas)
        for name, lua in (("delivered", DELIVERED), ("retry", RETRY), ("reject", REJECT),
                           ("requeue", REQUEUE), ("counts", COUNTS)):
            self._scripts[name] = client.register_script(lua)
        self._probe = asyncio.create_task(self._probing(), name="redis-probe")
        if not self.apply:
            return
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT,
        }
        if isinstance(client, AsyncCluster):
            self.sync = SyncCluster.from_url(self.url, **options)
        else:
            self.sync = Redis.from_url(self.url, **options)
        self._sync_commit = SyncScript(COMMIT)
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="redis-turn")
        self.leases = Leases(client, self.partitions, metrics=self.metrics)
        self._owning = asyncio.create_task(self._own(), name="leases")

    async def close(self) -> None:
        # each loop talks to Redis: a cancellation may be lost in redis-py (`gateway.tasks`)
        await stop_tasks((self._owning, self._probe, self._next))
        self._owning = self._probe = self._next = None
        if self.leases is not None:
            await self.leases.stop()
            self._reading.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _c(self) -> Client:
        assert self.client is not None, "store is not open"
        return self.client

    async def _probing(self) -> None:
        """Keep `reachable` true to what Redis answers (readiness says not ready without it)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._c().ping()
                if not self.reachable:
                    log.info("Redis reachable again", url=shown_url(self.url))
                self.reachable = True
            except (RedisError, OSError) as exc:
                if self.reachable:
                    log.warning("Redis unreachable", url=shown_url(self.url), error=str(exc))
                self.reachable = False

    # -- ownership ---------------------------------------------------------------------------

    async def _own(self) -> None:
        leases = self.leases
        assert leases is not None
        while True:
            try:
                await leases.tick()
                await self._follow(dict(leases.owned))
            except (RedisError, OSError) as exc:
                log.warning("lease round failed; retrying", error=str(exc))
            await asyncio.sleep(leases.ttl / 3)

    async def _follow(self, owned: dict[int, int]) -> None:
        """Read the partitions owned from their committed cursors; forget the others."""
        changed = False
        for p in list(self._reading):
            if owned.get(p) != self._reading[p].epoch:
                del self._reading[p]
                changed = True
        fresh = [p for p in owned if p not in self._reading]
        if fresh:
            pipe = self._c().pipeline(transaction=False)
            for p in fresh:
                pipe.get(progress_key(p))
                pipe.smembers(dedupe_days_key(p))
            replies = await pipe.execute()
            for i, p in enumerate(fresh):
                cursor, days = replies[2 * i], replies[2 * i + 1]
                self._reading[p] = _Reading(
                    owned[p], text(cursor) if cursor else START, {text(d) for d in days})
            changed = True
        if changed and self.on_owner_change is not None:
            self.on_owner_change()
        if self.metrics is not None and self.inbox is not None:
            self.metrics.set_lag(await self.inbox.lag(sorted(owned)))

    def _owned(self) -> list[int]:
        leases = self.leases
        if leases is None:
            return []
        # a partition being handed over gets no new reads, turns or sends (`Leases.leaving`)
        return [p for p, r in self._reading.items()
                if leases.holds(p) == r.epoch and p not in leases.leaving]

    # -- ingest -------------------------------------------------------------------------------

    async def accept(self, source: str, received_at: float, body: bytes, count: int) -> int:
        assert self.inbox is not None, "store is not open"
        return await self.inbox.accept(source, received_at, body, count)

    # -- the router and the dispatcher ------------------------------------------------------------

    async def restart_inbox(self) -> None:
        """Nothing to reset: an owned partition is read from its committed cursor."""

    def take(self, row_id: int, count: int) -> None:
        return None  # progress is the cursor, moved by the turn's commit

    async def reap(self, taken: int) -> int:
        return 0  # each commit trims what it applied

    async def _answered(self, what: str, read: Callable[[], Awaitable[T]], otherwise: T) -> T:
        """`read()`, or `otherwise` while Redis does not answer: the pipeline's loops wait
        for it rather than die (one line when it goes, one when it is back)."""
        try:
            value = await read()
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("Redis read failed; waiting for Redis", read=what, error=str(exc))
                self._failing = True
            await asyncio.sleep(UNANSWERED)
            return otherwise
        if self._failing:
            log.info("Redis reads answered again")
            self._failing = False
        return value

    async def inbox_after(self, cursor: int, limit: int) -> list[InboxRow]:
        rows: list[InboxRow] = []
        while True:
            if self._next is not None and (not self._buffer or self._next.done()):
                next_read, self._next = self._next, None
                await next_read
            if not self._buffer and not rows:
                await self._answered("inbox", self._read_ahead, None)
            while self._buffer and len(rows) < limit:
                row, reading = self._buffer.popleft()
                if self._reading.get(row.partition) is not reading:
                    continue  # read under an ownership since lost
                reading.handed.append((row.id, row.count))
                rows.append(row)
            # the buffer ran out with the next read on the wire: top up from it, so that a
            # short answer means the streams had no more (the dispatcher lets a turn fill
            # while the inbox has more ready, `Dispatcher._due`)
            if len(rows) >= limit or self._next is None:
                break
        if self._backlog and self._buffer and self._next is None:
            # a backlog: send the next read now, so that Redis answers it while these rows
            # are routed (one read in flight at a time: each starts after the entries the
            # one before it read, `_Reading.after`). Not while entries trickle in: reads
            # back to back would each bring a few
            self._next = asyncio.create_task(
                self._answered("inbox", self._read_ahead, None), name="inbox-read")
            await asyncio.sleep(0)  # the task's first step: the read is on the wire
        return rows

    async def _read_ahead(self) -> None:
        owned = [p for p in self._owned() if self._reading[p].unreadable is None]
        if not owned:
            self._backlog = False
            return
        each = max(1, READ // len(owned))
        readings = [self._reading[p] for p in owned]
        client = self._c()
        found: list[tuple[int, _Reading, list[Any]]]
        if isinstance(client, AsyncCluster):
            # a multi-stream XREAD needs its keys in one slot: one XRANGE per partition
            pipe = client.pipeline(transaction=False)
            for p, r in zip(owned, readings, strict=True):
                pipe.xrange(inbox_key(p), min="-" if r.after == START else f"({r.after}",
                            count=each)
            found = [
                (p, r, [(i, flat(f)) for i, f in entries])
                for p, r, entries in zip(owned, readings, await pipe.execute(), strict=True)
            ]
        else:
            # one node: one XREAD over every owned stream (after each one's last entry read,
            # exclusive; START reads from the first), answering only the streams with
            # entries, its reply read raw (`wire`: a map under RESP3, pairs under RESP2)
            keys = [inbox_key(p) for p in owned]
            reply = (await exchange(client, pack((
                "XREAD", "COUNT", each, "STREAMS", *keys, *(r.after for r in readings))), 1))[0]
            at = {k.encode(): i for i, k in enumerate(keys)}
            found = []
            for key, entries in (reply.items() if isinstance(reply, dict) else reply or ()):
                i = at[key]
                found.append((owned[i], readings[i], entries))
        read = sum(len(entries) for _, _, entries in found)
        self._backlog = read >= READ // 2
        if self.metrics is not None and read:
            self.metrics.reads.inc()
            self.metrics.entries.inc(read)
        # per entry, on the pipeline's loop (an entry is a group of requests' parts that fell
        # in one partition, or one part of an older version's): each source's name decoded
        # once a read, the id parsed from bytes (only a partition's last entry read is kept
        # as text)
        append = self._buffer.append
        sources: dict[bytes, str] = {}
        for p, r, entries in found:
            last = None  # the last entry read
            for raw_id, fields in entries:
                try:
                    s, records = entry_records(fields)
                    source = sources.get(s) or sources.setdefault(s, s.decode())
                except (ValueError, KeyError, IndexError):
                    # a layout this version does not know (a newer gateway's, in a rolling
                    # upgrade) or a damaged entry: it is neither skipped (its messages were
                    # acknowledged) nor allowed to stop the pipeline; the partition waits at
                    # it for an owner that reads it, and the others go on
                    r.unreadable = text(raw_id)
                    log.error("inbox entry not readable by this version; its partition "
                              "waits for a gateway that reads it", partition=p,
                              entry=r.unreadable)
                    break
                last = raw_id
                t, n, b = records[0]
                if len(records) == 1:
                    row = InboxRow(row_id(p, raw_id), source, t, b, n, p)
                else:
                    row = InboxRow(row_id(p, raw_id), source, t, b"",
                                   sum(rec[1] for rec in records), p, records)
                append((row, r))
            if last is not None:
                r.after = text(last)

    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]:
        # waits for Redis: a record whose routing failed would hold its partition's cursor
        while True:
            found = await self._answered("accounts", lambda: self._accounts(source, users), None)
            if found is not None:
                return found

    async def _accounts(self, source: str, users: list[str]) -> dict[str, str]:
        by_p: dict[int, list[str]] = {}
        for user in users:
            by_p.setdefault(partition_of(source, user, self.partitions), []).append(user)
        replies = await commands(
            self._c(), [("HMGET", accounts_key(p), *(field(source, u) for u in us)) for p, us in by_p.items()])
        found: dict[str, str] = {}
        for us, values in zip(by_p.values(), replies, strict=True):
            found.update((u, text(v)) for u, v in zip(us, values, strict=True) if v is not None)
        return found

    async def transact(
        self, script: Callable[[Turn], T], now: float | None = None, partition: int = 0
    ) -> T:
        reading = self._reading.get(partition)
        leases = self.leases
        if reading is None or leases is None or leases.holds(partition) != reading.epoch:
            self._drop(partition, reading)
            raise PartitionLost(partition)
        handed = list(reading.handed)
        done_before = set(reading.done)
        days = set(reading.days)
        at = time.time() if now is None else now
        member, epoch = leases.member, reading.epoch

        def run() -> tuple[T, set[int], int, str | None]:
            assert self.sync is not None
            ops = Ops(partition)
            turn = _Turn(self.sync, ops, at, self.window, days)
            result = script(cast(Turn, turn))
            if not turn.rows <= {row for row, _ in handed}:
                raise PartitionLost(partition)  # rows of an earlier ownership
            done = done_before | turn.rows
            moved = gone = 0
            for row, count in handed:
                if row not in done:
                    break
                moved += 1
                gone += count
            cursor = entry_of(handed[moved - 1][0]) if moved else ""
            if ops or cursor:
                # the client resends a command whose connection dropped: the token makes a
                # second run of an outbox upsert (an increment) change nothing
                once = ops.key(once_key(partition, self._token()))
                args = [member, epoch, cursor, partition, once, gone, *ops.args()]
                told = False
                while True:
                    try:
                        ok = self._sync_commit(keys=ops.keys, args=args, client=self.sync)
                        break
                    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                        # sent, perhaps run, its reply lost (Redis killed or restarting): this
                        # same run goes again until Redis answers, never a new one, which
                        # would not see the dedupe keys of a day the first run began
                        if leases.holds(partition) != epoch:
                            raise PartitionLost(partition) from None  # read again anew
                        if not told:
                            log.warning("commit not answered; sending the same run again",
                                        partition=partition, error=str(exc))
                            told = True
                        time.sleep(UNANSWERED)
                if not ok:
                    raise PartitionLost(partition)
                if self.metrics is not None:
                    self.metrics.commits.inc()
            return result, turn.rows, moved, turn.state.new_day

        assert self._pool is not None, "store is not open for applying"
        try:
            result, rows, moved, new_day = await asyncio.get_running_loop().run_in_executor(
                self._pool, run)
        except PartitionLost:
            self._drop(partition, reading)
            raise
        if self._reading.get(partition) is reading:
            if new_day is not None:
                reading.days.add(new_day)
            reading.done |= rows
            for _ in range(moved):
                reading.done.discard(reading.handed.popleft()[0])
        return result

    def _token(self) -> str:
        """A script run's token (`once_key`): unique to this store's opening and the run,
        without a draw from the OS's random source a run (it showed in the worker's
        profile: `SystemRandom.randbytes`, 1% of its samples)."""
        return f"{self._once}{next(self._runs)}"

    def _drop(self, partition: int, reading: _Reading | None) -> None:
        """Read `partition` again from its committed cursor, if this gateway still owns it
        at the next lease round: a dropped turn's entries would hold the cursor for ever."""
        if reading is not None and self._reading.get(partition) is reading:
            del self._reading[partition]

    # -- the forwarder ---------------------------------------------------------------------------

    async def due(self, source: str, now: float, limit: int) -> list[OutboxItem]:
        return await self._answered("outbox", lambda: self._due(source, now, limit), [])

    async def _due(self, source: str, now: float, limit: int) -> list[OutboxItem]:
        owned = self._owned()
        if not owned:
            return []
        upto = repr(now)
        found: list[tuple[float, int, int]] = []
        for p, reply in zip(owned, await commands(self._c(), [
                ("ZRANGE", due_key(p, source), "-inf", upto, "BYSCORE", "LIMIT", 0, limit,
                 "WITHSCORES") for p in owned]), strict=True):
            found += [(at, int(i), p) for i, at in _scored(reply)]
        found.sort()
        found = found[:limit]
        by_p: dict[int, list[tuple[int, float]]] = {}
        for at, i, p in found:
            by_p.setdefault(p, []).append((i, at))
        replies = iter(await commands(self._c(), [
            ("HMGET", outbox_key(p, part), *(str(i) for i, _ in ids))
            for p, ids in by_p.items() for part in ITEM_PARTS]))
        items: list[tuple[float, OutboxItem]] = []
        for p, ids in by_p.items():
            parts = {part: next(replies) for part in ITEM_PARTS}
            items += items_of(p, [str(i).encode() for i, _ in ids], [at for _, at in ids], parts)
        items.sort(key=lambda x: (x[0], x[1].id))
        return [item for _, item in items]

    async def next_due(self, source: str) -> float | None:
        return await self._answered("outbox", lambda: self._next_due(source), None)

    async def _next_due(self, source: str) -> float | None:
        owned = self._owned()
        if not owned:
            return None
        replies = await commands(
            self._c(), [("ZRANGE", due_key(p, source), 0, 0, "WITHSCORES") for p in owned])
        firsts = [pairs[0][1] for pairs in map(_scored, replies) if pairs]
        return min(firsts) if firsts else None

    async def _fenced(self, name: str, item: OutboxItem, args: list[Any]) -> None:
        """Run an outcome script for `item` under this gateway's lease of its partition.

        One token for every send of this outcome: it is sent again until Redis answers (a
        reply lost with a connection may hide a run that happened), and runs once. Refused
        (the lease ran out while Redis was down: AOF keeps a lease's expiry) or not trusted
        here any more (no round renewed it for `ttl`), it waits for a lease round: if this
        gateway holds the partition again, under a new epoch, the outcome is recorded under
        that one (the forwarder keeps the call marked in flight until then, so it does not
        send it again meanwhile). Only when another gateway holds the partition is the
        outcome dropped: the call was on the wire, and the new owner sends it again (at
        least once, as after a crash)."""
        p = id_partition(item.id)
        leases = self.leases
        if leases is None:
            return
        keys = [*fixed_keys(p), due_key(p, item.source), once_key(p, self._token())]
        told = False
        refused: int | None = None  # the epoch Redis refused it under
        while True:
            epoch = leases.holds(p)
            if epoch is None or epoch == refused:
                try:
                    await leases.refresh(time.monotonic())
                except (RedisError, OSError) as exc:
                    told = told or self._unanswered(name, item, exc)
                    await asyncio.sleep(UNANSWERED)
                    continue
                epoch = leases.holds(p)
                if epoch is None or epoch == refused:
                    break
            try:
                if await self._scripts[name](
                        keys=keys, args=[leases.member, epoch, str(item.id), *args]):
                    return
                refused = epoch
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                told = told or self._unanswered(name, item, exc)
                await asyncio.sleep(UNANSWERED)
        log.warning("outcome not recorded: partition no longer owned", partition=p,
                    outcome=name, source_id=item.source)

    @staticmethod
    def _unanswered(name: str, item: OutboxItem, exc: Exception) -> bool:
        log.warning("outcome not recorded yet: Redis did not answer; retrying",
                    outcome=name, source_id=item.source, error=str(exc))
        return True

    async def delivered(self, item: OutboxItem) -> None:
        await self._fenced("delivered", item, [
            "track" if item.kind == "track" else "", item.version, field(item.source, item.key)])

    async def retry(self, item: OutboxItem, next_at: float, error: str) -> None:
        await self._fenced("retry", item, [item.attempts + 1, next_at, error])

    async def reject(self, item: OutboxItem, status: int, reason: str) -> None:
        from gateway.store.base import DeadLetter

        p = id_partition(item.id)
        raw = await self._c().hget(outbox_key(p, "meta"), str(item.id))  # type: ignore[misc]
        if raw is None:
            return
        account = unpack_meta(raw)[2]
        letter = DeadLetter(source=item.source, stage="forward", reason=reason, payload=b"",
                            status=status, path=item.path, account=account)
        await self._fenced("reject", item, [
            field(item.source, item.key), "track" if item.kind == "track" else "",
            letter_meta(letter, time.time()), time.time(), p])

    # -- admin and housekeeping ------------------------------------------------------------------

    async def _letters(self, ids_by_p: dict[int, list[int]]) -> list[StoredLetter]:
        pipe = self._c().pipeline(transaction=False)
        for p, ids in ids_by_p.items():
            for part in LETTER_PARTS:
                pipe.hmget(dead_key(p, part), [str(i) for i in ids])
        replies = iter(await pipe.execute())
        out: list[StoredLetter] = []
        for ids in ids_by_p.values():
            parts = {part: next(replies) for part in LETTER_PARTS}
            out += letters_of(ids, parts)
        out.sort(key=lambda d: d.id)
        return out

    async def _letter_ids(self) -> dict[int, list[int]]:
        pipe = self._c().pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.hkeys(dead_key(p, "meta"))
        return {
            p: sorted(int(i) for i in ids)
            for p, ids in enumerate(await pipe.execute()) if ids
        }

    async def dead_letters(
        self, source: str | None, after: int, limit: int, include_replayed: bool
    ) -> list[StoredLetter]:
        ids = sorted(i for ids in (await self._letter_ids()).values() for i in ids if i > after)
        out: list[StoredLetter] = []
        for start in range(0, len(ids), 1000):
            chunk: dict[int, list[int]] = {}
            for i in ids[start : start + 1000]:
                chunk.setdefault(id_partition(i), []).append(i)
            for d in await self._letters(chunk):
                if (source is None or d.source == source) and (
                        include_replayed or d.replayed_at is None):
                    out.append(d)
                    if len(out) == limit:
                        return out
        return out

    async def replayable(self, ids: list[int] | None, source: str | None) -> list[StoredLetter]:
        if ids is None:
            by_p = await self._letter_ids()
        else:
            by_p = {}
            for i in sorted(set(ids)):
                if i >= 0 and id_partition(i) < self.partitions:
                    by_p.setdefault(id_partition(i), []).append(i)
        return [
            d for d in await self._letters(by_p)
            if d.replayed_at is None and (source is None or d.source == source)
        ]

    async def requeue(self, letters: Sequence[tuple[int, str | None]], now: float) -> int:
        found = {d.id: d for d in await self.replayable([i for i, _ in letters], None)}
        done = 0
        for letter_id, kind in letters:
            d = found.get(letter_id)
            if d is None:
                continue
            p = id_partition(letter_id)
            raw = await self._c().hget(dead_key(p, "meta"), str(letter_id))  # type: ignore[misc]
            grouped = raw is not None and letter_fields(raw)[7]
            meta = b"" if kind is None else item_meta(
                d.source, replay_key(letter_id), d.account, kind)
            group = group_field(d.source, d.stage, d.reason) if grouped else b""
            done += int(await self._scripts["requeue"](
                keys=[*fixed_keys(p), due_key(p, d.source)],
                args=[str(letter_id), field(d.source, replay_key(letter_id)), meta, now, p, group,
                      d.path or ""]))
        return done

    async def prune_dead_letters(self, before: float) -> int:
        pipe = self._c().pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.hgetall(dead_key(p, "last"))
        gone = 0
        pipe2 = self._c().pipeline(transaction=False)
        for p, lasts in enumerate(await pipe.execute()):
            old = [i for i, at in lasts.items() if float(at) < before]
            if not old:
                continue
            gone += len(old)
            for part in (*LETTER_PARTS, "groups"):
                if part != "groups":
                    pipe2.hdel(dead_key(p, part), *old)
            groups = await self._c().hgetall(dead_key(p, "groups"))  # type: ignore[misc]
            stale = [f for f, i in groups.items() if i in set(old)]
            if stale:
                pipe2.hdel(dead_key(p, "groups"), *stale)
        if gone:
            await pipe2.execute()
        return gone

    async def counts(self) -> Counts:
        days = await commands(
            self._c(), [("ZRANGE", ledger_days_key(p), 0, -1) for p in range(self.partitions)])
        keysets = [[*fixed_keys(p), *(ledger_counts_key(p, text(d)) for d in ds)]
                   for p, ds in enumerate(days)]
        script = self._scripts["counts"]
        replies: list[Any]
        if isinstance(self._c(), AsyncCluster):
            replies = await asyncio.gather(*(script(keys=keys) for keys in keysets))
        else:
            # one node (admin's stats, each pipeline's resync): every partition's script
            # packed and sent at once, not one task and pooled connection each
            calls = [("EVALSHA", script.sha, len(keys), *keys) for keys in keysets]
            try:
                replies = await commands(self._c(), calls)
            except NoScriptError:
                await self._c().script_load(script.script)  # a restarted Redis forgot it
                replies = await commands(self._c(), calls)
        totals = [0, 0, 0, 0, 0]
        for reply in replies:
            for i, n in enumerate(reply):
                totals[i] += int(n)
        return Counts(*totals)

    async def ledger(self, source: str | None, day: str | None) -> list[dict[str, Any]]:
        pipe = self._c().pipeline(transaction=False)
        for p in range(self.partitions):
            pipe.zrange(ledger_days_key(p), 0, -1)
        wanted: list[tuple[int, str]] = [
            (p, text(d)) for p, ds in enumerate(await pipe.execute()) for d in ds
            if day is None or text(d) == day
        ]
        pipe = self._c().pipeline(transaction=False)
        for p, d in wanted:
            pipe.hgetall(ledger_counts_key(p, d))
            pipe.hgetall(ledger_stamps_key(p, d))
        replies = await pipe.execute()
        rows: list[dict[str, Any]] = []
        for i, (_, d) in enumerate(wanted):
            counts, stamps = replies[2 * i], replies[2 * i + 1]
            for raw, n in counts.items():
                key = ledger_key_from(raw, d)
                if source is not None and key.source != source:
                    continue
                ts = stamps.get(raw)
                rows.append({
                    "source": key.source, "day": key.day, "userId": key.user,
                    "account": key.account, "event": key.event, "count": int(n),
                    "lastTimestamp": text(ts) if ts is not None else None,
                })
        return rows

    async def prune(self, before: float) -> int:
        """Forget, in the partitions this gateway owns, dedupe days and ledger days older
        than `before`, and traits known for days before it."""
        oldest = day_of(before)
        known_before = time.strftime("%Y-%m-%d", time.gmtime(before))
        gone = 0
        client = self._c()
        for p in self._owned():
            days = [text(d) for d in await client.smembers(dedupe_days_key(p))]  # type: ignore[misc]
            old = [d for d in days if d < oldest]
            if old:
                await client.delete(*(dedupe_day_key(p, d) for d in old))
                await client.srem(dedupe_days_key(p), *old)  # type: ignore[misc]
                gone += len(old)
            stale = [text(d) for d in await client.zrangebyscore(ledger_days_key(p), "-inf", f"({before}")]
            if stale:
                await client.delete(*(k for d in stale for k in (
                    ledger_counts_key(p, d), ledger_stamps_key(p, d))))
                await client.zrem(ledger_days_key(p), *stale)
                gone += len(stale)
            known = await client.hgetall(known_key(p))  # type: ignore[misc]
            forget = [f for f, v in known.items() if known_day(v) < known_before]
            if forget:
                await client.hdel(known_key(p), *forget)  # type: ignore[misc]
                gone += len(forget)
        return gone

    async def checkpoint(self) -> None:
        """Nothing to do: Redis has no write-ahead log of the gateway's to fold."""


def _scored(reply: Any) -> list[tuple[bytes, float]]:
    """A WITHSCORES reply: [member, score] pairs (RESP3, or parsed), or member, score, ...
    (RESP2)."""
    if not reply:
        return []
    if isinstance(reply[0], list | tuple):
        return [(m, float(at)) for m, at in reply]
    return [(reply[i], float(reply[i + 1])) for i in range(0, len(reply), 2)]
