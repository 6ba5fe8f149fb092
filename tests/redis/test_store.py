"""The Redis store's roles against a real redis-server (and the Cluster where slots matter):
a partition turn commits whole or not at all, under its epoch; dedupe is exact across days
and pruned by the day; the outbox's outcomes are fenced; dead letters, counts and replay
see every partition."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import Settings, Source
from gateway.keys import dedupe_key, dedupe_prefix
from gateway.rules.ledger import LedgerKey, Row
from gateway.store.base import DeadLetter, PartitionLost, Queued, Turn
from gateway.store.redis.inbox import START
from gateway.store.redis.ops import Ops, field
from gateway.store.redis.outbox import OutboxTurn
from gateway.store.redis.partition import (
    dedupe_day_key,
    due_key,
    epoch_key,
    lease_key,
    once_key,
    partition_of,
)
from gateway.store.redis.scripts import fixed_keys
from gateway.store.redis.state import day_of
from gateway.store.redis.store import RedisStore, entry_of, row_id
from tests.redis.redis_support import RedisClusterNodes, RedisServer

P = 4
SOURCE = Source(write_key="wk_redis_store_1", accoil_api_key="ak_redis_store_1", name="main")
NOW = 1_764_000_000.0  # 2025-11-24, UTC


def settings(url: str) -> Settings:
    return Settings(sources=[SOURCE], store="redis", redis_url=url, partitions=P)


def batch(users: list[str], start: int = 0) -> bytes:
    return json.dumps({"batch": [
        {"type": "track", "event": "E", "userId": u, "messageId": f"m{start + i}"}
        for i, u in enumerate(users)
    ]}).encode()


async def owning(url: str) -> RedisStore:
    store = RedisStore(settings(url), apply=True)
    await store.open()
    for _ in range(200):
        if len(store._owned()) == P:
            return store
        await asyncio.sleep(0.02)
    raise AssertionError("the store took no partitions")


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = await owning(redis_server.url)
    yield s
    await s.close()


def key(mid: str) -> bytes:
    return dedupe_key(dedupe_prefix(SOURCE.id), mid)


def applying(
    rows: dict[int, int], then: Callable[[Turn], Any] = lambda tx: None
) -> Callable[[Turn], Any]:
    def script(tx: Turn) -> Any:
        tx.inbox.applied(rows)
        return then(tx)

    return script


async def test_a_turn_commits_its_writes_and_moves_the_cursor_past_applied_entries(
    store: RedisStore, redis_server: RedisServer
) -> None:
    p = partition_of(SOURCE.id, "u1", P)
    for start in (0, 10, 20):
        await store.accept(SOURCE.id, NOW, batch(["u1"] * 10, start), 10)
    rows = await store.inbox_after(0, 100)
    assert [r.partition for r in rows] == [p, p, p] and [r.count for r in rows] == [10] * 3
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert row_id(p, entry_of(rows[0].id)) == rows[0].id
    lk = LedgerKey(SOURCE.id, "2025-11-24", "u1", "u1", "E")

    def write(tx: Turn) -> set[bytes]:
        found = tx.state.remember([key("m0"), key("m1")])
        tx.state.put_ledger([Row(lk, 2, "2025-11-24T00:00:00.000Z")])
        tx.outbox.add([Queued(SOURCE.id, "k1", "u1", "track", "/v2/track", b'{"a":1}', 2)])
        return found

    # the second entry first: the cursor may not pass the first, which is not applied
    assert await store.transact(applying({rows[1].id: 10}, write), NOW, p) == set()
    c = redis_server.client()
    assert c.get(f"{{p{p}}}:progress") is None and c.xlen(f"{{p{p}}}:inbox") == 3
    await store.transact(applying({rows[0].id: 10}), NOW, p)
    assert c.get(f"{{p{p}}}:progress") == entry_of(rows[1].id).encode()
    assert c.xlen(f"{{p{p}}}:inbox") == 1  # trimmed up to the cursor
    counts = await store.counts()
    assert (counts.inbox, counts.outbox, counts.ledger_rows, counts.ledger_events) == (10, 2, 1, 2)
    c.script_flush()  # as a restarted Redis: the counting script is loaded again
    assert await store.counts() == counts
    assert await store.transact(lambda tx: tx.state.ledger([lk]), NOW, p) == {
        lk: Row(lk, 2, "2025-11-24T00:00:00.000Z")}
    assert await store.ledger(SOURCE.id, "2025-11-24") == [{
        "source": "main", "day": "2025-11-24", "userId": "u1", "account": "u1", "event": "E",
        "count": 2, "lastTimestamp": "2025-11-24T00:00:00.000Z"}]


async def test_the_inbox_count_leaves_with_the_entries_the_cursor_passes(
    store: RedisStore,
) -> None:
    # the commit is told the messages of the entries its cursor moves past (the owner read
    # them): an entry applied out of order is counted until the cursor passes it
    p = partition_of(SOURCE.id, "u1", P)
    for start, n in ((0, 2), (10, 3), (20, 4)):
        await store.accept(SOURCE.id, NOW, batch(["u1"] * n, start), n)
    rows = await store.inbox_after(0, 100)
    assert [r.count for r in rows] == [2, 3, 4] and (await store.counts()).inbox == 9
    await store.transact(applying({rows[2].id: 4}), NOW, p)
    assert (await store.counts()).inbox == 9  # the first two hold the cursor
    await store.transact(applying({rows[0].id: 2}), NOW, p)
    assert (await store.counts()).inbox == 7
    await store.transact(applying({rows[1].id: 3}), NOW, p)
    assert (await store.counts()).inbox == 0


async def test_a_lost_partition_refuses_the_whole_turn(
    store: RedisStore, redis_server: RedisServer
) -> None:
    p = partition_of(SOURCE.id, "u1", P)
    await store.accept(SOURCE.id, NOW, batch(["u1"] * 3), 3)
    rows = await store.inbox_after(0, 100)
    # another gateway takes the partition (the lease moved on, the epoch raised), as after
    # this one was paused past its lease
    c = redis_server.client()
    c.set(lease_key(p), "someone-else")
    c.incr(epoch_key(p))

    def write(tx: Turn) -> None:
        tx.state.remember([key("m0")])
        tx.state.put_accounts([(SOURCE.id, "u1", "acme")])

    with pytest.raises(PartitionLost):
        await store.transact(applying({rows[0].id: 3}, write), NOW, p)
    assert c.get(f"{{p{p}}}:progress") is None
    assert c.exists(dedupe_day_key(p, day_of(NOW)), f"{{p{p}}}:acct") == 0
    assert c.xlen(f"{{p{p}}}:inbox") == 1


async def test_dedupe_is_exact_across_days_and_pruned_by_the_day(store: RedisStore) -> None:
    p = partition_of(SOURCE.id, "u1", P)
    day = 86400.0
    keys = [key(f"m{i}") for i in range(50)]

    def remember(ks: list[bytes]) -> Callable[[Turn], set[bytes]]:
        return lambda tx: tx.state.remember(ks)

    assert await store.transact(remember(keys[:30]), NOW, p) == set()
    # a day later, within the window: every key stored the day before is found
    assert await store.transact(remember(keys), NOW + day, p) == set(keys[:30])
    # in the same list twice: the rules see the second (`first_seen`); stored once
    assert await store.transact(remember(keys[40:] + keys[40:]), NOW + day, p) == set(keys[40:])
    assert await store.prune(NOW + day - 1) >= 1  # the first day's set goes whole
    assert await store.transact(remember(keys), NOW + day, p) == set(keys[30:])


async def test_outbox_outcomes_are_fenced(store: RedisStore, redis_server: RedisServer) -> None:
    p = partition_of(SOURCE.id, "u2", P)
    await store.accept(SOURCE.id, NOW, batch(["u2"]), 1)
    rows = await store.inbox_after(0, 100)
    await store.transact(applying({rows[0].id: 1}, lambda tx: tx.outbox.add([
        Queued(SOURCE.id, "t1", "u2", "track", "/v2/track", b'{"n":1}', 3),
        Queued(SOURCE.id, "i1", "u2", "identify", "/v2/identify", b'{"n":2}', 1),
    ])), NOW, p)
    items = {i.key: i for i in await store.due(SOURCE.id, time.time(), 10)}
    assert {k: i.repeat for k, i in items.items()} == {"t1": 3, "i1": 1}
    await store.delivered(items["t1"])  # one occurrence of three went out
    await store.retry(items["i1"], time.time() + 3600, "503")
    due = await store.due(SOURCE.id, time.time(), 10)
    assert [(i.key, i.repeat) for i in due] == [("t1", 2)]
    assert (await store.next_due(SOURCE.id) or 0) <= time.time()
    # the partition moves on: this gateway's outcomes are refused, the item stays as it was
    c = redis_server.client()
    c.set(lease_key(p), "someone-else")
    c.incr(epoch_key(p))
    await store.delivered(due[0])
    await store.reject(due[0], 400, "bad")
    assert c.hget(f"{{p{p}}}:ob:n", str(due[0].id)) == b"2"
    assert (await store.counts()).dead_letters == 0


async def test_dead_letters_and_replay_across_partitions(
    store: RedisStore, redis_server: RedisServer
) -> None:
    users = ["u1", "u2", "u3", "u4", "u5", "u6"]
    parts = {partition_of(SOURCE.id, u, P) for u in users}
    assert len(parts) >= 2
    for i, u in enumerate(users):
        await store.accept(SOURCE.id, NOW, batch([u], i), 1)
    rows = await store.inbox_after(0, 100)
    letter = DeadLetter(source=SOURCE.id, stage="forward", reason="Accoil answered 400",
                        payload=b'{"userId":"x"}', status=400, path="/v2/track",
                        repeat=2, account="acme")

    def dead(tx: Turn) -> None:
        tx.dead.add([letter])

    for row in rows:
        await store.transact(applying({row.id: 1}, dead), NOW, row.partition)
    letters = await store.dead_letters(None, 0, 100, False)
    assert len(letters) == len(users) and [d.id for d in letters] == sorted(d.id for d in letters)
    page = await store.dead_letters(None, 0, 2, False)
    rest = await store.dead_letters(None, page[-1].id, 100, False)
    assert [d.id for d in page + rest] == [d.id for d in letters]
    assert (await store.counts()).dead_letters == len(users)
    first = letters[0]
    assert await store.requeue([(first.id, "track")], NOW) == 1
    assert await store.requeue([(first.id, "track")], NOW) == 0  # once
    assert (await store.counts()).dead_letters == len(users) - 1
    requeued = [i for i in await store.due(SOURCE.id, time.time(), 100)]
    assert [(i.path, i.body, i.repeat, i.kind) for i in requeued] == [
        ("/v2/track", b'{"userId":"x"}', 2, "track")]
    assert len(await store.dead_letters(None, 0, 100, True)) == len(users)
    assert await store.prune_dead_letters(time.time() + 1) == len(users)
    assert await store.dead_letters(None, 0, 100, True) == []


async def test_a_store_started_while_redis_is_down_waits_for_it(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory()
    server.kill()
    store = RedisStore(settings(server.url), apply=False)
    opening = asyncio.create_task(store.open())
    await asyncio.sleep(1.5)
    assert not opening.done()  # retrying, not crashed
    server.start()
    await asyncio.wait_for(opening, 10)
    assert store.reachable
    await store.accept(SOURCE.id, NOW, batch(["u1"]), 1)
    server.kill()
    for _ in range(100):
        if not store.reachable:
            break
        await asyncio.sleep(0.05)
    assert not store.reachable
    with pytest.raises(Exception, match="Redis"):
        await store.accept(SOURCE.id, NOW, batch(["u1"]), 1)
    server.start()
    for _ in range(100):
        if store.reachable:
            break
        await asyncio.sleep(0.05)
    assert store.reachable
    await store.accept(SOURCE.id, NOW, batch(["u1"]), 1)
    await store.close()


async def test_a_turn_and_its_outbox_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    store = await owning(redis_cluster.url)
    try:
        users = [f"u{i}" for i in range(12)]
        await store.accept(SOURCE.id, NOW, batch(users), len(users))
        rows = await store.inbox_after(0, 100)
        assert len({r.partition for r in rows}) >= 2

        def write(row_id: int) -> Callable[[Turn], None]:
            def script(tx: Turn) -> None:
                tx.state.remember([key(f"{row_id}")])
                tx.outbox.add([Queued(SOURCE.id, f"k{row_id}", "a", "track", "/v2/track",
                                      b"{}", 1)])

            return script

        for row in rows:
            await store.transact(applying({row.id: row.count}, write(row.id)), NOW, row.partition)
        counts = await store.counts()
        assert (counts.inbox, counts.outbox) == (0, len(rows))
        due = await store.due(SOURCE.id, time.time(), 100)
        assert len(due) == len(rows)
        for item in due:
            await store.delivered(item)
        assert (await store.counts()).outbox == 0
    finally:
        await store.close()


def one_user_per_partition() -> list[str]:
    users: dict[int, str] = {}
    for i in range(1000):
        users.setdefault(partition_of(SOURCE.id, f"u{i}", P), f"u{i}")
        if len(users) == P:
            return [users[p] for p in range(P)]
    raise AssertionError("no user for some partition")


async def a_backlog(store: RedisStore) -> None:
    """400 entries of one message, 100 a partition."""
    users = one_user_per_partition()
    for i in range(100):
        for j, u in enumerate(users):
            await store.accept(SOURCE.id, NOW, batch([u], i * P + j), 1)


async def test_reads_sent_ahead_hand_every_entry_once_and_in_order(store: RedisStore) -> None:
    # a backlog of 400 entries, 100 a partition: each read brings 256, and the next is sent
    # while the rows handed are routed
    await a_backlog(store)
    handed: list[int] = []
    ahead = 0
    while rows := await store.inbox_after(0, 16):
        handed += [r.id for r in rows]
        ahead += store._next is not None
    assert ahead > 0, "no read was sent ahead"
    assert len(handed) == len(set(handed)) == 400
    for p in range(P):
        mine = [i for i in handed if i % (1 << 14) == p]
        assert len(mine) == 100 and mine == sorted(mine)


async def test_a_short_answer_means_the_streams_had_no_more(store: RedisStore) -> None:
    # 400 entries, read 256 at a time and handed 24 at a time: where a read's rows run out
    # with the next read on the wire, the answer is topped up from it, so that only the
    # last answer is short (the dispatcher lets a turn fill while answers are full)
    await a_backlog(store)
    sizes: list[int] = []
    handed: list[int] = []
    while rows := await store.inbox_after(0, 24):
        sizes.append(len(rows))
        handed += [r.id for r in rows]
    assert sizes == [24] * 16 + [16]
    assert len(handed) == len(set(handed)) == 400


async def test_a_read_sent_ahead_under_a_lost_ownership_hands_nothing(store: RedisStore) -> None:
    await a_backlog(store)
    first = await store.inbox_after(0, 16)
    assert store._next is not None  # the next read is on the wire
    p = first[0].partition
    # the partition is dropped and read anew from its committed cursor (nothing committed:
    # from its first entry), as after a refused turn; what the read in flight brought of it
    # under the old reading is not handed
    store._drop(p, store._reading[p])
    assert store.leases is not None
    await store._follow(dict(store.leases.owned))
    again: list[int] = []
    while rows := await store.inbox_after(0, 16):
        again += [r.id for r in rows if r.partition == p]
    assert len(again) == len(set(again)) == 100 and again == sorted(again)
    assert again[0] == first[0].id


async def test_entries_of_the_older_layouts_are_read_beside_the_new(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # ingest writes one field (`m`), one entry of a group's parts in a partition; a stream
    # written before an upgrade holds the version before's entries (one part in `d`) and
    # older ones of four fields (s, t, n, b), in its order or another: each is read
    p = partition_of(SOURCE.id, "u1", P)
    await store.accept(SOURCE.id, NOW, batch(["u1"] * 2), 2)
    old = [batch(["u1"], 5), batch(["u1"] * 3, 6), batch(["u1"] * 2, 9)]
    src = SOURCE.id.encode()
    c = redis_server.client()
    c.xadd(f"{{p{p}}}:inbox", {"s": SOURCE.id, "t": repr(NOW + 1), "n": 1, "b": old[0]})
    c.xadd(f"{{p{p}}}:inbox", {"b": old[1], "n": 3, "t": repr(NOW + 2), "s": SOURCE.id})
    c.xadd(f"{{p{p}}}:inbox", {"d": b"2 %r %d %s%s" % (NOW + 3, len(src), src, old[2])})
    # two requests in one group: one entry, each part a record with its received_at
    together = [batch(["u1"], 11), batch(["u1"] * 2, 12)]
    await asyncio.gather(store.accept(SOURCE.id, NOW + 4, together[0], 1),
                         store.accept(SOURCE.id, NOW + 5, together[1], 2))
    rows = await store.inbox_after(0, 100)
    assert [(r.source, r.received_at, r.count, r.partition) for r in rows] == [
        (SOURCE.id, NOW, 2, p), (SOURCE.id, NOW + 1, 1, p), (SOURCE.id, NOW + 2, 3, p),
        (SOURCE.id, NOW + 3, 2, p), (SOURCE.id, NOW + 4, 3, p)]
    assert [r.body for r in rows[:4]] == [batch(["u1"] * 2), *old]
    assert [r.records for r in rows] == [None] * 4 + [
        [(NOW + 4, 1, together[0]), (NOW + 5, 2, together[1])]]
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert rows[1].id == row_id(p, entry_of(rows[1].id))
    assert store.inbox is not None
    assert [e.body for e in await store.inbox.read(p, START, 10)] == [
        r.body for r in rows[:4]] + together


async def test_an_entry_this_version_cannot_read_holds_its_partition_only(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # a newer gateway's layout (in a rolling upgrade), or a damaged entry: not skipped (its
    # messages were acknowledged), not allowed to stop the pipeline (an exception here ends
    # the dispatcher); its partition waits at it, the others go on
    p = partition_of(SOURCE.id, "u1", P)
    q = next(partition_of(SOURCE.id, u, P) for u in (f"v{i}" for i in range(100))
             if partition_of(SOURCE.id, u, P) != p)
    other = next(f"v{i}" for i in range(100) if partition_of(SOURCE.id, f"v{i}", P) == q)
    c = redis_server.client()
    await store.accept(SOURCE.id, NOW, batch(["u1"]), 1)
    c.xadd(f"{{p{p}}}:inbox", {"x": b"a layout of a later version"})
    c.xadd(f"{{p{p}}}:inbox", {"m": b"12 not a source"})
    await store.accept(SOURCE.id, NOW + 1, batch(["u1"], 1), 1)
    await store.accept(SOURCE.id, NOW + 2, batch([other]), 1)
    rows = await store.inbox_after(0, 100)
    assert sorted((r.received_at, r.partition) for r in rows) == [(NOW, p), (NOW + 2, q)]
    assert store._reading[p].unreadable is not None
    await store.accept(SOURCE.id, NOW + 3, batch([other], 1), 1)
    assert [(r.partition, r.received_at) for r in await store.inbox_after(0, 100)] == [
        (q, NOW + 3)]
    assert c.xlen(f"{{p{p}}}:inbox") == 4  # nothing of it dropped


async def test_a_turn_is_freed_without_the_garbage_collector(store: RedisStore) -> None:
    # a turn holds every value it writes (its ops): in a reference cycle it would wait for the
    # collector's rare full passes, and the worker's memory would grow with the burst
    p = partition_of(SOURCE.id, "u1", P)
    await store.accept(SOURCE.id, NOW, batch(["u1"]), 1)
    rows = await store.inbox_after(0, 100)
    turns: list[weakref.ref[Turn]] = []

    def write(tx: Turn) -> None:
        tx.state.remember([key("m0")])
        turns.append(weakref.ref(tx))

    gc.disable()
    try:
        await store.transact(applying({rows[0].id: 1}, write), NOW, p)
        assert turns and turns[0]() is None
    finally:
        gc.enable()


async def test_a_turn_dropped_while_the_partition_is_still_owned_is_read_again(
    store: RedisStore,
) -> None:
    # the lease went stale here (a pause past `ttl`) but no one took it: the dropped turn's
    # entries must not hold the cursor for ever; they are read again from it
    p = partition_of(SOURCE.id, "u1", P)
    await store.accept(SOURCE.id, NOW, batch(["u1"] * 2), 2)
    rows = await store.inbox_after(0, 100)
    assert store.leases is not None
    store.leases._valid_until = 0.0
    with pytest.raises(PartitionLost):
        await store.transact(applying({rows[0].id: 2}), NOW, p)
    assert await store.inbox_after(0, 100) == []
    await store.leases.tick()
    await store._follow(dict(store.leases.owned))
    again = await store.inbox_after(0, 100)
    assert [r.id for r in again] == [rows[0].id]
    await store.transact(applying({again[0].id: 2}), NOW, p)
    assert (await store.counts()).inbox == 0


async def test_a_script_sent_again_with_its_token_changes_nothing_twice(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # redis-py sends a command again when its connection drops, and the first may have run:
    # the outbox's increments (a commit's upsert, a delivery's decrement) must not double
    p = partition_of(SOURCE.id, "u1", P)
    assert store.leases is not None and store.sync is not None
    member, epoch = store.leases.member, store.leases.owned[p]
    ops = Ops(p)
    OutboxTurn(store.sync, ops, NOW).add(
        [Queued(SOURCE.id, "t1", "u1", "track", "/v2/track", b"{}", 3)])
    once = ops.key(once_key(p, "commit-1"))
    for _ in range(2):
        assert store._sync_commit(keys=ops.keys, args=[member, epoch, "", p, once, 0, *ops.args()],
                                  client=store.sync)
    c = redis_server.client()
    (item,) = await store.due(SOURCE.id, time.time(), 10)
    assert item.repeat == 3
    keys = [*fixed_keys(p), due_key(p, SOURCE.id), once_key(p, "delivered-1")]
    for _ in range(2):
        await store._scripts["delivered"](keys=keys, args=[
            member, epoch, str(item.id), "track", item.version, field(SOURCE.id, "t1")])
    assert c.hget(f"{{p{p}}}:ob:n", str(item.id)) == b"2"


async def test_a_commit_whose_reply_is_lost_is_sent_again_as_the_same_run(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # Redis killed right after it ran (and fsynced) a commit, before the reply: the commit
    # goes again with its token until Redis answers, so its upsert counts once; a new run
    # redone from the reads would queue the turn's calls a second time
    p = partition_of(SOURCE.id, "u1", P)
    real = store._sync_commit
    sent: list[list[Any]] = []

    def reply_lost_once(*, keys: list[Any], args: list[Any], client: Any) -> Any:
        sent.append(list(args))
        answer = real(keys=keys, args=args, client=client)
        if len(sent) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return answer

    store._sync_commit = reply_lost_once

    def write(tx: Turn) -> set[bytes]:
        tx.outbox.add([Queued(SOURCE.id, "t1", "u1", "track", "/v2/track", b"{}", 2)])
        return tx.state.remember([key("m0"), key("m1")])

    assert await store.transact(write, NOW, p) == set()
    assert len(sent) == 2 and sent[0] == sent[1]  # the same run, token and all
    (item,) = await store.due(SOURCE.id, time.time(), 10)
    assert item.repeat == 2
    c = redis_server.client()
    assert c.smismember(dedupe_day_key(p, day_of(NOW)), [key("m0"), key("m1")]) == [1, 1]


async def test_a_turn_finds_todays_dedupe_keys_even_when_it_does_not_know_the_day(
    store: RedisStore,
) -> None:
    # the owner remembers which days have a dedupe set, to ask only those; a turn redone
    # after a commit whose outcome it never heard must still find what that commit stored
    p = partition_of(SOURCE.id, "u1", P)
    keys = [key("m0"), key("m1")]
    assert await store.transact(lambda tx: tx.state.remember(keys), NOW, p) == set()
    store._reading[p].days.clear()
    assert await store.transact(lambda tx: tx.state.remember(keys), NOW, p) == set(keys)


async def test_an_outcome_waits_for_the_lease_rather_than_drop_an_answered_call(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # an outcome dropped while this gateway still owns the partition sends its call to
    # Accoil a second time: it is recorded once a lease round says the partition is held
    p = partition_of(SOURCE.id, "u2", P)
    await store.accept(SOURCE.id, NOW, batch(["u2"]), 1)
    rows = await store.inbox_after(0, 100)
    await store.transact(applying({rows[0].id: 1}, lambda tx: tx.outbox.add([
        Queued(SOURCE.id, k, "u2", "track", "/v2/track", b"{}", 1) for k in ("t1", "t2")])),
        NOW, p)
    items = {i.key: i for i in await store.due(SOURCE.id, time.time(), 10)}
    assert store.leases is not None
    epoch = store.leases.owned[p]
    c = redis_server.client()
    # Redis unreachable for longer than `ttl`: the lease is no longer trusted here, though
    # Redis still has it as this gateway's
    store.leases._valid_until = 0.0
    await store.delivered(items["t1"])
    assert store.leases.owned[p] == epoch
    assert not c.hexists(f"{{p{p}}}:ob:n", str(items["t1"].id))
    # Redis restarted after the lease's expiry (AOF keeps it): no one holds the partition,
    # still this gateway's share; it takes it again under a new epoch and records there
    c.delete(lease_key(p))
    await store.delivered(items["t2"])
    assert store.leases.owned[p] == epoch + 1
    assert c.hlen(f"{{p{p}}}:ob:n") == 0


async def test_a_commit_unanswered_until_the_lease_lapses_drops_the_turn(
    store: RedisStore,
) -> None:
    # the same run is sent again only while the lease is trusted: past it the turn is
    # dropped, and the partition is read again from its cursor by its next reading
    p = partition_of(SOURCE.id, "u1", P)
    assert store.leases is not None
    trusted = iter([store.leases.owned[p]] * 2)  # the turn's check and the first resend
    store.leases.holds = lambda partition: next(trusted, None)  # type: ignore[method-assign]
    sent: list[int] = []

    def unanswered(*, keys: list[Any], args: list[Any], client: Any) -> Any:
        sent.append(1)
        raise RedisConnectionError("Connection closed by server.")

    store._sync_commit = unanswered

    def write(tx: Turn) -> None:
        tx.outbox.add([Queued(SOURCE.id, "t1", "u1", "track", "/v2/track", b"{}", 1)])

    with pytest.raises(PartitionLost):
        await store.transact(write, NOW, p)
    assert len(sent) == 2 and p not in store._reading


async def test_calls_queued_in_one_turn_apply_in_order_whatever_their_grouping(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # consecutive upserts of a kind share one op of the commit script: a call queued twice
    # in a turn (added, added again, then replaced) and others around it come out as they
    # would one op a call
    p = partition_of(SOURCE.id, "u1", P)

    def call(k: str, body: bytes, repeat: int = 1, kind: str = "track") -> Queued:
        return Queued(SOURCE.id, k, "u1", kind, "/v2/track", body, repeat)

    def write(tx: Turn) -> None:
        tx.outbox.add([call("t1", b'{"a":1}', 2), call("t2", b'{"b":1}'),
                       call("t1", b'{"a":2}', 3)])
        tx.outbox.replace([call("i1", b'{"i":1}', kind="identify")])
        tx.outbox.replace([call("i1", b'{"i":2}', kind="identify")])
        tx.outbox.add([call("t2", b'{"b":2}')])

    await store.transact(write, NOW, p)
    items = {i.key: i for i in await store.due(SOURCE.id, time.time(), 10)}
    assert sorted(items) == ["i1", "t1", "t2"]
    assert (items["t1"].repeat, items["t1"].body, items["t1"].version) == (5, b'{"a":2}', 1)
    assert (items["t2"].repeat, items["t2"].body, items["t2"].version) == (2, b'{"b":2}', 1)
    assert (items["i1"].body, items["i1"].version) == (b'{"i":2}', 1)
    c = redis_server.client()
    assert c.hlen(f"{{p{p}}}:ob:keys") == 3


def test_ops_share_an_op_only_between_calls_of_one_kind_due_set_and_time() -> None:
    ops = Ops(0)
    due = due_key(0, SOURCE.id)
    for slot in (b"s1", b"s2"):
        ops.outbox(False, due, slot, b"m", "/v2/track", b"{}", 1, NOW)
    ops.outbox(True, due, b"s3", b"m", "/v2/identify", b"{}", 1, NOW)
    ops.outbox(True, due, b"s4", b"m", "/v2/identify", b"{}", 1, NOW + 1)
    ops.outbox(True, due_key(0, "other"), b"s5", b"m", "/v2/identify", b"{}", 1, NOW + 1)
    d, other = ops.key(due), ops.key(due_key(0, "other"))
    call = [b"m", "/v2/track", b"{}", 1]
    identify = [b"m", "/v2/identify", b"{}", 1]
    assert ops.ops == [
        [4, d, NOW, b"s1", *call, b"s2", *call],
        [5, d, NOW, b"s3", *identify],
        [5, d, NOW + 1, b"s4", *identify],
        [5, other, NOW + 1, b"s5", *identify],
    ]
    # each op as its code, its length and its values, in order
    assert ops.args()[:3] == [4, 12, d]
    for i in range(250):  # an op holds 200 calls at most: the script's commands stay bounded
        ops.outbox(False, due, b"x%d" % i, b"m", "/v2/track", b"{}", 1, NOW + 2)
    assert [len(op) for op in ops.ops[-2:]] == [3 + 5 * 200, 3 + 5 * 50]


async def test_a_commit_reaches_a_redis_that_forgot_its_script(
    store: RedisStore, redis_server: RedisServer
) -> None:
    # a Redis restarted without its scripts: the commit sends the script again
    p = partition_of(SOURCE.id, "u1", P)
    keys = [key("m0"), key("m1")]
    assert await store.transact(lambda tx: tx.state.remember(keys), NOW, p) == set()
    redis_server.client().script_flush()
    assert await store.transact(lambda tx: tx.state.remember(keys), NOW, p) == set(keys)
    assert await store.transact(lambda tx: tx.state.remember([key("m2")]), NOW, p) == set()


async def test_an_error_reply_among_a_turns_reads_raises_and_the_connection_stays_usable(
    store: RedisStore, redis_server: RedisServer
) -> None:
    from redis.exceptions import ResponseError

    from gateway.store.redis.wire import commands_sync

    assert store.sync is not None
    c = redis_server.client()
    c.set("plain", "x")
    c.sadd("set", "a")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        commands_sync(store.sync, [("SMISMEMBER", "set", "a"), ("SMISMEMBER", "plain", "a"),
                                   ("SMISMEMBER", "set", "b")])
    # every reply was read: the pooled connection answers the next commands in step
    for _ in range(3):
        assert commands_sync(store.sync, [("SMISMEMBER", "set", "a", "b"), ("GET", "plain")]) \
            == [[1, 0], b"x"]
