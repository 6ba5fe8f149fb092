"""Commands packed in C and sent on one pooled connection, for the hot paths of one Redis
node (a request's XADDs, the pipeline's stream, account and outbox reads, admin's counts;
on the sync side, a partition turn's reads and its commit script).

redis-py's asyncio pipeline packs each argument in Python and parses each reply through
its callbacks, with a timeout context per reply: for ingest's dozens of XADDs a request
that was most of the front's CPU. Here the commands are packed by `hiredis.pack_command`,
written at once, and their replies read raw (as hiredis parses them: bytes, lists, and
maps where the connection speaks RESP3), with the client's retries: a dead pooled connection (Redis restarted, a failover) is reopened and the
commands sent again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.cluster import RedisCluster as SyncCluster
from redis.exceptions import NoScriptError

# hiredis's stub types its argument as a 1-tuple; it takes any number of them
pack = cast(Callable[[tuple[str | bytes | int, ...]], bytes], hiredis.pack_command)


def text(value: Any) -> str:
    """A reply's value (bytes from the raw path, text from redis-py's) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def bulk(value: bytes) -> bytes:
    """One argument of a command in RESP (a bulk string), as `pack` writes each."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


async def exchange(client: aioredis.Redis, packed: bytes, replies: int) -> list[Any]:
    """Send `packed` (commands in RESP) on one pooled connection and read `replies`
    replies. An error reply is raised (as redis-py raises it), after every reply is read
    or the connection dropped, so that the pool gets no connection with replies pending."""
    pool: Any = client.connection_pool  # (redis-py leaves get_connection untyped)
    conn = await pool.get_connection()

    async def send() -> list[Any]:
        try:
            await conn.send_packed_command(packed)
            return [await conn.read_response() for _ in range(replies)]
        except BaseException:
            # replies may be left unread (an error reply, a cancelled request): the
            # connection must not go back to the pool as it is
            await conn.disconnect()
            raise

    try:
        out: list[Any] = await conn.retry.call_with_retry(send, lambda _: conn.disconnect())
    finally:
        await pool.release(conn)
    for reply in out:
        if isinstance(reply, Exception):
            raise reply
    return out


async def commands(
    client: aioredis.Redis | AsyncCluster, commands: list[tuple[str | bytes | int, ...]]
) -> list[Any]:
    """`commands` in one round trip, their replies raw: on one node packed in C on one
    connection, on a Cluster a pipeline (each command routed by its key)."""
    if not commands:
        return []
    if isinstance(client, AsyncCluster):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()
    return await exchange(client, b"".join(map(pack, commands)), len(commands))


def exchange_sync(client: redis.Redis, packed: bytes, replies: int) -> list[Any]:
    """`exchange` on a sync client (a partition turn runs in a thread): the same retries,
    the same care that no connection goes back to the pool with replies unread."""
    pool: Any = client.connection_pool
    conn = pool.get_connection()

    def send() -> list[Any]:
        try:
            conn.send_packed_command([packed])  # (bytes alone it would send byte by byte)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:  # the others' replies are still to read
                    # without its traceback: the frames it holds hold `out`, a cycle that
                    # would keep the turn calling (its ops) until the collector's full pass
                    out.append(exc.with_traceback(None))
            return out
        except BaseException:
            conn.disconnect()
            raise

    try:
        out: list[Any] = conn.retry.call_with_retry(send, lambda _: conn.disconnect())
    finally:
        pool.release(conn)
    error = next((reply for reply in out if isinstance(reply, Exception)), None)
    if error is not None:
        try:
            raise error
        finally:
            del error, out  # (the same cycle, through this frame)
    return out


def commands_sync(
    client: redis.Redis | SyncCluster, commands: list[tuple[str | bytes | int, ...]]
) -> list[Any]:
    """`commands` on a sync client (a partition turn's reads)."""
    if not commands:
        return []
    if isinstance(client, SyncCluster):
        pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())
    return exchange_sync(client, b"".join(map(pack, commands)), len(commands))


class SyncScript:
    """A Lua script called by its SHA from a sync client, its arguments packed in C.

    redis-py's `Script` encodes each argument in Python before packing them: a commit of a
    thousand events has about ten thousand. A Redis that forgot the script (restarted) is
    sent it again. On a Cluster, redis-py's `Script` routes it by its keys."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self._cluster: Any = None  # redis-py's Script, on a Cluster

    def __call__(self, *, keys: list[Any], args: list[Any], client: Any) -> Any:
        if isinstance(client, SyncCluster):
            if self._cluster is None:
                self._cluster = client.register_script(self.text)
            return self._cluster(keys=keys, args=args, client=client)
        packed = pack(("EVALSHA", self.sha, len(keys), *keys, *args))
        try:
            return exchange_sync(client, packed, 1)[0]
        except NoScriptError:
            client.script_load(self.text)
            return exchange_sync(client, packed, 1)[0]
