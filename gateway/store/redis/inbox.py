"""The inbox in Redis: one stream per partition, `{p<n>}:inbox`.

Ingest's side (`append`): a request's stored body is split by partition and each part is
appended to its partition's stream with XADD, as a record of an entry of one field
(`entry_value`). On one node, the requests that come while a script is out go together in
the next one (group commit: `_send_queued`), and a group's parts of one partition and one
source are ONE entry of several records (`_entries`), each record keeping its request's
received_at, message count and body (whose envelope, sentAt and batch context, differ per
request): one XADD and INCRBY an entry, and one entry for the pipeline to read and route,
rather than one a part of about 2.5 events. A group's XADDs and INCRBYs run in one script,
`_APPEND`, sent as one command (its RESP built from fragments made once: `_pack_append`),
so a request is written whole or not at all. On a Cluster the parts go in one pipeline per
node, sent concurrently (a script's keys must share a slot), an entry of one record a part.
`WAIT` follows when `wait_replicas` is set, on the same connection. It returns only when
every part is written (and replicated); otherwise it raises `InboxUnavailable`, which
ingest answers with 503 and `Retry-After`.

Nothing is half acknowledged: a request is acknowledged only when all its parts are in.
When some parts were written and others not, the client is told to retry and sends the
whole batch again; the parts written twice carry the same messageIds, and the apply step
drops a messageId it has already seen (dedupe by (source, messageId), as for any SDK
retry). The early parts are therefore harmless.

The owner's side, without consumer groups: the owner of a partition reads the stream after
its committed cursor (`{p<n>}:progress`) with XRANGE, applies, then commits the cursor in
a fenced script that also trims what it applied (XTRIM MINID), so the stream's length is
the partition's lag. Consumer groups would keep a pending list per consumer, which a
fenced owner does not need: a new owner starts at the cursor, whatever the old one read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import msgspec
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, RedisError

from gateway.store.base import Record
from gateway.store.redis.connect import Client
from gateway.store.redis.lease import FENCE_LUA
from gateway.store.redis.partition import (
    epoch_key,
    inbox_key,
    lease_key,
    progress_key,
    split,
    waiting_key,
)
from gateway.store.redis.wire import bulk, exchange, pack, text

Parts = dict[int, tuple[bytes, int]]  # partition -> (part's body, messages), as `split` gives
# a request waiting for its group: its source, received_at (as written), parts, whether it
# wants the entry ids, its outcome
_Queued = tuple[bytes, bytes, Parts, bool, "asyncio.Future[dict[int, str] | int]"]
# an entry to append: partition, messages, value
_Entry = tuple[int, int, bytes]

START = "0-0"  # the cursor of a partition nothing was applied from
WAIT_TIMEOUT_MS = 1000
SENDS = 2  # groups of requests in flight at once to one node (`_send_queued`)
GROUP_PARTS = 2048  # parts a group takes (about 50 requests of 100 messages) before the next


class InboxUnavailable(Exception):
    """Redis did not take a request's messages: answer 503 with Retry-After."""


# An inbox entry is one field, `m`: the source (`<bytes of source> <source>`), then one record
# a request part: `<messages> <received_at> <bytes of body> <body>` (`entry_value`). Entries
# of older versions read too (`entry_records`), so that a stream written before an upgrade
# still applies: one field `d` of one record, `<messages> <received_at> <bytes of source>
# <source><body>`, and before it four fields: s (source), t (received_at), n (messages),
# b (body). One field rather than four: Redis parses, stores and logs to the AOF one value
# rather than four names and four values (17 to 19% fewer instructions in redis-server an
# event appended, measured with callgrind; BENCHMARKS.md, branch `redisingest`). Several
# records an entry: one stream entry, one INCRBY and one routed row for a group's parts of
# a partition rather than one each (BENCHMARKS.md, branch `redisentry`).
FIELD = b"m"
ONE = b"d"  # the one-record field of the version before (read, not written)


def entry_value(source: bytes, records: list[tuple[int, bytes, bytes]]) -> bytes:
    """The `m` field of an entry: the source, then each record's header and body as it is;
    `records` as (messages, received_at as written, body)."""
    out = [b"%d %s" % (len(source), source)]
    for count, received_at, body in records:
        out.append(b"%d %s %d " % (count, received_at, len(body)))
        out.append(body)
    return b"".join(out)


def entry_records(fields: list[bytes]) -> tuple[bytes, list[Record]]:
    """An entry's source and its records, from its fields as XREAD and XRANGE give them
    (name, value, name, value...): the layout written now or either older one."""
    if len(fields) == 2 and fields[0] == FIELD:
        value = fields[1]
        space = value.index(b" ")
        at = space + 1 + int(value[:space])
        source = value[space + 1:at]
        records: list[Record] = []
        end = len(value)
        while at < end:
            count, received_at, size, _ = value[at:at + 64].split(b" ", 3)
            at += len(count) + len(received_at) + len(size) + 3
            n = int(size)
            if at + n > end:
                raise ValueError("an inbox record runs past its entry")
            records.append((float(received_at), int(count), value[at:at + n]))
            at += n
        if not records:
            raise ValueError("an inbox entry without a record")
        return source, records
    if len(fields) == 2 and fields[0] == ONE:
        count, received_at, size, rest = fields[1].split(b" ", 3)
        n = int(size)
        return rest[:n], [(float(received_at), int(count), rest[n:])]
    f = dict(zip(fields[::2], fields[1::2], strict=True))
    return f[b"s"], [(float(f[b"t"]), int(f[b"n"]), f[b"b"])]


class Entry(msgspec.Struct, frozen=True):
    """A record as `RedisInbox.read` gives it: the records of one entry share its id."""

    id: str
    source: str
    received_at: float
    count: int
    body: bytes  # the part's batch body, decoded as `Decoded.body` is


# KEYS: lease, epoch, progress, inbox; ARGV: owner, epoch, entry id applied last. Moves the
# cursor forward (never back) and trims the applied entries.
_COMMIT = FENCE_LUA + """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local ms, seq = parse(ARGV[3])
local cur = redis.call('GET', KEYS[3])
if cur then
  local cms, cseq = parse(cur)
  if ms < cms or (ms == cms and seq <= cseq) then return 1 end
end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('XTRIM', KEYS[4], 'MINID', ms .. '-' .. (seq + 1))
return 1
"""


# KEYS: each entry's inbox stream and waiting counter, in pairs; ARGV: "ids" or "count" (what
# to answer), then each entry's message count and value (`entry_value`). Answers the
# entries' ids, or how many were written (ingest's case: no ids to build, send and parse).
# Atomic: a group's entries are all written or none (a script that cannot write, e.g. OOM
# under noeviction, fails at its first XADD).
_APPEND = """
local ids = ARGV[1] == 'ids' and {} or nil
for i = 1, #KEYS, 2 do
  local id = redis.call('XADD', KEYS[i], '*', 'm', ARGV[i + 2])
  redis.call('INCRBY', KEYS[i + 1], ARGV[i + 1])
  if ids then ids[#ids + 1] = id end
end
if ids then return ids end
return #KEYS / 2
"""
# EVAL, not EVALSHA: a restarted Redis needs no NOSCRIPT round (Redis caches the script by
# its digest; the text costs a few hundred bytes next to the body)
_EVAL = b"$4\r\nEVAL\r\n" + bulk(_APPEND.encode())
_ANSWER = {True: bulk(b"ids"), False: bulk(b"count")}


class RedisInbox:
    def __init__(
        self,
        client: Client,
        partitions: int,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
    ) -> None:
        self.client = client
        self.partitions = partitions
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._commit: AsyncScript = client.register_script(_COMMIT)
        # each partition's inbox and waiting keys, named (and packed) once: about 40 a request
        self._append_keys = [
            bulk(inbox_key(p).encode()) + bulk(waiting_key(p).encode()) for p in range(partitions)]
        # requests waiting for the next group to one node, and the groups' senders
        self._queued: deque[_Queued] = deque()
        self._senders: set[asyncio.Task[None]] = set()

    # -- ingest's side ---------------------------------------------------------------------

    async def append(self, source: str, received_at: float, body: bytes) -> dict[int, str]:
        """Write a request's messages, split by partition; the entry id of each part.
        Raises `InboxUnavailable` unless every part is written (and WAITed), and
        `InvalidBody` for a body too deeply nested to split (nothing written: a 400)."""
        written = await self._write(source, received_at, body, ids=True)
        assert isinstance(written, dict)
        return written

    async def accept(self, source: str, received_at: float, body: bytes, count: int) -> int:
        """Ingest's call (as `Store.accept`): `append`, answering how many parts it wrote."""
        written = await self._write(source, received_at, body, ids=False)
        return written if isinstance(written, int) else len(written)

    async def _write(
        self, source: str, received_at: float, body: bytes, *, ids: bool
    ) -> dict[int, str] | int:
        src = source.encode()
        at = repr(received_at).encode()
        parts = split(source, body, self.partitions)
        try:
            if isinstance(self.client, RedisCluster):
                return await self._append_cluster(self.client, {
                    p: (count, entry_value(src, [(count, at, part)]))
                    for p, (part, count) in parts.items()})
            return await self._append_single(src, at, parts, ids=ids)
        except (RedisError, OSError) as exc:
            raise InboxUnavailable(f"Redis did not take the request: {exc}") from None

    async def _append_single(
        self, source: bytes, received_at: bytes, parts: Parts, *, ids: bool
    ) -> dict[int, str] | int:
        """Queue the request for the next group to one node (`_send_queued`) and wait for
        its outcome."""
        assert not isinstance(self.client, RedisCluster)
        done: asyncio.Future[dict[int, str] | int] = asyncio.get_running_loop().create_future()
        self._queued.append((source, received_at, parts, ids, done))
        if len(self._senders) < SENDS:
            sender = asyncio.create_task(self._send_queued(), name="inbox-append")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await done

    async def _send_queued(self) -> None:
        """Send the queued requests, a group at a time, until none is left.

        Group commit: the requests that came in while a group was out go together in the
        next script, up to `GROUP_PARTS` parts, so that a burst's requests share one round
        trip (one pooled connection taken, one send, one reply) rather than each making
        its own: about half of the front's CPU an event in Redis mode, in-process
        (BENCHMARKS.md, branch `redisingest`). A group is one script, atomic: its requests
        are all written or none, so each request is still whole or not at all. A request
        given up (its client gone) before its group left is not sent."""
        queued = self._queued
        while queued:
            group: list[_Queued] = []
            size = 0
            while queued and (not group or size + len(queued[0][2]) <= GROUP_PARTS):
                waiter = queued.popleft()
                if not waiter[4].done():
                    group.append(waiter)
                    size += len(waiter[2])
            if group:
                await self._send_group(group)

    async def _send_group(self, group: list[_Queued]) -> None:
        """One script for the group's requests (and WAIT); each request's future told its
        entry ids or its count of parts, or `InboxUnavailable`."""
        assert not isinstance(self.client, RedisCluster)
        try:
            entries, where = _entries(group)
            packed = self._pack_append(entries, ids=any(q[3] for q in group))
            if self.wait_replicas:
                packed += pack(("WAIT", self.wait_replicas, self.wait_timeout_ms))
            replies = await exchange(self.client, packed, 2 if self.wait_replicas else 1)
            if self.wait_replicas:
                self._check_wait(replies[1])
        except BaseException as exc:
            if isinstance(exc, InboxUnavailable):
                why = str(exc)
            elif isinstance(exc, RedisError | OSError):
                why = f"Redis did not take the request: {exc}"
            elif isinstance(exc, asyncio.CancelledError):
                why = "the gateway is stopping"
            else:  # a fault of this code: the request is refused (503) and it is logged
                why = f"the request was not written: {exc!r}"
            for q in group:
                if not q[4].done():
                    q[4].set_exception(InboxUnavailable(why))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, _, parts, ids, done), entry_of in zip(group, where, strict=True):
            if not done.done():
                done.set_result(
                    {p: text(replies[0][i]) for p, i in entry_of.items()} if ids else len(parts))

    def _pack_append(self, entries: list[_Entry], *, ids: bool) -> bytes:
        """`EVAL _APPEND` of `entries` in RESP, as `hiredis.pack_command` would pack it,
        from fragments: the script and each partition's keys packed once, each value's
        length header written beside it (a third of `pack_command`'s time for about 80
        arguments)."""
        names = self._append_keys
        out = [b"*%d\r\n" % (4 + 4 * len(entries)), _EVAL, bulk(b"%d" % (2 * len(entries)))]
        out += [names[p] for p, _, _ in entries]
        out.append(_ANSWER[ids])
        for _, count, value in entries:
            out.append(bulk(b"%d" % count))
            out.append(b"$%d\r\n" % len(value))
            out.append(value)
            out.append(b"\r\n")
        return b"".join(out)

    async def _append_cluster(
        self, cluster: RedisCluster, parts: dict[int, tuple[int, bytes]]
    ) -> dict[int, str]:
        written: dict[int, str] = {}
        failed, asked = await self._send_by_node(cluster, parts, written, {})
        if asked:
            # a slot being migrated, and these streams already on the target: ASKING there
            more, again = await self._send_by_node(
                cluster, {p: parts[p] for p in asked}, written, asked)
            failed |= more | {p: f"ASK {host}:{port} twice" for p, (host, port) in again.items()}
        if failed:
            # a slot moved (resharding, failover): learn the new map and retry those parts once
            await cluster.nodes_manager.initialize()
            failed, asked = await self._send_by_node(
                cluster, {p: parts[p] for p in failed}, written, {})
            failed |= {p: f"slot migrating to {host}:{port}" for p, (host, port) in asked.items()}
        if failed:
            raise InboxUnavailable(
                "Redis Cluster did not take the request: " + "; ".join(sorted(set(failed.values()))))
        return written

    async def _send_by_node(
        self,
        cluster: RedisCluster,
        parts: dict[int, tuple[int, bytes]],
        written: dict[int, str],
        asking: dict[int, tuple[str, int]],
    ) -> tuple[dict[int, str], dict[int, tuple[str, int]]]:
        """Send each node its parts (and WAIT) in one pipeline, all nodes at once; the parts
        in `asking` go to the node named, each after ASKING. Fill `written`; return the parts
        that failed with why, and those a migrating slot redirected (ASK) with where to."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for p in parts:
            if p in asking:
                host, port = asking[p]
                node = cluster.get_node(host=host, port=port)
            else:
                node = cluster.get_node_from_key(inbox_key(p))
            if node is None:
                raise InboxUnavailable(f"no Redis Cluster node serves partition {p}'s slot")
            by_node.setdefault(node.name, (node, []))[1].append(p)
        outcomes = await asyncio.gather(
            *(self._send_node(node, ps, parts, asking=bool(asking))
              for node, ps in by_node.values()),
            return_exceptions=True,
        )
        failed: dict[int, str] = {}
        asked: dict[int, tuple[str, int]] = {}
        for (_, ps), outcome in zip(by_node.values(), outcomes, strict=True):
            if isinstance(outcome, InboxUnavailable):
                # written but not replicated in time: sending again would not help
                raise outcome
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, RedisError | OSError):
                    raise outcome
                failed.update((p, str(outcome)) for p in ps)
                continue
            for p, result in zip(ps, outcome, strict=True):
                if isinstance(result, AskError) and not isinstance(result, MovedError):
                    # (MovedError is an AskError too: a moved slot reloads the map instead)
                    asked[p] = (result.host, result.port)
                elif isinstance(result, Exception):
                    failed[p] = str(result)
                else:
                    written[p] = text(result)
        return failed, asked

    async def _send_node(
        self, node: ClusterNode, ps: list[int], parts: dict[int, tuple[int, bytes]], *,
        asking: bool
    ) -> list[Any]:
        commands: list[PipelineCommand] = []
        for p in ps:
            if asking:
                # good for the next command only
                commands.append(PipelineCommand(len(commands), "ASKING"))
            count, value = parts[p]
            commands.append(
                PipelineCommand(len(commands), "XADD", inbox_key(p), "*", FIELD, value))
            commands.append(PipelineCommand(len(commands), "INCRBY", waiting_key(p), count))
        if self.wait_replicas:
            commands.append(
                PipelineCommand(len(commands), "WAIT", self.wait_replicas, self.wait_timeout_ms))
        # ClusterNode.execute_pipeline sends them on one connection, as the cluster pipeline
        # does, so WAIT covers these writes
        await node.execute_pipeline(commands)
        if self.wait_replicas:
            acked = commands.pop().result
            if isinstance(acked, Exception):
                raise acked
            self._check_wait(acked)
        return [c.result for c in commands if c.args[0] == "XADD"]

    def _check_wait(self, acked: Any) -> None:
        if int(acked) < self.wait_replicas:
            raise InboxUnavailable(
                f"only {int(acked)} of {self.wait_replicas} replicas acknowledged the write "
                f"within {self.wait_timeout_ms} ms"
            )

    # -- the owner's side --------------------------------------------------------------------

    async def progress(self, partition: int) -> str:
        """The id of the last entry applied from `partition` (`START` if none)."""
        value = await self.client.get(progress_key(partition))
        return text(value) if value is not None else START

    async def read(self, partition: int, after: str, count: int) -> list[Entry]:
        """The records of up to `count` entries of `partition` after the entry id `after`,
        oldest first."""
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await self.client.xrange(
            inbox_key(partition), min="-" if after == START else f"({after}", count=count))
        out = []
        for entry_id, fields in rows:
            source, records = entry_records(flat(fields))
            out += [Entry(id=entry_id.decode(), source=source.decode(), received_at=at,
                          count=n, body=body) for at, n, body in records]
        return out

    async def commit(self, partition: int, entry_id: str, owner: str, epoch: int) -> bool:
        """Move `partition`'s cursor to `entry_id` and drop the entries up to it, if `owner`
        still holds the partition under `epoch` (else False, nothing changed)."""
        keys = [lease_key(partition), epoch_key(partition), progress_key(partition),
                inbox_key(partition)]
        return bool(await self._commit(keys=keys, args=[owner, epoch, entry_id]))

    async def lag(self, partitions: list[int]) -> dict[int, int]:
        """Entries not yet applied, per partition: the streams' lengths (the applied are
        trimmed at commit)."""
        pipe = self.client.pipeline()
        for p in partitions:
            pipe.xlen(inbox_key(p))
        return dict(zip(partitions, map(int, await pipe.execute()), strict=True))


def _entries(group: list[_Queued]) -> tuple[list[_Entry], list[dict[int, int]]]:
    """A group's entries: one for each partition and source, its records in the group's
    order (a partition's records are applied in stream order); and for each request, the
    entry each of its parts went in (an index into the entries)."""
    index: dict[tuple[int, bytes], int] = {}  # (partition, source) -> its entry's index
    records: list[list[tuple[int, bytes, bytes]]] = []
    where: list[dict[int, int]] = []
    for source, received_at, parts, _, _ in group:
        mine = {}
        for p, (body, count) in parts.items():
            i = mine[p] = index.setdefault((p, source), len(index))
            if i == len(records):
                records.append([])
            records[i].append((count, received_at, body))
        where.append(mine)
    entries = [(p, sum(r[0] for r in rs), entry_value(source, rs))
               for (p, source), rs in zip(index, records, strict=True)]
    return entries, where


def flat(fields: dict[bytes, bytes]) -> list[bytes]:
    """An entry's fields as a stream reply lists them (name, value, name, value), from
    redis-py's dict, for `entry_records`."""
    return [x for kv in fields.items() for x in kv]
