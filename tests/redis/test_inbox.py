"""The Redis inbox against a real redis-server: split, pipelined XADD, read back after a
cursor, fenced commits, WAIT on a real replica, 503 when Redis is down, nothing acknowledged
lost across kill -9 with appendfsync always; on a 3-primary Cluster too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.backlog import Backlog
from gateway.config import Settings, Source
from gateway.ingest.routes import Ingest
from gateway.observability.metrics import Metrics
from gateway.segment import InvalidBody, decode_batch
from gateway.store.redis.connect import (
    Client,
    PartitionCountMismatch,
    RedisUnavailable,
    claim_partitions,
    connect,
)
from gateway.store.redis.inbox import START, InboxUnavailable, RedisInbox
from gateway.store.redis.lease import Leases
from gateway.store.redis.partition import inbox_key, partition_of, progress_key, split
from tests.redis.redis_support import RedisClusterNodes, RedisServer

P = 64
WRITE_KEY = "wk_redis_inbox_1"


def body(n: int, users: int, start: int = 0) -> bytes:
    return json.dumps({"batch": [
        {"type": "track", "event": "E", "userId": f"user_{i % users}", "messageId": f"m{i}"}
        for i in range(start, start + n)
    ]}).encode()


async def read_all(inbox: RedisInbox) -> dict[int, list[str]]:
    """Every partition's messageIds, in stream order."""
    out: dict[int, list[str]] = {}
    for p in range(P):
        for entry in await inbox.read(p, START, 10_000):
            out.setdefault(p, []).extend(
                str(m.messageId) for m in decode_batch(entry.body).messages)
    return out


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Client]:
    c = await connect(redis_server.url)
    yield c
    await c.aclose()


async def test_a_batch_lands_split_by_user_in_order(client: Client) -> None:
    inbox = RedisInbox(client, P)
    ids = await inbox.append("web", 1_700_000_000.5, body(200, users=50))
    assert len(ids) == len({partition_of("web", f"user_{u}", P) for u in range(50)})
    stored = await read_all(inbox)
    assert set(stored) == set(ids)
    assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(200))
    for p, ms in stored.items():
        assert ms == sorted(ms, key=lambda m: int(m[1:]))  # the client's order, per partition
        entry = (await inbox.read(p, START, 1))[0]
        assert (entry.id, entry.source, entry.received_at) == (ids[p], "web", 1_700_000_000.5)
        assert entry.count == len(ms)


async def test_reading_after_a_cursor_and_the_fenced_commit(
    client: Client, redis_server: RedisServer
) -> None:
    inbox = RedisInbox(client, P)
    p = partition_of("web", "user_0", P)
    ids = [(await inbox.append("web", time.time(), body(1, 1, start=i)))[p] for i in range(5)]
    assert [e.id for e in await inbox.read(p, ids[1], 10)] == ids[2:]
    assert [e.id for e in await inbox.read(p, START, 2)] == ids[:2]

    # nobody holds the lease: refused, nothing moves
    assert not await inbox.commit(p, ids[2], "nobody", 1)
    assert await inbox.progress(p) == START
    leases = Leases(client, P, member="a", ttl=5)
    owned = await leases.tick()
    assert not await inbox.commit(p, ids[2], "a", owned[p] + 1)  # a wrong epoch
    assert await inbox.commit(p, ids[2], "a", owned[p])
    assert await inbox.progress(p) == ids[2]
    # the applied entries are trimmed: the stream's length is the lag
    assert (await inbox.lag([p])) == {p: 2}
    assert [e.id for e in await inbox.read(p, await inbox.progress(p), 10)] == ids[3:]
    # the cursor never goes back
    assert await inbox.commit(p, ids[0], "a", owned[p])
    assert await inbox.progress(p) == ids[2]
    with redis_server.client() as c:
        assert c.get(progress_key(p)) == ids[2].encode()


async def test_redis_down_raises_then_recovers_by_itself(
    client: Client, redis_server: RedisServer
) -> None:
    inbox = RedisInbox(client, P)
    await inbox.append("web", time.time(), body(10, 3))
    redis_server.kill()
    with pytest.raises(InboxUnavailable, match="Redis did not take the request"):
        await inbox.append("web", time.time(), body(10, 3, start=10))
    redis_server.start()
    # the same client reconnects; with appendfsync everysec a SIGKILL may lose up to a
    # second of writes, so only the write after the restart is checked here
    ids = await inbox.append("web", time.time(), body(10, 3, start=20))
    stored = await read_all(inbox)
    assert {f"m{i}" for i in range(20, 30)} <= {m for ms in stored.values() for m in ms}
    assert set(ids) <= set(stored)


async def test_appendfsync_always_keeps_every_acknowledged_batch_across_kill_9(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(appendfsync="always")
    client = await connect(server.url)
    try:
        inbox = RedisInbox(client, P)
        acknowledged: set[str] = set()
        for k in range(50):
            await inbox.append("web", time.time(), body(20, 7, start=k * 20))
            acknowledged |= {f"m{i}" for i in range(k * 20, k * 20 + 20)}
        server.kill()  # SIGKILL right after the last acknowledgement
        server.start()
        stored = await read_all(inbox)
        assert {m for ms in stored.values() for m in ms} == acknowledged
    finally:
        await client.aclose()


@asynccontextmanager
async def out_of_memory(client: Client) -> AsyncIterator[None]:
    """Redis refusing writes (OOM under noeviction) while inside, as it does in production
    when full: a maxmemory far below what it already uses."""
    await client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        await client.config_set("maxmemory", 0)


async def test_a_request_redis_refuses_writes_none_of_its_parts(client: Client) -> None:
    """One node: a request's parts are one script, so a refusal (OOM under noeviction)
    writes none of them, and the connection that carried the error serves the next."""
    inbox = RedisInbox(client, P)
    batch = body(100, users=40)
    async with out_of_memory(client):
        with pytest.raises(InboxUnavailable, match="maxmemory"):
            await inbox.append("web", time.time(), batch)
        assert await read_all(inbox) == {}
        waiting = [k async for k in client.scan_iter(match="*:waiting")]
        assert waiting == []
    ids = await inbox.append("web", time.time(), batch)
    assert len(ids) > 10  # many parts, all written
    stored = await read_all(inbox)
    assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(100))


async def test_concurrent_requests_go_in_one_group_and_each_gets_its_own_parts(
    client: Client,
) -> None:
    # requests that come while none is out go together in one script (group commit); each
    # is told its own entries (append) or its own count of parts (accept)
    inbox = RedisInbox(client, P)
    before = (await client.info("commandstats")).get("cmdstat_eval", {}).get("calls", 0)
    bodies = [body(20, 7, start=k * 20) for k in range(30)]
    outcomes = await asyncio.gather(*(
        inbox.append(f"src{k}", 1_700_000_000.0 + k, b) if k % 2 else
        inbox.accept(f"src{k}", 1_700_000_000.0 + k, b, 20)
        for k, b in enumerate(bodies)))
    after = (await client.info("commandstats"))["cmdstat_eval"]["calls"]
    assert after - before < len(bodies)  # fewer scripts than requests
    for k, outcome in enumerate(outcomes):
        parts = split(f"src{k}", bodies[k], P)
        if not k % 2:
            assert outcome == len(parts)
            continue
        assert isinstance(outcome, dict) and set(outcome) == set(parts)
        for p, entry_id in outcome.items():
            entry = (await inbox.read(p, START, 10_000))
            mine = [e for e in entry if e.id == entry_id]
            assert len(mine) == 1
            assert (mine[0].source, mine[0].received_at) == (f"src{k}", 1_700_000_000.0 + k)
            assert (mine[0].body, mine[0].count) == (parts[p][0], parts[p][1])
    stored = await read_all(inbox)
    assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(600))


async def test_a_groups_parts_of_one_partition_and_source_are_one_entry_in_order(
    client: Client,
) -> None:
    # one source's requests in one group: one entry a partition, holding each request's
    # part as a record (its own received_at and count), in the requests' order
    inbox = RedisInbox(client, P)
    bodies = [body(20, 7, start=k * 20) for k in range(10)]
    outcomes = await asyncio.gather(*(
        inbox.append("web", 1_700_000_000.0 + k, b) for k, b in enumerate(bodies)))
    parts = [split("web", b, P) for b in bodies]
    touched = {p for ps in parts for p in ps}
    lag = await inbox.lag(sorted(touched))
    assert sum(lag.values()) < sum(map(len, parts))  # fewer entries than parts
    for p in touched:
        records = await inbox.read(p, START, 10_000)
        mine = [(k, ps[p]) for k, ps in enumerate(parts) if p in ps]
        assert [(r.received_at, r.body, r.count) for r in records] == [
            (1_700_000_000.0 + k, part, n) for k, (part, n) in mine]
        assert [r.id for r in records] == [outcomes[k][p] for k, _ in mine]
        assert lag[p] == len({r.id for r in records})
    stored = await read_all(inbox)
    for ms in stored.values():
        assert ms == sorted(ms, key=lambda m: int(m[1:]))
    assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(200))


async def test_a_group_redis_refuses_fails_every_request_in_it_and_writes_none(
    client: Client,
) -> None:
    inbox = RedisInbox(client, P)
    async with out_of_memory(client):
        outcomes = await asyncio.gather(
            *(inbox.accept("web", time.time(), body(20, 7, start=k * 20), 20) for k in range(10)),
            return_exceptions=True)
        assert all(isinstance(o, InboxUnavailable) and "maxmemory" in str(o) for o in outcomes)
        assert await read_all(inbox) == {}
    assert await inbox.accept("web", time.time(), body(20, 7), 20) == len(split("web", body(20, 7), P))


async def test_a_request_given_up_before_its_group_left_is_not_written(client: Client) -> None:
    inbox = RedisInbox(client, P)
    kept = asyncio.ensure_future(inbox.append("web", time.time(), body(10, 3)))
    dropped = asyncio.ensure_future(inbox.append("web", time.time(), body(10, 3, start=10)))
    await asyncio.sleep(0)  # both queued, their group not yet sent
    dropped.cancel()
    ids = await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    stored = await read_all(inbox)
    assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(10))
    assert set(ids) == set(stored)


async def test_wait_without_a_replica_is_refused(client: Client) -> None:
    inbox = RedisInbox(client, P, wait_replicas=1, wait_timeout_ms=50)
    with pytest.raises(InboxUnavailable, match="only 0 of 1 replicas acknowledged the write"):
        await inbox.append("web", time.time(), body(5, 2))


async def test_wait_with_a_real_replica(
    redis_factory: Callable[..., RedisServer],
) -> None:
    primary, replica = redis_factory(), redis_factory()
    with replica.client() as c:
        c.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 10
        while c.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never connected"
            await asyncio.sleep(0.05)
    client = await connect(primary.url)
    try:
        inbox = RedisInbox(client, P, wait_replicas=1, wait_timeout_ms=5000)
        ids = await inbox.append("web", time.time(), body(30, 5))
        # acknowledged means on the replica already: no waiting here
        with replica.client() as c:
            for p, entry_id in ids.items():
                last = c.xrevrange(inbox_key(p), count=1)
                assert last[0][0].decode() == entry_id
    finally:
        await client.aclose()


async def test_the_partition_count_is_fixed_at_the_first_start(client: Client) -> None:
    assert await claim_partitions(client, 64) == 64
    assert await claim_partitions(client, 64) == 64
    with pytest.raises(PartitionCountMismatch) as info:
        await claim_partitions(client, 32)
    assert str(info.value) == (
        "partitions: this gateway has 32, but the deployment on this Redis started with 64 "
        "(key {gw}:partitions); the count is fixed when a deployment first starts: set "
        "partitions = 64, or start on an empty Redis")


async def test_connect_names_the_server_without_the_password() -> None:
    from tests.redis.redis_support import free_port

    url = f"redis://:redis_secret_pw_1@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable) as info:
        await connect(url)
    assert "redis_secret_pw_1" not in str(info.value)
    assert str(info.value).startswith(f"cannot reach Redis at {url.replace(':redis_secret_pw_1@', '')}")


# -- ingest on the Redis inbox: 200 only when written, 503 with Retry-After when not -------


@pytest.fixture
async def ingest(client: Client) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = Settings(sources=[Source(write_key=WRITE_KEY, accoil_api_key="ak_redis_inbox_1",
                                        name="web")], retry_after=7)
    # the Redis inbox plays the store's `accept` role; applying is not built yet
    inbox: Any = RedisInbox(client, P)
    handler = Ingest(settings, inbox, Backlog(10_000), Metrics(["web"]), lambda: True, lambda: False)
    app = web.Application()
    app.add_routes(handler.routes())
    async with TestClient(TestServer(app, host="127.0.0.1")) as http:
        yield http


async def test_ingest_answers_200_when_written_and_503_when_redis_is_down(
    ingest: TestClient[web.Request, web.Application], redis_server: RedisServer,
) -> None:
    auth = {"Authorization": "Basic d2tfcmVkaXNfaW5ib3hfMTo="}  # wk_redis_inbox_1:
    resp = await ingest.post("/v1/batch", data=body(50, 9), headers=auth)
    assert resp.status == 200, await resp.text()
    with redis_server.client() as c:
        total = sum(c.xlen(inbox_key(p)) for p in range(P))
    assert total == len({partition_of("web", f"user_{u}", P) for u in range(9)})

    redis_server.kill()
    resp = await ingest.post("/v1/batch", data=body(50, 9, start=50), headers=auth)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "7"
    assert (await resp.json())["error"] == "store unavailable: retry later"

    redis_server.start()
    resp = await ingest.post("/v1/batch", data=body(50, 9, start=100), headers=auth)
    assert resp.status == 200


def test_a_body_too_deep_to_split_is_invalid_not_unavailable() -> None:
    """msgspec's depth limit moves with the caller's stack, so a body ingest's check read may
    be too deep for the split a few frames further down: that is the body's fault (a 400),
    never a store failure (a 503 the SDK would retry for ever)."""
    nested = b"[" * 5000 + b"]" * 5000
    deep = b'{"batch":[{"type":"track","userId":"a","event":"e","x":%s},' \
           b'{"type":"track","userId":"b","event":"e"}]}' % nested
    with pytest.raises(InvalidBody, match="^body is nested too deeply$"):
        split("web", deep, P)


# -- the Cluster ---------------------------------------------------------------------------


async def test_cluster_append_groups_per_node_and_reads_back(
    redis_cluster: RedisClusterNodes,
) -> None:
    client = await connect(redis_cluster.url)
    try:
        from redis.asyncio.cluster import RedisCluster

        assert isinstance(client, RedisCluster)
        assert await claim_partitions(client, P) == P
        with pytest.raises(PartitionCountMismatch):
            await claim_partitions(client, P * 2)
        inbox = RedisInbox(client, P)
        ids = await inbox.append("web", time.time(), body(300, 64))
        # the partitions written live on all three primaries
        nodes = {client.get_node_from_key(inbox_key(p)).name for p in ids}  # type: ignore[union-attr]
        assert len(nodes) == 3
        stored = await read_all(inbox)
        assert sorted(m for ms in stored.values() for m in ms) == sorted(f"m{i}" for i in range(300))
        # a fenced commit on a Cluster: the lease, epoch, progress and stream share a slot
        leases = Leases(client, P, member="a", ttl=5)
        owned = await leases.tick()
        p = next(iter(ids))
        assert await inbox.commit(p, ids[p], "a", owned[p])
        assert await inbox.lag([p]) == {p: 0}
        # written, not acknowledged: the parts stay (harmless, deduplicated at apply)
        # WAIT with no replicas on a Cluster: refused per node, as on one server
        waiting = RedisInbox(client, P, wait_replicas=1, wait_timeout_ms=50)
        with pytest.raises(InboxUnavailable, match="replicas acknowledged"):
            await waiting.append("web", time.time(), body(30, 10))
        assert sum((await inbox.lag(list(range(P)))).values()) == len(ids) - 1 + len(
            {partition_of("web", f"user_{u}", P) for u in range(10)})
    finally:
        await client.aclose()


@pytest.mark.slow  # waits out the command timeout twice (about 9 s)
async def test_cluster_node_down_is_a_clear_error(
    redis_cluster: RedisClusterNodes,
) -> None:
    client = await connect(redis_cluster.url)
    node = redis_cluster.nodes[2]
    try:
        inbox = RedisInbox(client, P)
        await inbox.append("web", time.time(), body(100, 64))
        node.pause()  # a primary that stops answering (no replica to fail over to)
        try:
            with pytest.raises(InboxUnavailable):
                await asyncio.wait_for(inbox.append("web", time.time(), body(100, 64)), 60)
        finally:
            node.resume()
    finally:
        await client.aclose()


def _node_id(node: RedisServer) -> str:
    with node.client() as c:
        return str(c.execute_command("CLUSTER MYID").decode())


async def test_cluster_resharding_ask_then_moved(redis_cluster: RedisClusterNodes) -> None:
    """A partition's slot migrates while ingest writes: during the migration the new stream
    is on the target (ASK, answered with ASKING); after it, the stale slot map is corrected
    (MOVED, the map reloaded). No request is refused and every message is read back."""
    client = await connect(redis_cluster.url)
    try:
        from redis.asyncio.cluster import RedisCluster

        assert isinstance(client, RedisCluster)
        inbox = RedisInbox(client, P)
        p = partition_of("web", "user_0", P)
        slot = client.keyslot(inbox_key(p))
        owner = client.get_node_from_key(inbox_key(p))
        assert owner is not None
        source = next(n for n in redis_cluster.nodes if n.port == int(owner.port))
        target = next(n for n in redis_cluster.nodes if n is not source)
        with source.client() as s, target.client() as t:
            t.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", _node_id(source))
            s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", _node_id(target))
        # the stream does not exist on the source yet: the source answers ASK
        first = await inbox.append("web", time.time(), body(3, 1, start=0))
        assert set(first) == {p}
        with target.client() as t:
            assert t.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1
        # the migration ends: every node learns the slot's new owner; the client's map is stale
        # in redis-cli --cluster reshard's order: the target, the source, then the others
        others = [n for n in redis_cluster.nodes if n is not source and n is not target]
        for node in (target, source, *others):
            with node.client() as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", _node_id(target))
        second = await inbox.append("web", time.time(), body(3, 1, start=3))
        assert set(second) == {p}
        owner = client.get_node_from_key(inbox_key(p))
        assert owner is not None and int(owner.port) == target.port  # the map was reloaded
        got = [m for e in await inbox.read(p, START, 10) for m in
               (str(x.messageId) for x in decode_batch(e.body).messages)]
        assert got == [f"m{i}" for i in range(6)]
    finally:
        await client.aclose()
