"""Partition ownership: live gateways, an even division of the partitions, and leases
with fencing epochs.

- Members: each gateway heartbeats into one sorted set (`{gw}:members`), scored by when its
  entry expires on Redis's clock; a member that stops heartbeating drops out after `ttl`.
  One key, so listing the members is one command on a Cluster too (no SCAN per node).
- Assignment: every member computes the same division from the sorted member list (Kafka's
  range assignor): P // n partitions each, the first P % n members one more. No
  coordinator: a join or a leave changes the list, and with it everyone's share.
- Leases: `{p<n>}:lease` holds the owner's id with a TTL of `ttl`; `{p<n>}:epoch` is a
  counter that never expires. Taking a free lease raises the epoch, so each ownership has
  an epoch no earlier one had. The owner renews; one that sees a partition is no longer
  its share releases it, and the new owner takes it when it is free (at the latest when
  its TTL runs out, should the old owner be gone).
- Handoff (Kafka's cooperative rebalancing: revoke, finish, commit, release): a partition
  that is no longer this gateway's share is first `leaving`: still renewed and held, but
  given no new work; `on_revoke` waits (bounded, well within the TTL) for its calls on the
  wire to be answered and their outcomes recorded under the still-valid epoch; only then
  is the lease released. A partition whose calls are not all recorded by then (Redis did
  not answer, or Accoil is slower than the wait) is kept, renewed by the next round and
  handed over then. The new owner cannot take it before: a handoff sends nothing twice.
- Fencing: every script that changes a partition starts with `FENCE_LUA` and refuses to run
  unless the lease is still held by the caller under the caller's epoch. A gateway paused
  past its lease (SIGSTOP, a long GC, a VM migration) that wakes up holding work for epoch
  e finds the lease gone or the epoch at e + 1, and its write is refused: Kafka's
  generation check, as in its consumer groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import structlog
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, NoScriptError, RedisError

from gateway.store.redis.connect import Client
from gateway.store.redis.metrics import RedisMetrics
from gateway.store.redis.partition import MEMBERS_KEY, epoch_key, lease_key

log = structlog.get_logger("gateway.store.redis.lease")

DEFAULT_TTL = 10.0
# the part of the TTL a handoff may wait for a leaving partition's calls on the wire: the
# lease was renewed at the round's start, and the next round renews again after ttl / 3
REVOKE_SHARE = 0.25

# KEYS[1] the lease, KEYS[2] the epoch; ARGV[1] the owner, ARGV[2] its epoch. Returns from
# the script with 0 when the caller is not the current owner under the current epoch.
FENCE_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
"""

# KEYS: lease, epoch; ARGV: owner, ttl ms. {1, epoch} taken (or already ours, renewed);
# {0, owner} held by another.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('GET', KEYS[2]))}
end
if cur then return {0, cur} end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, epoch}
"""
_RENEW = FENCE_LUA + "redis.call('PEXPIRE', KEYS[1], ARGV[3])\nreturn 1\n"
_RELEASE = FENCE_LUA + "redis.call('DEL', KEYS[1])\nreturn 1\n"
_FENCE = FENCE_LUA + "return 1\n"

# KEYS: members; ARGV: member, ttl ms. The live members, on Redis's clock (one clock for all).
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""


def assign(members: Sequence[str], partitions: int) -> dict[str, range]:
    """Each member's partitions: contiguous ranges, sizes differing by at most one."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    base, extra = divmod(partitions, len(ordered))
    out: dict[str, range] = {}
    start = 0
    for i, member in enumerate(ordered):
        size = base + (1 if i < extra else 0)
        out[member] = range(start, start + size)
        start += size
    return out


def member_id() -> str:
    """Unique per process start: a restarted gateway is a new member, never the old one."""
    host = socket.gethostname().replace(" ", "_")[:40]
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


class Scripts:
    """The lease scripts, registered once per client (EVALSHA, loaded again on NOSCRIPT)."""

    def __init__(self, client: Client) -> None:
        self.acquire: AsyncScript = client.register_script(_ACQUIRE)
        self.renew: AsyncScript = client.register_script(_RENEW)
        self.release: AsyncScript = client.register_script(_RELEASE)
        self.fence: AsyncScript = client.register_script(_FENCE)
        self.heartbeat: AsyncScript = client.register_script(_HEARTBEAT)


class Leases:
    """This gateway's share of the partitions, kept by `tick()` (or `run()`, which ticks
    every `ttl / 3`). `owned` maps each partition held to its epoch."""

    def __init__(
        self,
        client: Client,
        partitions: int,
        *,
        member: str | None = None,
        ttl: float = DEFAULT_TTL,
        metrics: RedisMetrics | None = None,
        on_owned: Callable[[int], None] | None = None,
        on_revoke: Callable[[list[int], float], Awaitable[Collection[int]]] | None = None,
    ) -> None:
        self.client = client
        self.partitions = partitions
        self.member = member or member_id()
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000)
        self.metrics = metrics
        # told how many partitions are held after each round and at leave: forwarding
        # scales the sources' caps to that share (`Limiter.set_share`)
        self.on_owned = on_owned
        # awaited with the partitions about to be released and the seconds it may take: it
        # returns once their calls on the wire are answered and recorded, or time is up,
        # with the partitions whose calls are not all recorded yet
        self.on_revoke = on_revoke
        # held, renewed, but given no new work: their handoff is under way
        self.leaving: frozenset[int] = frozenset()
        self.scripts = Scripts(client)
        self.owned: dict[int, int] = {}
        self.members: list[str] = []
        # when the leases renewed last are no longer ours, by this process's monotonic clock
        # (it runs on through SIGSTOP): past it, `holds` says no without asking Redis
        self._valid_until = 0.0
        self._round_at = 0.0  # when the last round that renewed the leases began (monotonic)
        self._stopping = False
        # a round and a leave never interleave: a round in flight could take a lease back
        # after `stop()` released it
        self._round = asyncio.Lock()

    def holds(self, partition: int) -> int | None:
        """The epoch this gateway holds `partition` under, if its lease is still fresh."""
        if time.monotonic() >= self._valid_until:
            return None
        return self.owned.get(partition)

    async def tick(self) -> dict[int, int]:
        """One round: heartbeat, divide, release what is no longer ours, renew what is,
        take what is ours and free. Raises `RedisError` when Redis does not answer."""
        async with self._round:
            if self._stopping:
                return dict(self.owned)
            return await self._tick()

    async def _tick(self) -> dict[int, int]:
        started = time.monotonic()
        raw = await self.scripts.heartbeat(keys=[MEMBERS_KEY], args=[self.member, self.ttl_ms])
        self.members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)
        share = set(assign(self.members, self.partitions).get(self.member, range(0)))
        # every lease held is renewed, those being handed over too: their outcomes are
        # recorded under it until the release
        kept = sorted(self.owned)
        renewed = await self._each(self.scripts.renew, [
            ([lease_key(p), epoch_key(p)], [self.member, self.owned[p], self.ttl_ms]) for p in kept])
        lost = [p for p, ok in zip(kept, renewed, strict=True) if not ok]
        for p in lost:
            del self.owned[p]
        # a lease renewed in this round lives `ttl` from before the round began
        self._valid_until = started + self.ttl
        self._round_at = started
        wanted = sorted(share - set(self.owned))
        answers = await self._each(self.scripts.acquire, [
            ([lease_key(p), epoch_key(p)], [self.member, self.ttl_ms]) for p in wanted])
        acquired = []
        for p, (taken, value) in zip(wanted, answers, strict=True):
            if taken:
                self.owned[p] = int(value)
                acquired.append(p)
        released = await self._hand_over(sorted(set(self.owned) - share), started)
        self._changed(acquired=acquired, released=released, lost=lost)
        self._owned_changed()
        return dict(self.owned)

    async def refresh(self, since: float) -> None:
        """A round now, unless one began at `since` (monotonic) or later: an outcome
        refused by Redis, or held while the leases lapsed here, learns whether this gateway
        holds the partition again. Raises `RedisError` when Redis does not answer."""
        async with self._round:
            if self._stopping or self._round_at >= since:
                return
            await self._tick()

    async def _hand_over(self, ps: list[int], started: float) -> list[int]:
        """Revoke `ps`, let their calls on the wire finish, then release them; those
        released."""
        if not ps:
            return []
        self.leaving = frozenset(ps)
        try:
            if self.on_revoke is not None:
                # bounded from the renewal: the leases must still be ours when it returns
                within = started + self.ttl * REVOKE_SHARE - time.monotonic()
                busy = await self.on_revoke(ps, max(within, 0.0))
                if not self._stopping:
                    # released now, their unrecorded outcomes would be refused and the new
                    # owner would send those calls again: kept for the next round's handoff
                    ps = [p for p in ps if p not in busy]
            await self._release_all(ps)
        finally:
            self.leaving = frozenset()
        return ps

    async def fence(self, partition: int, epoch: int) -> bool:
        """Whether `epoch` is still this gateway's, current epoch for `partition`."""
        return bool(await self.scripts.fence(
            keys=[lease_key(partition), epoch_key(partition)], args=[self.member, epoch]))

    async def run(self) -> None:
        """Tick until `stop()`; a Redis error is logged and the next tick tries again."""
        while not self._stopping:
            try:
                await self.tick()
            except RedisError as exc:
                log.warning("lease round failed; retrying", error=str(exc))
            await asyncio.sleep(self.ttl / 3)

    async def stop(self) -> None:
        """Leave: release every lease and the member entry, so the others take over at
        their next tick rather than after the TTL."""
        self._stopping = True
        async with self._round:
            await self._leave()

    async def _leave(self) -> None:
        released = sorted(self.owned)
        try:
            await self._hand_over(released, time.monotonic())
        except RedisError:
            self.owned.clear()  # the leases expire by themselves
        self._changed(released=released)
        with contextlib.suppress(RedisError):  # the entry expires by itself
            await self.client.zrem(MEMBERS_KEY, self.member)
        self._owned_changed()

    def _owned_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.owned.set(len(self.owned))
        if self.on_owned is not None:
            self.on_owned(len(self.owned))

    async def _release_all(self, ps: list[int]) -> None:
        epochs = [self.owned.pop(p) for p in ps]
        if ps:
            self._owned_changed()  # the share falls before another member can take them
        await self._each(self.scripts.release, [
            ([lease_key(p), epoch_key(p)], [self.member, e]) for p, e in zip(ps, epochs, strict=True)])

    async def _each(
        self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """`script` once per (keys, args), all in one pipeline: a round trip per node rather
        than per partition (a round over 1,024 partitions took about 100 ms one by one)."""
        if not calls:
            return []
        results: list[Any] = []
        for attempt in (1, 2):
            if isinstance(self.client, RedisCluster):
                results = await _evalsha_per_node(self.client, script.sha, calls)
            else:
                pipe = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 2:
                break
            if any(isinstance(r, NoScriptError) for r in results):
                # a restarted (or new) server forgot the script: load it (on every primary
                # of a Cluster) and send the round again; the scripts are idempotent
                await self.client.script_load(script.script)
            elif isinstance(self.client, RedisCluster) and any(
                    isinstance(r, AskError) for r in results):
                # a slot moved or is moving (MOVED is an AskError): learn the map, try again
                await self.client.nodes_manager.initialize()
            else:
                break
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results


    def _changed(self, **changes: list[int]) -> None:
        """Count and log a round's changes: one line per kind, not one per partition."""
        for change, ps in changes.items():
            if not ps:
                continue
            if self.metrics is not None:
                self.metrics.lease_changes.labels(change).inc(len(ps))
            log_at = log.warning if change == "lost" else log.info
            log_at(f"partitions {change}", partitions=_ranges(ps), member=self.member,
                   members=len(self.members), owned=len(self.owned))


def _ranges(ps: list[int]) -> str:
    """[0, 1, 2, 5] as "0-2,5": a line stays short with thousands of partitions."""
    out: list[str] = []
    for p in ps:
        if out and int(out[-1].rsplit("-", 1)[-1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


async def _evalsha_per_node(
    cluster: RedisCluster, sha: str, calls: list[tuple[list[str], list[Any]]]
) -> list[Any]:
    """EVALSHA per call on the node serving its keys: one pipeline per node (redis-py's
    cluster pipeline refuses scripts), nodes concurrently; errors come back as values."""
    by_node: dict[str, tuple[ClusterNode, list[PipelineCommand]]] = {}
    commands: list[PipelineCommand] = []
    for i, (keys, args) in enumerate(calls):
        node = cluster.get_node_from_key(keys[0])
        if node is None:
            raise RedisError(f"no Redis Cluster node serves {keys[0]}")
        command = PipelineCommand(i, "EVALSHA", sha, len(keys), *keys, *args)
        commands.append(command)
        by_node.setdefault(node.name, (node, []))[1].append(command)
    await asyncio.gather(*(node.execute_pipeline(cs) for node, cs in by_node.values()))
    return [c.result for c in commands]
