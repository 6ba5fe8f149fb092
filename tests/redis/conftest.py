"""Fixtures: a real `redis-server` per test, a 3-primary Redis Cluster per module.

`redis_server` is AOF on with `appendfsync everysec`; a test that needs another level
asks `redis_factory(appendfsync="always")`. Every server is stopped when its test (or, for
the cluster, its module) ends, whatever happened to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis.redis_support import RedisClusterNodes, RedisServer, require_redis


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    require_redis()
    started: list[RedisServer] = []

    def make(*, appendfsync: str = "everysec") -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", appendfsync=appendfsync)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture(scope="module")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    require_redis()
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(_cluster: RedisClusterNodes) -> RedisClusterNodes:
    """The module's cluster, emptied for this test."""
    _cluster.flush()
    return _cluster
