"""Connecting to Redis: one node or a Cluster, recognised by itself; and the deployment's
partition count, fixed at its first start."""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from gateway.loader import shown_url
from gateway.store.redis.partition import PARTITIONS_KEY

Client: TypeAlias = aioredis.Redis | RedisCluster

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 3.0  # XADD takes well under a millisecond; WAIT has its own, shorter bound
RETRIES = 3
# connections per process to one node; a command past them waits for one to come free
# (up to COMMAND_TIMEOUT) instead of failing: the stats gather a script per partition
POOL_SIZE = 100


class RedisUnavailable(Exception):
    """Redis could not be reached or refused a command; the message names the server
    without its credentials."""


class PartitionCountMismatch(Exception):
    """This gateway's `partitions` differs from the count the deployment started with."""


async def connect(url: str) -> Client:
    """A client for `url`: a `RedisCluster` when the server says cluster_enabled, else a
    plain one. Raises `RedisUnavailable`."""
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT,
        # a pooled connection found dead (Redis restarted, a failover) is reopened and the
        # command sent again, a few times within about half a second; a write sent twice
        # this way is a duplicate entry that dedupe by messageId drops at apply
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), RETRIES),
    }
    # redis-py's default pool raises "Too many connections" when all are in use (seen in
    # the gateways' logs around a Redis restart under load): this one makes a command
    # wait for a free one
    single = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=COMMAND_TIMEOUT, **options))
    try:
        info = await single.info("cluster")
    except RedisError as exc:
        await single.aclose()
        raise RedisUnavailable(f"cannot reach Redis at {shown_url(url)}: {exc}") from None
    if not info.get("cluster_enabled"):
        return single
    await single.aclose()
    cluster = RedisCluster.from_url(url, **options)
    try:
        await cluster.initialize()
    except RedisError as exc:
        await cluster.aclose()
        raise RedisUnavailable(f"cannot join the Redis Cluster at {shown_url(url)}: {exc}") from None
    return cluster


async def claim_partitions(client: Client, partitions: int) -> int:
    """Record the partition count at a deployment's first start; refuse another later.

    Every user's partition is `hash % P`: a gateway with another P would put the same user
    in two partitions, and dedupe and the ledger would stop being exact.
    """
    try:
        await client.set(PARTITIONS_KEY, partitions, nx=True)
        stored = await client.get(PARTITIONS_KEY)
    except RedisError as exc:
        raise RedisUnavailable(f"cannot read the partition count: {exc}") from None
    found = int(stored or 0)
    if found != partitions:
        raise PartitionCountMismatch(
            f"partitions: this gateway has {partitions}, but the deployment on this Redis "
            f"started with {found} (key {PARTITIONS_KEY}); the count is fixed when a "
            f"deployment first starts: set partitions = {found}, or start on an empty Redis"
        )
    return found
