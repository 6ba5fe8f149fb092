"""A Redis store closes, and a gateway on it stops, even when a cancellation is lost.

On Python 3.11 `asyncio.wait_for` can swallow a cancellation that lands in the same turn
of the loop as the future it waits for completes (CPython gh-86296, fixed in 3.12), and
redis-py sends every command through it (`Connection.send_packed_command`). A background
loop of the store (the reachability probe, the lease rounds) cancelled at that moment goes
on as if nothing happened, and a `close()` that awaited it once waited for ever: the front
of a gateway on a Redis Cluster hung that way at its stop in CI (the worker had released
its partitions, the front never logged "gateway stopped").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.config import Settings, Source
from gateway.store.redis.store import RedisStore
from gateway.tasks import stop_tasks
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import bounded, running, settings_for
from tests.redis.redis_support import RedisServer

SOURCE = Source(write_key="wk_redis_close_1", accoil_api_key="ak_redis_close_1", name="main")
BOUND = 15.0  # seconds a close may take here: its loops stop within a second or two


def swallowing(entered: asyncio.Event) -> Callable[[], Awaitable[bool]]:
    """A PING that answers once its caller was cancelled, as redis-py's does when the
    cancellation lands as its send completes: the race made certain."""

    async def ping() -> bool:
        entered.set()
        # the answer came in the same turn as the cancellation: wait_for returns it
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        return True

    return ping


@pytest.mark.parametrize("apply", [False, True], ids=["front", "pipeline"])
async def test_close_ends_a_probe_whose_cancellation_was_swallowed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, apply: bool
) -> None:
    store = RedisStore(Settings(sources=[SOURCE], store="redis", redis_url=redis_server.url,
                                partitions=4), apply=apply)
    await store.open()
    entered = asyncio.Event()
    monkeypatch.setattr(store.client, "ping", swallowing(entered))
    await asyncio.wait_for(entered.wait(), 10)  # the probe pings each second
    await bounded("RedisStore.close() with the probe's cancellation swallowed", store.close(),
                  BOUND)
    assert store.client is None


@pytest.mark.parametrize("pipeline", ["process", "inline"])
async def test_a_gateway_stops_when_its_probe_lost_the_cancellation(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch, pipeline: str,
) -> None:
    """The stop that hung in CI, made certain: the front's probe (in `inline`, the store
    the pipeline shares) answers its ping after the stop cancelled it."""
    settings = settings_for(mock_accoil.url, tmp_path, pipeline=pipeline, store="redis",
                            redis_url=redis_server.url, partitions=8)
    entered = asyncio.Event()
    async with running(settings) as gw:
        assert (await gw.post("/v1/track", {"userId": "u1", "event": "E", "messageId": "m1"}))[0] == 200
        await gw.idle(timeout=30)
        monkeypatch.setattr(gw.gateway.store.client, "ping", swallowing(entered))  # type: ignore[attr-defined]
        await asyncio.wait_for(entered.wait(), 10)
    # `running` bounds the stop: before the fix it failed there, naming runner.cleanup()
    assert mock_accoil.count("u1", "E") == 1


@pytest.mark.parametrize("pipeline", ["process", "inline"])
async def test_a_gateway_stops_whole_while_redis_is_down(
    mock_accoil: MockAccoilServer, tmp_path: Path, redis_server: RedisServer, pipeline: str,
) -> None:
    """Found killing Redis at odd moments: the stop read the store's counts for its last
    log line, and with Redis down that raised out of the stop before the store closed and
    the data folder's lock was released (its probe pinging on; a restart in the same
    process waiting for the lock)."""
    settings = settings_for(mock_accoil.url, tmp_path, pipeline=pipeline, store="redis",
                            redis_url=redis_server.url, partitions=8)
    async with running(settings) as gw:
        assert (await gw.post("/v1/track", {"userId": "u1", "event": "E", "messageId": "m1"}))[0] == 200
        await gw.idle(timeout=30)
        redis_server.kill()
    assert gw.gateway.store.client is None  # type: ignore[attr-defined]
    redis_server.start()
    async with running(settings) as again:  # the lock was released: it starts at once
        assert (await again.post("/v1/track", {"userId": "u2", "event": "E", "messageId": "m2"}))[0] == 200
        await again.idle(timeout=30)
    assert mock_accoil.count("u1", "E") == 1 and mock_accoil.count("u2", "E") == 1


async def test_stop_tasks_ends_redis_loops_cancelled_at_any_moment(
    redis_server: RedisServer,
) -> None:
    """The real race, no stand-in: a loop of commands through redis-py, cancelled at a
    random moment each time, ends every time (one `cancel()` and an `await` lose about a
    third of them on Python 3.11)."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=3.0)
    rng = random.Random(7)

    async def commands() -> None:
        while True:
            await client.get("k")

    try:
        for _ in range(200):
            task = asyncio.create_task(commands())
            await asyncio.sleep(rng.random() * 0.003)
            await bounded("stop_tasks on a loop of Redis commands", stop_tasks([task]), 5.0)
            assert task.done()
    finally:
        await client.aclose()
