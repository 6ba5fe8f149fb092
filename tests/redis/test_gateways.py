"""Real gateways (`pipeline = "process"`, the default) on one real redis-server: two of them
divide the partitions and keep the ledger exact with SDK retries landing on the other one;
one of them rides out Redis going away (503 with Retry-After, not ready) and comes back by
itself; one applies the entries older versions left in the streams."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.store.redis.partition import inbox_key, split, waiting_key
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import WRITE_KEY, Running, basic, eventually, running, settings_for
from tests.redis.redis_support import RedisClusterNodes, RedisServer

P = 8
TS = "2026-11-20T10:00:00.000Z"


def redis_settings(mock: MockAccoilServer, data: Path, url: str) -> Settings:
    return settings_for(mock.url, data, pipeline="process", store="redis", redis_url=url,
                        partitions=P)


def tracks(start: int, n: int, users: int = 20) -> dict[str, Any]:
    return {"batch": [
        {"type": "track", "messageId": f"m{i}", "userId": f"u{i % users}", "event": "Built",
         "timestamp": TS}
        for i in range(start, start + n)
    ]}


async def owned(gw: Running) -> int:
    text = await (await gw.http.get(gw.url + "/metrics")).text()
    found = re.search(r"^accoil_gateway_partitions_owned (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


async def counters(gw: Running) -> dict[str, float]:
    """The pipeline's stream reads, entries read and partition commits, from /metrics."""
    text = await (await gw.http.get(gw.url + "/metrics")).text()
    out = {}
    for name in ("inbox_reads", "inbox_entries_read", "partition_commits"):
        found = re.search(rf"^accoil_gateway_{name}_total (\S+)$", text, re.M)
        assert found, f"no accoil_gateway_{name}_total in /metrics"
        out[name] = float(found.group(1))
    return out


async def test_two_gateways_divide_the_partitions_and_the_ledger_is_exact(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url
    async with running(redis_settings(mock_accoil, tmp_path / "a", url)) as a, \
            running(redis_settings(mock_accoil, tmp_path / "b", url)) as b:

        async def divided() -> bool:
            return (await owned(a), await owned(b)) == (P // 2, P // 2)

        await eventually(divided, timeout=20)
        for i in range(10):
            first, other = (a, b) if i % 2 else (b, a)
            body = tracks(i * 50, 50)
            assert (await first.post("/v1/batch", body))[0] == 200
            if i % 3 == 0:
                # an SDK retry of the same batch, landing on the other gateway
                assert (await other.post("/v1/batch", body))[0] == 200
        await a.idle(timeout=30)
        await b.idle(timeout=30)
        status, ledger = await b.admin("GET", "/admin/ledger")
        status_a, stats = await a.admin("GET", "/admin/stats")
        # 20 users over 8 partitions: each gateway read entries of its 4 and committed them
        # (the worker's counters, through the front's /metrics)
        for gw in (a, b):
            c = await counters(gw)
            assert c["inbox_entries_read"] >= c["inbox_reads"] >= 1
            assert c["partition_commits"] >= 1
    assert status == 200 and status_a == 200
    assert sum(r["count"] for r in ledger["ledger"]) == 500
    assert {r["userId"]: r["count"] for r in ledger["ledger"]} == {f"u{u}": 25 for u in range(20)}
    assert stats["ledger"] == {"rows": 20, "events": 500}
    assert stats["inbox_messages"] == 0 and stats["outbox_calls"] == 0
    assert sum(mock_accoil.count(f"u{u}", "Built") for u in range(20)) == 500


async def test_redis_down_answers_503_and_the_gateway_recovers_by_itself(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_server: RedisServer
) -> None:
    async with running(redis_settings(mock_accoil, tmp_path, redis_server.url)) as gw:
        assert (await gw.post("/v1/batch", tracks(0, 10)))[0] == 200
        await gw.idle()
        redis_server.kill()

        async def not_ready() -> bool:
            async with gw.http.get(gw.url + "/readyz") as resp:
                return resp.status == 503 and (await resp.json())["reason"] == "Redis unreachable"

        await eventually(not_ready, timeout=10)
        async with gw.http.post(gw.url + "/v1/batch", json=tracks(10, 10),
                                headers={"Authorization": basic(WRITE_KEY)}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
        redis_server.start()

        async def ready() -> bool:
            async with gw.http.get(gw.url + "/readyz") as resp:
                return resp.status == 200

        await eventually(ready, timeout=10)
        # the SDK's retry of the refused batch, and more
        assert (await gw.post("/v1/batch", tracks(10, 10)))[0] == 200
        assert (await gw.post("/v1/batch", tracks(20, 10)))[0] == 200
        await gw.idle(timeout=30)
    assert sum(mock_accoil.count(f"u{u}", "Built") for u in range(20)) == 30


async def test_a_gateway_on_a_redis_cluster(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_cluster: RedisClusterNodes
) -> None:
    # P = 8 partitions spread over 3 primaries: every turn's commit script and every
    # outcome runs on the node of its partition's slot
    async with running(redis_settings(mock_accoil, tmp_path, redis_cluster.url)) as gw:
        assert (await gw.post("/v1/batch", tracks(0, 100)))[0] == 200
        assert (await gw.post("/v1/batch", tracks(50, 100)))[0] == 200  # half of it again
        await gw.idle(timeout=30)
        status, stats = await gw.admin("GET", "/admin/stats")
    assert status == 200 and stats["ledger"] == {"rows": 20, "events": 150}
    assert sum(mock_accoil.count(f"u{u}", "Built") for u in range(20)) == 150


async def test_entries_an_older_version_wrote_apply_beside_new_ones(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_server: RedisServer
) -> None:
    # a stream written by gateways before the entry of several records: one of four fields
    # (s, t, n, b), then one of one field `d` (a part a record); then this version's gateway
    # starting on it and writing its own entries (several requests' parts in one) after them
    c = redis_server.client()
    c.set("{gw}:partitions", P)
    for start in (0, 40):
        for p, (part, count) in split("main", json.dumps(tracks(start, 40)).encode(), P).items():
            at = repr(time.time())
            if start:
                c.xadd(inbox_key(p), {"d": b"%d %s 4 main%s" % (count, at.encode(), part)})
            else:
                c.xadd(inbox_key(p), {"s": "main", "t": at, "n": count, "b": part})
            c.incrby(waiting_key(p), count)
    async with running(redis_settings(mock_accoil, tmp_path, redis_server.url)) as gw:
        sent = await asyncio.gather(*(gw.post("/v1/batch", tracks(80 + k * 10, 10))
                                      for k in range(4)))
        assert [status for status, *_ in sent] == [200] * 4
        assert (await gw.post("/v1/batch", tracks(0, 10)))[0] == 200  # a retry: dedupe holds
        await gw.idle(timeout=30)
        status, ledger = await gw.admin("GET", "/admin/ledger")
        _, stats = await gw.admin("GET", "/admin/stats")
    assert status == 200
    assert {r["userId"]: r["count"] for r in ledger["ledger"]} == {f"u{u}": 6 for u in range(20)}
    assert stats["inbox_messages"] == 0
    assert sum(mock_accoil.count(f"u{u}", "Built") for u in range(20)) == 120
    for p in range(P):
        assert c.xlen(inbox_key(p)) == 0  # every entry, old and new, applied and trimmed
