"""Partition ownership against a real redis-server (and a 3-primary Cluster): even
division, rebalancing on join and leave, expiry of a silent member, and fencing of an owner
paused past its lease, by simulation and by a real SIGSTOP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from gateway.forward.limiter import Limit, Limiter
from gateway.store.redis.connect import Client, connect
from gateway.store.redis.inbox import RedisInbox
from gateway.store.redis.lease import Leases, assign
from gateway.store.redis.metrics import RedisMetrics
from gateway.store.redis.partition import epoch_key, lease_key
from tests.redis.redis_support import RedisClusterNodes, RedisServer

P = 64
TTL = 1.0


@pytest.mark.parametrize("n", range(1, 11))
def test_assign_divides_evenly_and_deterministically(n: int) -> None:
    members = [f"gw{i}" for i in range(n)]
    shares = assign(members, P)
    assert shares == assign(list(reversed(members)), P)
    sizes = [len(r) for r in shares.values()]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(p for r in shares.values() for p in r) == list(range(P))


def test_assign_more_members_than_partitions() -> None:
    shares = assign([f"gw{i}" for i in range(5)], 3)
    assert sorted(len(r) for r in shares.values()) == [0, 0, 1, 1, 1]
    assert assign([], 3) == {}


async def alive_for(members: list[Leases], seconds: float) -> None:
    """Let `seconds` pass with `members` heartbeating, as their `run()` would."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for m in members:
            await m.tick()
        await asyncio.sleep(TTL / 4)


async def settle(members: list[Leases], rounds: int = 4) -> None:
    """Tick every member in turn: a rebalance takes a release and then an acquire."""
    for _ in range(rounds):
        for m in members:
            await m.tick()


def check_division(members: list[Leases], sizes: list[int]) -> None:
    owned = [set(m.owned) for m in members]
    assert sorted(len(o) for o in owned) == sizes
    assert sorted(p for o in owned for p in o) == list(range(P))  # disjoint, complete


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Client]:
    c = await connect(redis_server.url)
    yield c
    await c.aclose()


def metrics() -> RedisMetrics:
    return RedisMetrics(CollectorRegistry())


async def test_join_and_leave_rebalance_evenly(client: Client) -> None:
    a = Leases(client, P, member="a", ttl=TTL, metrics=metrics())
    await a.tick()
    check_division([a], [64])
    b, c = (Leases(client, P, member=m, ttl=TTL, metrics=metrics()) for m in "bc")
    await settle([a, b])
    check_division([a, b], [32, 32])
    await settle([a, b, c])
    check_division([a, b, c], [21, 21, 22])
    assert a.members == ["a", "b", "c"]
    # a graceful leave hands over at the others' next ticks, not after the TTL
    await b.stop()
    await settle([a, c], rounds=2)
    check_division([a, c], [32, 32])
    assert a.metrics is not None
    assert a.metrics.owned._value.get() == 32
    family = next(iter(a.metrics.lease_changes.collect()))
    changes = {s.labels["change"]: s.value for s in family.samples if s.name.endswith("_total")}
    # a: all 64; 32-63 to b; 22-31 to c; 22-31 back when b leaves
    assert changes == {"acquired": 64 + 10, "released": 32 + 10, "lost": 0}


async def test_the_forwarding_shares_of_the_owners_never_add_up_past_one(
    client: Client,
) -> None:
    # each gateway scales its sources' caps to owned / P (`Limiter.set_share`): the leases
    # are exclusive, so the shares of all gateways together are at most 1, even mid-rebalance
    limiters = {m: Limiter(Limit(rate_per_second=64.0, max_concurrency=64)) for m in "abc"}

    def told(member: str) -> Callable[[int], None]:
        return lambda owned: limiters[member].set_share(owned / P)

    a, b, c = (Leases(client, P, member=m, ttl=TTL, on_owned=told(m)) for m in "abc")

    def shares() -> list[float]:
        return [limiters[m].limit.share for m in "abc"]

    await a.tick()
    assert shares() == [1.0, 1.0, 1.0]  # b and c not told anything yet: they start whole
    for m in (b, c):
        await m.tick()
        assert sum(len(x.owned) for x in (a, b, c)) <= P
    for _ in range(4):
        for m in (a, b, c):
            await m.tick()
            # mid-rebalance too: what each was told is what it holds
            assert shares() == [len(x.owned) / P for x in (a, b, c)]
            assert sum(shares()) <= 1.0
    assert sorted(shares()) == [21 / 64, 21 / 64, 22 / 64]
    assert sorted(limiters[m].limit.rate_per_second or 0 for m in "abc") == [21.0, 21.0, 22.0]
    await b.stop()
    assert limiters["b"].limit.share == 0.0
    await settle([a, c], rounds=2)
    assert shares() == [0.5, 0.0, 0.5]


async def test_a_silent_member_loses_its_partitions_after_the_ttl(client: Client) -> None:
    a, b, c = (Leases(client, P, member=m, ttl=TTL) for m in "abc")
    await settle([a, b, c])
    check_division([a, b, c], [21, 21, 22])
    # c stops heartbeating (crashed): until its TTL runs out its partitions stay its own
    await settle([a, b], rounds=1)
    assert len(a.owned) + len(b.owned) == 43  # c still holds its 21
    await alive_for([a, b], TTL + 0.2)
    await settle([a, b], rounds=2)
    check_division([a, b], [32, 32])
    assert a.members == ["a", "b"]


async def test_an_owner_paused_past_its_lease_is_fenced(client: Client) -> None:
    a = Leases(client, P, member="a", ttl=TTL)
    await a.tick()
    p = 5
    epoch = a.owned[p]
    assert a.holds(p) == epoch and await a.fence(p, epoch)
    inbox = RedisInbox(client, P)
    # a stops renewing (paused) past its TTL; b alone is alive and takes everything
    await asyncio.sleep(TTL + 0.1)
    b = Leases(client, P, member="b", ttl=TTL)
    await b.tick()
    assert b.owned[p] == epoch + 1
    # a wakes up with work for its old epoch: refused everywhere
    assert a.holds(p) is None  # its own clock already says so
    assert not await a.fence(p, epoch)
    entry = (await inbox.append("web", time.time(), b'{"batch":[{"type":"track","event":"E",'
                                b'"userId":"u","messageId":"m1"}]}'))
    q, entry_id = next(iter(entry.items()))
    assert not await inbox.commit(q, entry_id, "a", a.owned[q])
    assert await inbox.commit(q, entry_id, "b", b.owned[q])
    # and its next round finds the leases lost, not renewed
    await a.tick()
    assert a.owned == {}
    await b.tick()
    assert a.members == ["a", "b"]


async def test_the_epoch_outlives_the_lease(client: Client, redis_server: RedisServer) -> None:
    a = Leases(client, P, member="a", ttl=TTL)
    await a.tick()
    await asyncio.sleep(TTL + 0.1)
    with redis_server.client() as c:
        assert c.get(lease_key(0)) is None
        assert c.get(epoch_key(0)) == b"1"
    await a.tick()  # a's own lease gone: a new ownership, a new epoch
    assert a.owned[0] == 2


async def test_run_keeps_the_leases_and_survives_redis_restarts(
    client: Client, redis_server: RedisServer
) -> None:
    a = Leases(client, 8, member="a", ttl=0.6)
    task = asyncio.create_task(a.run())
    try:
        await asyncio.sleep(1.5)  # past two TTLs: renewed, not lost
        assert sorted(a.owned) == list(range(8))
        first = dict(a.owned)
        redis_server.kill()
        await asyncio.sleep(0.5)  # a round fails; logged, not fatal
        assert not task.done()
        redis_server.start()
        await asyncio.sleep(1.5)
        assert sorted(a.owned) == list(range(8))
        assert all(a.owned[p] >= first[p] for p in first)
    finally:
        await a.stop()
        task.cancel()
    with redis_server.client() as c:
        assert c.zcard("{gw}:members") == 0
        # no round in flight took a lease back after the leave
        assert [c.get(lease_key(p)) for p in range(8)] == [None] * 8
    assert a.owned == {}


# A gateway in a process of its own: takes every partition, then every 50 ms tries to commit
# partition 0's cursor under the epoch it took; prints each outcome as a JSON line.
_OWNER = """
import asyncio, json, sys, time
from gateway.store.redis.connect import connect
from gateway.store.redis.inbox import RedisInbox
from gateway.store.redis.lease import Leases

async def main():
    client = await connect(sys.argv[1])
    leases = Leases(client, 4, member="paused", ttl=float(sys.argv[2]))
    await leases.tick()
    epoch = leases.owned[0]
    inbox = RedisInbox(client, 4)
    print(json.dumps({"owned": sorted(leases.owned), "epoch": epoch}), flush=True)
    renewing = asyncio.create_task(leases.run())
    while True:
        ok = await inbox.commit(0, "1-0", "paused", epoch)
        print(json.dumps({"t": time.time(), "commit": ok}), flush=True)
        await asyncio.sleep(0.05)

asyncio.run(main())
"""


async def next_json(stream: asyncio.StreamReader) -> dict[str, Any]:
    """The next JSON line, past the process's log lines."""
    while True:
        line = await asyncio.wait_for(stream.readline(), 10)
        assert line, "the owner process ended"
        if line.startswith(b"{"):
            return cast(dict[str, Any], json.loads(line))


async def test_a_sigstopped_owner_is_refused_when_it_resumes(
    client: Client, redis_server: RedisServer
) -> None:
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWNER, redis_server.url, str(TTL),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert owner.stdout is not None
        first = await next_json(owner.stdout)
        assert first["owned"] == [0, 1, 2, 3]
        assert (await next_json(owner.stdout))["commit"] is True
        owner.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        await asyncio.sleep(TTL + 0.3)
        taker = Leases(client, 4, member="taker", ttl=30)
        await taker.tick()
        assert taker.owned[0] == first["epoch"] + 1
        owner.send_signal(signal.SIGCONT)
        # lines the paused process wrote before the stop are still in the pipe; every commit
        # it tries after it resumes is refused
        after: list[bool] = []
        while len(after) < 5:
            line = await next_json(owner.stdout)
            if line["t"] > stopped_at + TTL:
                after.append(line["commit"])
        assert after == [False] * 5
        assert await taker.fence(0, first["epoch"] + 1)
    finally:
        if owner.returncode is None:
            owner.send_signal(signal.SIGCONT)
            owner.kill()
        await asyncio.wait_for(owner.wait(), 10)


async def test_cluster_divides_and_fences(redis_cluster: RedisClusterNodes) -> None:
    client = await connect(redis_cluster.url)
    try:
        a, b, c = (Leases(client, P, member=m, ttl=TTL) for m in "abc")
        await settle([a, b, c])
        check_division([a, b, c], [21, 21, 22])
        p = next(iter(c.owned))
        epoch = c.owned[p]
        await alive_for([a, b], TTL + 0.2)  # c paused past its lease
        await settle([a, b], rounds=2)
        check_division([a, b], [32, 32])
        assert not await c.fence(p, epoch)
        owner = a if p in a.owned else b
        assert owner.owned[p] == epoch + 1 and await owner.fence(p, epoch + 1)
    finally:
        await client.aclose()


async def test_lag_is_reported_for_the_owned_partitions_only(client: Client) -> None:
    m = metrics()
    a = Leases(client, 4, member="a", ttl=TTL, metrics=m)
    inbox = RedisInbox(client, 4)
    await a.tick()
    for i in range(3):
        await inbox.append("web", time.time(), json.dumps({"batch": [
            {"type": "track", "event": "E", "userId": f"u{u}", "messageId": f"m{i}-{u}"}
            for u in range(8)]}).encode())
    m.set_lag(await inbox.lag(sorted(a.owned)))

    def lags() -> dict[str, float]:
        family = next(iter(m.lag.collect()))
        return {sample.labels["partition"]: sample.value for sample in family.samples}

    assert sum(lags().values()) == sum((await inbox.lag(list(range(4)))).values()) > 0
    assert set(lags()) == {"0", "1", "2", "3"}
    b = Leases(client, 4, member="b", ttl=TTL)
    await settle([a, b])
    m.set_lag(await inbox.lag(sorted(a.owned)))
    assert set(lags()) == {str(p) for p in a.owned} == {"0", "1"}


async def test_a_handoff_waits_for_the_revoked_partitions_before_releasing(
    client: Client,
) -> None:
    # Kafka's cooperative rebalance: the old owner is told which partitions it gives up
    # while it still holds them (its outcomes are recorded under its epoch), and the new
    # owner can take them only once that is done
    seen: list[tuple[list[int], float, list[Any], bool]] = []
    b = Leases(client, P, member="b", ttl=TTL)

    async def revoke(ps: list[int], within: float) -> set[int]:
        holders = [await client.get(lease_key(p)) for p in ps]
        # the joining member tries meanwhile: refused, the leases are still a's
        await b.tick()
        seen.append((ps, within, holders, bool(set(ps) & set(b.owned))))
        assert all(a.holds(p) is not None for p in ps)
        assert set(ps) <= a.leaving
        return set()

    a = Leases(client, P, member="a", ttl=TTL, on_revoke=revoke)
    await a.tick()
    assert len(a.owned) == P and seen == []
    await b.tick()  # b joins: half of the partitions are now b's share
    assert b.owned == {}
    await a.tick()
    [(ps, within, holders, taken)] = seen
    assert ps == list(range(32, 64))
    assert 0 < within <= TTL * 0.25
    assert holders == [b"a"] * 32 and not taken
    assert a.leaving == frozenset() and sorted(a.owned) == list(range(32))
    await b.tick()  # released: b takes them now
    check_division([a, b], [32, 32])
    # a graceful leave hands over the same way
    await a.stop()
    assert seen[-1][0] == list(range(32)) and seen[-1][2] == [b"a"] * 32


async def test_a_partition_whose_calls_are_not_recorded_is_kept_until_they_are(
    client: Client,
) -> None:
    # the old owner's outcomes for a leaving partition are not all recorded within the
    # handoff's wait (Redis restarting, or Accoil slower than the wait): released, those
    # calls would be sent again by the new owner. The partition stays the old owner's,
    # renewed, and goes at a later round, once they are recorded
    busy = {40}

    async def revoke(ps: list[int], within: float) -> set[int]:
        return set(ps) & busy

    a = Leases(client, P, member="a", ttl=TTL, on_revoke=revoke)
    b = Leases(client, P, member="b", ttl=TTL)
    await a.tick()
    await b.tick()
    await a.tick()
    assert sorted(a.owned) == [*range(32), 40] and a.leaving == frozenset()
    await b.tick()
    assert 40 not in b.owned and len(b.owned) == 31
    await a.tick()  # still not recorded: kept again, renewed
    await b.tick()
    assert 40 in a.owned and 40 not in b.owned
    assert await client.get(lease_key(40)) == b"a"
    busy.clear()
    await a.tick()
    await b.tick()
    check_division([a, b], [32, 32])
