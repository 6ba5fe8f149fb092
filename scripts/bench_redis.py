"""Redis benchmark: what one Redis shard does on this machine, and what the gateway's Redis
inbox costs per event (SCALING.md's figures).

    python scripts/bench_redis.py                        # appendfsync everysec
    python scripts/bench_redis.py --appendfsync always
    python scripts/bench_redis.py --events 500000 --users 50000

1. A `redis-server` on a free port in a temporary folder, AOF on with `--appendfsync`,
   `maxmemory-policy noeviction`, as SCALING.md recommends.
2. `redis-benchmark` against it: PING (the floor), XADD of one inbox entry as ingest writes
   it (a part of `--batch` / partitions touched events), EVALSHA of the fence script (the
   check every apply script starts with), each unpipelined and pipelined (`-P 16`).
3. The gateway's `RedisInbox.append` with Segment traffic (benchkit.traffic: the default
   mix, `--users` users over `--accounts` accounts, batches of `--batch`): from
   `INFO commandstats`, Redis commands per request and per event; `MEMORY USAGE` of every
   inbox stream, `used_memory` and the AOF's growth, in bytes per event; the events/s one
   Python process appends at (`--concurrency` requests in flight).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.redis_server import RedisServer
from benchkit.stack import workdir
from benchkit.traffic import Traffic

from gateway.store.redis.connect import connect
from gateway.store.redis.inbox import RedisInbox
from gateway.store.redis.lease import FENCE_LUA
from gateway.store.redis.partition import inbox_key

FENCE = FENCE_LUA + "return 1\n"
# The shape of the planned apply script for a batch of ARGV[4] events: the fence, then per
# event a 16-byte-ish dedupe member and a ledger row increment (its outbox and trait writes
# are not counted here). A stand-in to price Redis's CPU per applied event, not the script.
APPLY_SHAPE = FENCE_LUA + """
local n = tonumber(ARGV[4])
for i = 1, n do
  redis.call('SADD', KEYS[3], ARGV[3] .. ':' .. i)
  redis.call('HINCRBY', KEYS[4], 'user-' .. (i * 37 % 5000) .. '|acct|Report Viewed', 1)
end
return n
"""
APPLY_BATCH = 100


def redis_benchmark(port: int, requests: int, clients: int, pipeline: int, *command: str) -> float:
    """Requests per second `redis-benchmark` reports for `command`."""
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests),
         "-r", "1000000000",
         "-c", str(clients), "-P", str(pipeline), "-q", *command],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    # "<the command>: 123456.79 requests per second, p50=..." (--csv does not quote the
    # command, and an entry's JSON has quotes and commas)
    found = re.findall(r"([0-9.]+) requests per second", out)
    if not found:
        raise RuntimeError(f"redis-benchmark printed no rate: {out[-300:]!r}")
    return float(found[-1])


def shard_figures(server: RedisServer, entry: dict[str, Any], requests: int) -> dict[str, float]:
    with server.client() as c:
        sha = c.script_load(FENCE)
        apply_sha = c.script_load(APPLY_SHAPE)
        c.set("{p1}:lease", "a")
        c.set("{p1}:epoch", "1")
    flat = [str(x) for kv in entry["fields"].items() for x in kv]
    commands = {
        "ping": ["PING"],
        "xadd": ["XADD", "{p1}:bench", "*", *flat],
        "evalsha_fence": ["EVALSHA", sha, "2", "{p1}:lease", "{p1}:epoch", "a", "1"],
        f"evalsha_apply{APPLY_BATCH}": [
            "EVALSHA", apply_sha, "4", "{p1}:lease", "{p1}:epoch", "{p1}:dedupe", "{p1}:ledger",
            "a", "1", "__rand_int__", str(APPLY_BATCH)],
    }
    figures: dict[str, float] = {}
    for name, command in commands.items():
        # an apply call is 100 events' work: fewer calls take as long, and pipelining them
        # changes nothing (the script's work dominates the round trip)
        heavy = name.startswith("evalsha_apply")
        n = requests // 20 if heavy else requests
        for pipeline in (1,) if heavy else (1, 16):
            figures[f"{name}_P{pipeline}"] = round(
                redis_benchmark(server.port, n, 50, pipeline, *command))
        if name == "xadd":
            with server.client() as c:
                c.delete("{p1}:bench")
    return figures


async def inbox_figures(
    server: RedisServer, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    traffic = Traffic(accounts=args.accounts, users=args.users, seed=1)
    batches = [traffic.batch(args.batch).body for _ in range(args.events // args.batch)]
    events = len(batches) * args.batch
    client = await connect(server.url)
    inbox = RedisInbox(client, args.partitions)
    with server.client() as c:
        c.config_resetstat()
        before = c.info("memory")["used_memory"]
        aof_before = _aof_bytes(server)
    queue = list(reversed(batches))
    parts = 0

    async def worker() -> None:
        nonlocal parts
        while queue:
            body = queue.pop()
            written = await inbox.append("web", time.time(), body)
            parts += len(written)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    with server.client() as c:
        stats = c.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
        streams = sum(
            int(c.memory_usage(inbox_key(p), samples=0) or 0) for p in range(args.partitions))
        used = c.info("memory")["used_memory"] - before
        entries = sum(int(c.xlen(inbox_key(p))) for p in range(args.partitions))
    # everysec: let the last second reach the file before it is measured
    await asyncio.sleep(1.2)
    aof = _aof_bytes(server) - aof_before
    request_bytes = sum(map(len, batches))
    xadds = int(calls.get("xadd", 0))
    sample = entry_sample(batches[0], args.partitions)
    return {
        "events": events,
        "requests": len(batches),
        "batch": args.batch,
        "users": args.users,
        "partitions": args.partitions,
        "entries": entries,
        "xadd_per_request": round(xadds / len(batches), 2),
        "commands_per_event": round(sum(calls.values()) / events, 3),
        "commands": calls,
        "json_bytes_per_event": round(request_bytes / events, 1),
        "stream_bytes_per_event": round(streams / events, 1),
        "used_memory_bytes_per_event": round(used / events, 1),
        "aof_bytes_per_event": round(aof / events, 1),
        "append_events_per_s": round(events / elapsed),
        "append_requests_per_s": round(len(batches) / elapsed),
        "concurrency": args.concurrency,
        "parts_written": parts,
    }, sample


def state_figures(server: RedisServer, args: argparse.Namespace) -> dict[str, float]:
    """Memory of the state the apply path will keep (its key shapes, planned in SCALING.md):
    a 16-byte dedupe hash per event in a set per (partition, day), and a daily ledger row
    per (user, account, event) in a hash per (partition, day)."""
    import hashlib

    traffic = Traffic(accounts=args.accounts, users=args.users, seed=2)
    rows = set()
    with server.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(args.events):
            digest = hashlib.blake2b(f"web\x00m{i}".encode(), digest_size=16).digest()
            pipe.sadd(f"{{p{i % args.partitions}}}:dedupe:20261201", digest)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        for _ in range(args.events // args.batch):
            for raw in traffic.batch(args.batch).body.split(b'"userId":"')[1:]:
                user = raw.split(b'"', 1)[0].decode()
                rows.add((user, f"acct-{int(user.split('-')[1]) % args.accounts}",
                          f"E{hash(raw) % 20}"))
        for user, account, event in rows:
            pipe.hincrby(f"{{p{hash(user) % args.partitions}}}:ledger:20261201",
                         f"{user}\x1f{account}\x1f{event}", 1)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()
        dedupe = sum(int(c.memory_usage(f"{{p{p}}}:dedupe:20261201", samples=0) or 0)
                     for p in range(args.partitions))
        ledger = sum(int(c.memory_usage(f"{{p{p}}}:ledger:20261201", samples=0) or 0)
                     for p in range(args.partitions))
    return {
        "dedupe_bytes_per_event": round(dedupe / args.events, 1),
        "ledger_rows": len(rows),
        "ledger_bytes_per_row": round(ledger / max(len(rows), 1), 1),
    }


def entry_sample(body: bytes, partitions: int) -> dict[str, Any]:
    """One inbox entry as ingest writes it (its one field, `m`) for a request alone in its
    group, from a real batch: its median part; with its messages and its body's bytes."""
    from gateway.store.redis.inbox import entry_value
    from gateway.store.redis.partition import split

    ordered = sorted(split("web", body, partitions).values(), key=lambda pc: len(pc[0]))
    part, count = ordered[len(ordered) // 2]
    value = entry_value(b"web", [(count, repr(time.time()).encode(), part)])
    return {"fields": {"m": value.decode()}, "n": count, "bytes": len(part)}


def _aof_bytes(server: RedisServer) -> int:
    folder = server.dir / "appendonlydir"
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100, help="messages per request")
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200_000,
                        help="requests per redis-benchmark run")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        sys.exit("bench_redis: needs redis-server and redis-tools (bash scripts/ensure_redis.sh)")
    with workdir(args.workdir, "bench-redis-") as work:
        server = RedisServer(work / "redis", appendfsync=args.appendfsync)
        server.start()
        try:
            inbox, entry = asyncio.run(inbox_figures(server, args))
            with server.client() as c:
                c.flushall()
            shard = shard_figures(server, entry, args.requests)
            with server.client() as c:
                c.flushall()
            state = state_figures(server, args)
            version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                     text=True, check=True).stdout.split()[2]
        finally:
            server.stop()
    report = {
        "appendfsync": args.appendfsync,
        "redis": version,
        "cores": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "xadd_entry_messages": entry["n"],
        "xadd_entry_bytes": entry["bytes"],
        "shard_ops_per_s": shard,
        "inbox": inbox,
        "state": state,
    }
    for name, value in shard.items():
        print(f"{name:>20}: {value:>10,.0f} ops/s")
    for name in ("xadd_per_request", "commands_per_event", "json_bytes_per_event",
                 "stream_bytes_per_event", "used_memory_bytes_per_event", "aof_bytes_per_event",
                 "append_events_per_s"):
        print(f"{name:>28}: {inbox[name]}")
    for name, value in state.items():
        print(f"{name:>28}: {value}")
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
