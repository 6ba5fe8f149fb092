"""Commands packed in C and sent on one pooled connection, for the hot paths of one Redis
node (a request's XADDs, the pipeline's stream, account and outbox reads, admin's counts).

redis-py's asyncio pipeline packs each argument in Python and parses each reply through
its callbacks, with a timeout context per reply: for ingest's dozens of XADDs a request
that was most of the front's CPU. Here the commands are packed by `hiredis.pack_command`,
written at once, and their replies read raw (as hiredis parses them: bytes, lists, and
maps where the connection speaks RESP3), with the client's retries: a dead pooled connection (Redis restarted, a failover) is reopened and the
commands sent again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis

# hiredis's stub types its argument as a 1-tuple; it takes any number of them
pack = cast(Callable[[tuple[str | bytes | int, ...]], bytes], hiredis.pack_command)


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
