"""What the apply path keeps in Redis per event: `MEMORY USAGE` of each structure after the
real router and dispatcher applied Segment traffic to a `RedisStore` (SCALING.md's figures).

    python scripts/bench_redis_state.py
    python scripts/bench_redis_state.py --events 200000 --users 5000 --accounts 500

A `redis-server` on a free port in a temporary folder (AOF everysec, noeviction); the
traffic's batches appended through `RedisStore.accept`; the pipeline's dispatcher applies
them (nothing is forwarded: the outbox holds the calls); then every key is measured with
`MEMORY USAGE` and summed per structure (dedupe sets, ledger counts and stamps, known
traits, accounts, outbox hashes, dead letters, inbox streams). Also the apply rate of this
one process and its CPU per event, and the Redis commands per event (`INFO commandstats`).
A run in which nothing is applied for `--stall` seconds stops with the dispatcher's, the
store's and Redis's state (for the stall seen once in this benchmark, SCALING.md). The last line of
output is one JSON object.

    python scripts/bench_redis_state.py --track-only --callgrind --events 20000
    PYTHONPATH=<other checkout> python scripts/bench_redis_state.py --track-only --callgrind

`--callgrind` counts the apply's instructions instead of timing it (CPU time is noisy on a
shared machine; an instruction count is not): the inbox is filled here, then a child process
under valgrind's callgrind applies it (the real dispatcher, router and `RedisStore`, its turns
cut by their count: `flush_interval` an hour), at `--events` and at three times as many; the
instructions an event are the difference over the events between (start-up cancels out).
Beside them, Redis's CPU an event over each child's apply (Redis is not under valgrind, so its
figure is its own). The child imports `gateway` from the parent's path (`PYTHONPATH` picks the
checkout to measure) and reports where from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.redis_server import RedisServer
from benchkit.stack import workdir
from benchkit.traffic import Traffic

from gateway.actors.dispatcher import Dispatcher
from gateway.actors.router import Router
from gateway.backlog import Backlog
from gateway.config import Settings, Source
from gateway.observability.metrics import Metrics
from gateway.store.redis.store import RedisStore, entry_of

SOURCE = Source(write_key="wk_bench_state_1", accoil_api_key="ak_bench_state_1", name="main")
# a key's structure: the part after the partition's tag, up to a day or a source
TURN = 10_000  # --child: messages a turn (turns cut by their count)
STRUCTURE = re.compile(r"^\{p\d+\}:([a-z]+(?::[a-z]+)?)")


async def run(args: argparse.Namespace, server: RedisServer) -> dict[str, Any]:
    settings = Settings(sources=[SOURCE], store="redis", redis_url=server.url,
                        partitions=args.partitions)
    store = RedisStore(settings, apply=True)
    await store.open()
    while len(store._owned()) < args.partitions:  # noqa: ASYNC110 (the leases' first round)
        await asyncio.sleep(0.05)
    traffic = (Traffic(accounts=args.accounts, users=args.users, seed=1, mix={"track": 1.0})
               if args.track_only else Traffic(accounts=args.accounts, users=args.users, seed=1))
    sent = 0
    while sent < args.events:
        b = traffic.batch(min(args.batch, args.events - sent))
        await store.accept(SOURCE.id, time.time(), b.body, len(b.seqs))
        sent += len(b.seqs)
    c = server.client()
    c.config_resetstat()
    backlog = Backlog(10**9)
    backlog.accepted(sent)
    dispatcher = Dispatcher(store, Router(store, {SOURCE.id: SOURCE}), settings,
                            Metrics([SOURCE.id]), backlog, lambda _: None)
    started, cpu0, redis0 = time.monotonic(), time.process_time(), redis_cpu(c)
    task = asyncio.create_task(dispatcher.run())
    inboxes = [f"{{p{p}}}:inbox" for p in range(args.partitions)]
    left, still = sum(c.xlen(k) for k in inboxes), time.monotonic()
    while left:  # the commit trims what it applied
        await asyncio.sleep(0.2)
        now_left = sum(c.xlen(k) for k in inboxes)
        if now_left != left:
            left, still = now_left, time.monotonic()
        elif time.monotonic() - still > args.stall:
            print(json.dumps(stall_report(dispatcher, task, store, c, args.partitions)))
            raise SystemExit(f"stalled: {left} entries left, none applied for {args.stall} s")
    apply_s, apply_cpu = time.monotonic() - started, time.process_time() - cpu0
    apply_redis = redis_cpu(c) - redis0
    dispatcher.stop()
    await task
    stats = c.info("commandstats")
    commands = sum(int(v["calls"]) for k, v in stats.items() if not k.startswith(
        ("cmdstat_info", "cmdstat_config", "cmdstat_xlen")))
    # Redis's own time on the apply path (a script's usec include the commands it runs)
    busy = {k[8:]: int(v["usec"]) for k, v in stats.items() if not k.startswith(
        ("cmdstat_info", "cmdstat_config", "cmdstat_xlen"))}
    redis_usec = sum(v for k, v in busy.items() if k not in INNER)
    counts = await store.counts()
    await store.close()
    by_structure: dict[str, int] = {}
    keys: dict[str, int] = {}
    for name in c.scan_iter(count=1000):
        text = name.decode()
        m = STRUCTURE.match(text)
        kind = m.group(1) if m else text
        if kind.startswith(("due:", "once")):
            kind = kind.split(":")[0]
        by_structure[kind] = by_structure.get(kind, 0) + int(c.memory_usage(name) or 0)
        keys[kind] = keys.get(kind, 0) + 1
    return {
        "events": sent, "partitions": args.partitions, "users": args.users,
        "accounts": args.accounts, "ledger_rows": counts.ledger_rows,
        "outbox_calls": counts.outbox,
        "apply_events_per_s": round(sent / apply_s),
        # this process's CPU (every thread), robust to the machine's load as rates are not
        "python_cpu_usec_per_event_apply": round(apply_cpu / sent * 1e6, 1),
        "redis_commands_per_event_apply": round(commands / sent, 3),
        "redis_usec_per_event_apply": round(redis_usec / sent, 2),
        # Redis's CPU (user + system, its threads), less moved by the load than its usec
        "redis_cpu_usec_per_event_apply": round(apply_redis / sent * 1e6, 2),
        "redis_usec_by_command": dict(sorted(busy.items(), key=lambda kv: -kv[1])[:6]),
        "bytes_per_event": {k: round(v / sent, 1) for k, v in sorted(by_structure.items())},
        "keys": dict(sorted(keys.items())),
        "bytes_per_ledger_row": round(
            (by_structure.get("lc", 0) + by_structure.get("lt", 0)) / max(1, counts.ledger_rows), 1),
    }


async def fill(args: argparse.Namespace, url: str, events: int) -> int:
    """Append `events` of the traffic to the inbox, through `RedisStore.accept`."""
    store = RedisStore(Settings(sources=[SOURCE], store="redis", redis_url=url,
                                partitions=args.partitions), apply=False)
    await store.open()
    traffic = (Traffic(accounts=args.accounts, users=args.users, seed=1, mix={"track": 1.0})
               if args.track_only else Traffic(accounts=args.accounts, users=args.users, seed=1))
    sent = 0
    while sent < events:
        b = traffic.batch(min(args.batch, events - sent))
        await store.accept(SOURCE.id, time.time(), b.body, len(b.seqs))
        sent += len(b.seqs)
    await store.close()
    return sent


async def apply_all(args: argparse.Namespace) -> dict[str, Any]:
    """--child: apply what the inbox holds, turns cut by their count only (the same turns
    in every run, whatever callgrind does to the clock), then stop."""
    settings = Settings(sources=[SOURCE], store="redis", redis_url=args.url,
                        partitions=args.partitions, flush_interval=3600.0,
                        max_in_flight=2 * TURN)
    store = RedisStore(settings, apply=True)
    await store.open()
    assert store.leases is not None
    # callgrind slows the lease rounds as much as the rest: leases of ten minutes, so that
    # none lapses mid-apply (a partition not trusted reads as empty, and the run would stop)
    store.leases.ttl, store.leases.ttl_ms = 600.0, 600_000
    while len(store._owned()) < args.partitions:  # noqa: ASYNC110 (the leases' first round)
        await asyncio.sleep(0.05)
    backlog = Backlog(10**9)
    dispatcher = Dispatcher(store, Router(store, {SOURCE.id: SOURCE}), settings,
                            Metrics([SOURCE.id]), backlog, lambda _: None)
    dispatcher.stop()  # route what the inbox holds, commit, return
    await dispatcher.run()
    await store.close()
    import gateway.store.redis.store as module

    return {"store_file": module.__file__}


def callgrind(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    runs = []
    for events in (args.events, 3 * args.events):
        server = RedisServer(folder / f"redis-{events}")
        server.start()
        try:
            sent = asyncio.run(fill(args, server.url, events))
            c = server.client()
            c.config_resetstat()
            before = redis_cpu(c)
            env = dict(os.environ, PYTHONHASHSEED="0")
            done = subprocess.run(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                 sys.executable, str(Path(__file__).resolve()), "--child", "--url", server.url,
                 "--partitions", str(args.partitions)],
                env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the apply under callgrind failed:\n{done.stderr}")
            left = sum(c.xlen(f"{{p{p}}}:inbox") for p in range(args.partitions))
            if left:
                raise SystemExit(f"the apply left {left} entries in the inbox")
            found = re.search(r"Collected : (\d+)", done.stderr)
            if found is None:
                raise SystemExit(f"no instruction count from callgrind:\n{done.stderr}")
            child = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"events": sent, "instructions": int(found.group(1)),
                         "redis_cpu_usec_per_event": round((redis_cpu(c) - before) / sent * 1e6, 2),
                         "redis_usec_per_event": round(command_usec(c) / sent, 2),
                         "store_file": child["store_file"]})
        finally:
            server.stop()
    small, large = runs
    return {
        "measure": "callgrind", "events": [small["events"], large["events"]],
        "partitions": args.partitions, "users": args.users, "accounts": args.accounts,
        "track_only": args.track_only,
        "instructions_per_event": round(
            (large["instructions"] - small["instructions"]) / (large["events"] - small["events"])),
        # Redis's CPU over a slowed apply holds its idle cycles too; the commands' own time
        # (commandstats) does not
        "redis_cpu_usec_per_event": [small["redis_cpu_usec_per_event"],
                                     large["redis_cpu_usec_per_event"]],
        "redis_usec_per_event": [small["redis_usec_per_event"], large["redis_usec_per_event"]],
        "store_file": large["store_file"],
    }


# run inside the scripts only: their time is the script's (HMGET is not here: the worker's
# reads send it too, so the commit script's HMGETs count twice)
INNER = {"hset", "hget", "sadd", "zadd", "incr", "hincrby", "hexists", "set", "get", "xtrim",
         "exists", "decrby"}


def command_usec(c: Any) -> int:
    """Redis's time in the commands sent to it (a script's includes what it runs)."""
    return sum(int(v["usec"]) for k, v in c.info("commandstats").items()
               if k[8:] not in INNER and not k.startswith(
                   ("cmdstat_info", "cmdstat_config", "cmdstat_xlen")))


def redis_cpu(c: Any) -> float:
    info = c.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def stall_report(
    dispatcher: Dispatcher, task: asyncio.Task[None], store: RedisStore, c: Any, partitions: int
) -> dict[str, Any]:
    """What the dispatcher, the store and Redis hold when nothing has been applied for a
    while: the evidence for a stall."""
    leases = store.leases
    assert leases is not None
    stuck = {}
    for p in range(partitions):
        n = c.xlen(f"{{p{p}}}:inbox")
        if not n:
            continue
        first = c.xrange(f"{{p{p}}}:inbox", count=1)
        r = store._reading.get(p)
        stuck[p] = {
            "xlen": n, "first": first[0][0].decode() if first else None,
            "progress": (c.get(f"{{p{p}}}:progress") or b"").decode(),
            "holds": leases.holds(p), "owned": leases.owned.get(p),
            "reading": None if r is None else {
                "epoch": r.epoch, "after": r.after, "handed": len(r.handed),
                "handed_first": entry_of(r.handed[0][0]) if r.handed else None,
                "done": len(r.done)},
        }
    landing = dispatcher._landing
    return {
        "dispatcher": {
            "task_done": task.done(),
            "task_error": repr(task.exception()) if task.done() and not task.cancelled() else None,
            "held": dispatcher.held, "pending": dispatcher._pending,
            "landing_messages": dispatcher._landing_messages,
            "landing": None if landing is None else repr(landing),
            "flushes": {p: f.messages for p, f in dispatcher._flushes.items()},
            "live": len(dispatcher._live), "untaken": len(dispatcher._untaken),
        },
        # a connection never given back to its pool (100 at most, then "Too many
        # connections" on every command) would starve the reads: count them
        "pools": {name: {"in_use": len(getattr(pool, "_in_use_connections", ())),
                         "available": len(getattr(pool, "_available_connections", ()))}
                  for name, pool in (("async", getattr(store.client, "connection_pool", None)),
                                     ("sync", getattr(store.sync, "connection_pool", None)))},
        "store": {"buffer": len(store._buffer), "readings": len(store._reading),
                  "owned": len(leases.owned), "leaving": sorted(leases.leaving),
                  "valid_for_s": round(leases._valid_until - time.monotonic(), 2),
                  "failing": store._failing},
        "partitions_left": stuck,
        "tasks": [repr(t) for t in asyncio.all_tasks()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--accounts", type=int, default=500)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--track-only", action="store_true",
                    help="track events only (bench_sustained's traffic), not the Segment mix")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--stall", type=float, default=60.0,
                    help="seconds without an entry applied before the run is called stalled "
                         "and the dispatcher's, the store's and Redis's state is printed")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions an event of the apply (valgrind), at --events and at "
                         "3 times that, instead of its time")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(apply_all(args))))
        return
    if args.callgrind:
        with workdir(args.dir, "bench-redis-state-") as folder:
            print(json.dumps(callgrind(args, folder)))
        return
    with workdir(args.dir, "bench-redis-state-") as folder:
        server = RedisServer(folder / "redis")
        server.start()
        try:
            result = asyncio.run(run(args, server))
        finally:
            server.stop()
    for k, v in result["bytes_per_event"].items():
        print(f"{k:>12}: {v:8.1f} bytes/event")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
