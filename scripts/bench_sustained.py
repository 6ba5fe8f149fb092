"""Sustained benchmark: how fast a burst is *applied*, not only acknowledged.

    python scripts/bench_sustained.py                          # 5 s burst, 500 accounts
    python scripts/bench_sustained.py --accounts 100000 --users 200000
    python scripts/bench_sustained.py --duration 30            # about 3M events at 100k/s
    python scripts/bench_sustained.py --store redis            # SQLite mode, then Redis mode

1. The no-op ceiling: an aiohttp handler that reads the body and answers 200, under the
   same load (wrk, or aiohttp without it) for `--duration` seconds.
2. The gateway, defaults (two processes), on an empty data folder, with Accoil unreachable
   (a port where nothing listens), so that forwarding costs nothing and the burst's
   whole apply is measured: unique track events for `--duration` seconds, full speed.
3. The time until the inbox is empty and the ledger holds every acknowledged event.

Reported: acknowledged events/s (the burst), sustained events/s (the events applied over
the time from the burst's start to the last one applied), both against the no-op ceiling
of the same run; the peak RSS of both processes (sampled every 100 ms, and VmHWM) and each
one's own peak (`hwm_mb`); the pipeline worker's CPU time per event (user + system, from
/proc); each process's CPU share (CPU seconds per second) in the burst and in the apply
after it (`cpu_share`: below 1 for the worker, it waited, or the machine was busy).

With `--store redis`, step 2 and 3 run twice on the same bodies, the same machine and the
same load: SQLite mode, then one gateway in Redis mode on a fresh `redis-server` (AOF on,
`--appendfsync`, `maxmemory-policy noeviction`, in the work folder). Reported besides:
Redis mode's rates over SQLite mode's (the target is a sustained ratio of at least 0.5),
and, from Redis's INFO over the burst and its apply, Redis commands, network bytes in and
out, Redis's own CPU time (user + system), `used_memory` growth and AOF growth, each per
event applied, and the ten commands called most per event (`calls_per_event`, those run
inside scripts included); from the worker's own counters (`/metrics`), its stream reads
and the entries each brought, and its partition commits and the events each applied
(`pipeline`: with the leases held at the start and at the end). `watch`, sampled every
0.1 s through the Redis-mode run: per phase (the burst, the apply after it) Redis's forks,
AOF rewrites and RDB saves, the seconds a forked child ran and its CPU, and the messages
applied; a timeline every half second (acknowledged and applied so far, from the backlog
file both gateway processes map; AOF size; forks; the worker's, the front's and Redis's CPU
share), where a turn shows as a step of the applied count; and Redis's log lines on what it
forked for. Accoil is unreachable in both runs, so the outbox keeps every call: the
Redis figures include writing the outbox and the forwarder's retries, not draining it.

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
from benchkit.backlog_file import backlog_counters
from benchkit.redis_server import RedisServer
from benchkit.redis_watch import Watch
from benchkit.stack import (
    Keys,
    Sampler,
    Service,
    basic,
    cpu_seconds,
    descendants,
    exit_on_sigterm,
    free_port,
    get_json,
    memory,
    start_gateway,
    start_target,
    stopping,
    wait_for,
    workdir,
)
from benchkit.stats import table
from benchkit.traffic import Traffic
from benchkit.wrk import Bodies, Run, closed_loop, have_wrk, run_wrk

MB = 1024.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of full-speed burst")
    p.add_argument("--accounts", type=int, default=500)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: one core)")
    p.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--bodies", type=int, default=100, help="distinct batch templates")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed for the apply")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--store", choices=("sqlite", "redis"), default="sqlite",
                   help="redis: SQLite mode and then Redis mode, side by side")
    p.add_argument("--appendfsync", choices=("always", "everysec", "no"), default="everysec",
                   help="the Redis server's AOF fsync (with --store redis)")
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--workdir", type=Path, help="keep bodies, script, logs and data here")
    args = p.parse_args(argv)
    if args.users < args.accounts:
        p.error("--users must be at least --accounts")
    if args.generator == "wrk" and not have_wrk():
        p.error("--generator wrk: wrk is not installed (scripts/ensure_wrk.sh installs it)")
    args.env = dict(item.partition("=")[::2] for item in args.gateway_env)
    return args


class Burst:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.keys = Keys()
        self.auth = basic(self.keys.write_key)
        self.generator = "wrk" if args.generator == "wrk" or (
            args.generator == "auto" and have_wrk()) else "aiohttp"
        traffic = Traffic(accounts=args.accounts, users=args.users, mix={"track": 1.0},
                          seed=args.seed, id_prefix="bs" + secrets.token_hex(3))
        self.bodies = Bodies(traffic, folder / "bodies", count=args.bodies, size=args.batch_size)
        self.script = folder / "batch.lua"
        self.script.write_text(self.bodies.lua(self.auth))

    def load(self, url: str) -> Run:
        a = self.args
        nonce = secrets.token_hex(3)
        if self.generator == "wrk":
            return run_wrk(url, self.script, seconds=a.duration, connections=a.connections,
                           threads=a.threads, nonce=nonce, events_per_request=self.bodies.size)
        return asyncio.run(closed_loop(url, self.bodies, self.auth, seconds=a.duration,
                                       connections=a.connections, nonce=nonce))

    def ceiling(self) -> Run:
        noop = start_target(self.folder, "noop")
        with stopping(noop):
            return self.load(noop.url)

    def gateway(self, store: str = "sqlite") -> dict[str, Any]:
        a = self.args
        folder = self.folder / store
        folder.mkdir(parents=True, exist_ok=True)
        env = {
            # the whole burst must be taken: a 503 would measure the bound, not the apply
            "GATEWAY_MAX_BACKLOG": "50000000",
            "GATEWAY_SHUTDOWN_TIMEOUT": "1",
            **a.env,
        }
        redis = None
        if store == "redis":
            redis = RedisServer(folder / "redis", appendfsync=a.appendfsync)
            redis.start()
            env |= {"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": redis.url}
        try:
            nowhere = f"http://127.0.0.1:{free_port()}"
            gw = start_gateway(folder, self.keys, nowhere, env=env)
            sampler = Sampler(gw.child.pid)
            try:
                before = None if redis is None else redis_counters(redis)
                token = self.keys.admin_token
                counted = None if redis is None else pipeline_counters(gw, token)
                result = self._measure(gw, sampler, redis, folder / "gateway-data" / "backlog")
                if redis is not None and before is not None and counted is not None:
                    events = result["ledger_events"]
                    result["redis"] = redis_figures(redis, before, redis_counters(redis), events)
                    result["pipeline"] = pipeline_figures(
                        counted, pipeline_counters(gw, token), events)
                return result
            finally:
                sampler.stop()
                with stopping(gw):
                    pass
        finally:
            if redis is not None:
                redis.stop()

    def _measure(
        self, gw: Service, sampler: Sampler, redis: RedisServer | None = None,
        backlog: Path | None = None,
    ) -> dict[str, Any]:
        workers = descendants(gw.child.pid)
        worker = workers[0] if workers else None
        cpu0 = cpu_seconds(worker) if worker is not None else None
        start = memory(gw.child.pid)
        processes = {"front": gw.child.pid} | ({} if worker is None else {"worker": worker})
        snapshots = [cpu_snapshot(processes, redis)]
        # Redis mode: forks, AOF rewrites and the apply, sampled through the run
        watch = None if redis is None or backlog is None else Watch(redis, backlog, processes)

        polls = 0

        def ledger_events(whole: bool = True) -> int:
            nonlocal polls
            polls += 1
            stats = get_json(gw.url + "/admin/stats", token=self.keys.admin_token, timeout=120)
            events: int = stats["ledger"]["events"]
            return events if stats["inbox_messages"] == 0 or not whole else -1

        def applied_all() -> bool:
            # the backlog file first, free to read (each /admin/stats costs the store a count
            # of the whole outbox and ledger: polled every 0.2 s, it was part of what the
            # apply was measured at), then the ledger once the inbox looks drained
            counters = None if backlog is None else backlog_counters(backlog)
            if counters is not None and counters[1] < counters[0]:
                return False
            return ledger_events() >= acked

        t0 = time.monotonic()
        if watch is not None:
            watch.phase("burst")
        run = self.load(gw.url)
        # wrk counts the replies that came within its duration; the requests still on the wire
        # when it stopped were acknowledged too, so the ledger may hold a few batches more
        acked = run.ok * run.events_per_request
        burst_end = time.monotonic()
        if watch is not None:
            watch.phase("apply")
        snapshots.append(cpu_snapshot(processes, redis))
        in_burst = ledger_events(whole=False)  # applied while the burst came in
        wait_for(applied_all, timeout=self.args.timeout, every=0.05,
                 what="every acknowledged event in the ledger")
        applied_at = time.monotonic()
        cpu1 = cpu_seconds(worker) if worker is not None else None
        snapshots.append(cpu_snapshot(processes, redis))
        applied = ledger_events()
        worker_cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
        # the bench's own /admin/stats calls in the run, and what one costs at its end
        watched: dict[str, Any] = {
            "stats_polls": polls,
            "stats_cost": stats_cost(gw, self.keys.admin_token, worker, redis),
        }
        if watch is not None and redis is not None:
            watch.stop()
            watched["watch"] = watch.report(redis.dir / "redis.log")
        return {
            "acknowledged_events": acked,
            "ledger_events": applied,
            "errors": run.errors,
            "burst_seconds": round(run.seconds, 2),
            "ack_events_per_s": round(run.events_per_s, 1),
            "apply_after_burst_s": round(applied_at - burst_end, 2),
            "first_ack_to_last_applied_s": round(applied_at - t0, 2),
            "sustained_events_per_s": round(applied / (applied_at - t0), 1),
            "worker_cpu_s": None if worker_cpu is None else round(worker_cpu, 2),
            "worker_cpu_us_per_event": (
                None if worker_cpu is None or not applied else round(worker_cpu / applied * 1e6, 2)),
            "rss_start_mb": None if start is None else round(start.rss_kb / MB, 1),
            "peak_rss_mb": round(sampler.peak / MB, 1),
            "vm_hwm_mb": round(sampler.hwm / MB, 1),
            # each process's own peak: which one grows with the burst
            "hwm_mb": {name: round(hwm_kb(pid) / MB, 1) for name, pid in processes.items()},
            # the worker's cost an event differs between applying beside the burst (small
            # reads and turns, the cores shared with ingest) and after it
            "applied_in_burst": in_burst,
            "worker_cpu_us_per_event_by_phase": {
                phase: round((b["worker"] - a["worker"]) / n * 1e6, 2) if n > 0 else None
                for phase, a, b, n in (
                    ("burst", snapshots[0], snapshots[1], in_burst),
                    ("apply", snapshots[1], snapshots[2], applied - in_burst),
                ) if "worker" in a and "worker" in b
            },
            # every process's CPU over the burst and its apply, per event applied: where the
            # modes differ (Redis mode adds redis-server's)
            "cpu_us_per_event": cpu_per_event(snapshots[0], snapshots[2], applied),
            # busy or waiting: CPU seconds per second of each process in each phase
            "cpu_share": {
                "burst": cpu_shares(snapshots[0], snapshots[1]),
                "apply": cpu_shares(snapshots[1], snapshots[2]),
            },
            # which tree's code each process ran (against a baseline on PYTHONPATH)
            "compiled_from": {name: compiled_from(pid) for name, pid in processes.items()},
        } | watched


def stats_cost(
    gw: Service, token: str, worker: int | None, redis: RedisServer | None, n: int = 20
) -> dict[str, float | None]:
    """What one `/admin/stats` costs at the run's end (the outbox and ledger full): the
    worker's and Redis's CPU ms, and the wall ms, averaged over `n` calls."""
    processes = {} if worker is None else {"worker": worker}
    a = cpu_snapshot(processes, redis)
    for _ in range(n):
        get_json(gw.url + "/admin/stats", token=token, timeout=120)
    b = cpu_snapshot(processes, redis)
    return {
        "wall_ms": round((b["t"] - a["t"]) / n * 1000, 1),
        **{f"{k}_cpu_ms": round((b[k] - a[k]) / n * 1000, 1) if k in a and k in b else None
           for k in ("worker", "redis")},
    }


def cpu_snapshot(processes: dict[str, int], redis: RedisServer | None) -> dict[str, float]:
    """Now (monotonic) and the CPU seconds each process has used so far."""
    out = {"t": time.monotonic()}
    for name, pid in processes.items():
        used = cpu_seconds(pid)
        if used is not None:
            out[name] = used
    if redis is not None:
        with redis.client() as c:
            info = c.info("cpu")
        out["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        # its forked children (AOF rewrites): the machine's CPU too, not in Redis's own
        out["redis_children"] = (
            float(info["used_cpu_user_children"]) + float(info["used_cpu_sys_children"]))
    return out


def cpu_per_event(a: dict[str, float], b: dict[str, float], events: int) -> dict[str, float]:
    """Each process's CPU µs per event between two snapshots, and their total."""
    n = max(events, 1)
    used = {k: (b[k] - a[k]) / n * 1e6 for k in a if k != "t" and k in b}
    return {k: round(v, 2) for k, v in (used | {"total": sum(used.values())}).items()}


def cpu_shares(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Each process's CPU seconds per wall second between two snapshots (1.0: one core)."""
    wall = max(b["t"] - a["t"], 1e-9)
    return {k: round((b[k] - a[k]) / wall, 3) for k in a if k != "t" and k in b}


def compiled_from(pid: int) -> str | None:
    """The `gateway._check` the process mapped (/proc/<pid>/maps): its tree's path, or None
    (gone, or the pure path)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/gateway/_check." in line:
                    return line.split()[-1].rsplit("/gateway/", 1)[0]
    except OSError:
        pass
    return None


def hwm_kb(pid: int) -> int:
    """The process's own peak resident size (VmHWM), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pipeline_counters(gw: Service, token: str) -> dict[str, float]:
    """The Redis-mode pipeline's own counters, from the gateway's /metrics."""
    names = {
        "accoil_gateway_inbox_reads_total": "reads",
        "accoil_gateway_inbox_entries_read_total": "entries",
        "accoil_gateway_partition_commits_total": "commits",
        "accoil_gateway_partitions_owned": "owned",
        'accoil_gateway_lease_changes_total{change="acquired"}': "acquired",
    }
    req = urllib.request.Request(gw.url + "/metrics")
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[names[name]] = float(value)
    return out


def redis_counters(server: RedisServer) -> dict[str, float]:
    """Redis's running totals: commands, network bytes, CPU seconds, memory, AOF bytes."""
    with server.client() as c:
        info = c.info()
        stats = {k.removeprefix("cmdstat_"): v
                 for k, v in c.info("commandstats").items() if k.startswith("cmdstat_")}
    calls = {k: float(v["calls"]) for k, v in stats.items()}
    usec = {k: float(v["usec"]) for k, v in stats.items()}
    folder = server.dir / "appendonlydir"
    aof = sum(f.stat().st_size for f in folder.iterdir()) if folder.exists() else 0
    return {
        **{"calls:" + k: v for k, v in calls.items()},
        **{"usec:" + k: v for k, v in usec.items()},
        "commands": sum(calls.values()),
        "net_in": float(info["total_net_input_bytes"]),
        "net_out": float(info["total_net_output_bytes"]),
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "used_memory": float(info["used_memory"]),
        "aof": float(aof),
    }


def redis_figures(
    server: RedisServer, before: dict[str, float], after: dict[str, float], events: int
) -> dict[str, Any]:
    """What the burst and its apply cost Redis, per event applied."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    n = max(events, 1)
    # the commands that make most of an event's cost, per event (scripts' own commands
    # counted too: XADD runs inside ingest's EVAL)
    calls = sorted(((k.removeprefix("calls:"), v) for k, v in d.items()
                    if k.startswith("calls:") and v), key=lambda kv: -kv[1])
    usec = sorted(((k.removeprefix("usec:"), v) for k, v in d.items()
                   if k.startswith("usec:") and v), key=lambda kv: -kv[1])
    with server.client() as c:
        keys = int(c.dbsize())
    return {
        "commands": int(d["commands"]),
        "commands_per_event": round(d["commands"] / n, 3),
        "net_in_bytes_per_event": round(d["net_in"] / n, 1),
        "net_out_bytes_per_event": round(d["net_out"] / n, 1),
        "cpu_s": round(d["cpu_s"], 2),
        "cpu_us_per_event": round(d["cpu_s"] / n * 1e6, 2),
        "used_memory_bytes_per_event": round(d["used_memory"] / n, 1),
        "aof_bytes_per_event": round(d["aof"] / n, 1),
        "keys": keys,
        "appendfsync": server.appendfsync,
        "calls_per_event": {k: round(v / n, 3) for k, v in calls[:10]},
        # where Redis's time goes: each command's µs per event applied and per call (a
        # script's commands are counted both in it and in their own rows)
        "usec_per_event": {k: round(v / n, 3) for k, v in usec[:10]},
        "usec_per_call": {
            k: round(d["usec:" + k] / d["calls:" + k], 2) for k, _ in usec[:10]
            if d.get("calls:" + k)},
    }


def pipeline_figures(
    before: dict[str, float], after: dict[str, float], events: int
) -> dict[str, Any]:
    """How the Redis-mode worker read and committed: entries a read brought, events a
    partition commit applied."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0)
         for k in ("reads", "entries", "commits", "acquired")}
    return {
        # all 64 (the default) held from the start, or leases still being taken in the burst
        "partitions_owned": [int(before.get("owned", 0)), int(after.get("owned", 0))],
        "leases_acquired": int(d["acquired"]),
        "reads": int(d["reads"]),
        "entries_per_read": round(d["entries"] / d["reads"], 1) if d["reads"] else None,
        "commits": int(d["commits"]),
        "events_per_commit": round(events / d["commits"], 1) if d["commits"] else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    burst = Burst(args, folder)
    ceiling = burst.ceiling()
    gw = burst.gateway()
    noop = ceiling.events_per_s
    report: dict[str, Any] = {
        "generator": burst.generator,
        "duration_s": args.duration,
        "accounts": args.accounts,
        "users": args.users,
        "batch_events": args.batch_size,
        "noop_events_per_s": round(noop, 1),
        "gateway": gw,
        "ack_vs_noop": _ratio(gw["ack_events_per_s"], noop),
        "sustained_vs_noop": _ratio(gw["sustained_events_per_s"], noop),
        "ack_vs_sustained": _ratio(gw["ack_events_per_s"], gw["sustained_events_per_s"]),
    }
    if args.store == "redis":
        redis = burst.gateway("redis")
        report |= {
            "store": "redis",
            "redis_gateway": redis,
            "redis_sustained_vs_sqlite": _ratio(
                redis["sustained_events_per_s"], gw["sustained_events_per_s"]),
            "redis_ack_vs_sqlite": _ratio(redis["ack_events_per_s"], gw["ack_events_per_s"]),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with workdir(args.workdir, "bench-sustained-") as folder:
        rep = run(args, folder)
    gw = rep["gateway"]
    rows: list[tuple[str, object]] = [
        ("events acknowledged / accounts", f"{gw['acknowledged_events']:,} / {rep['accounts']:,}"),
        ("no-op ceiling (events/s)", rep["noop_events_per_s"]),
        ("acknowledged (events/s)", gw["ack_events_per_s"]),
        ("sustained, first ack to last applied (events/s)", gw["sustained_events_per_s"]),
        ("apply after the burst (s)", gw["apply_after_burst_s"]),
        ("worker CPU (us/event)", gw["worker_cpu_us_per_event"]),
        ("peak RSS, both processes (MB)", gw["peak_rss_mb"]),
    ]
    if "redis_gateway" in rep:
        rg = rep["redis_gateway"]
        rows = [(f"SQLite mode: {name}", value) for name, value in rows[2:]]
        rows = [
            ("events acknowledged (SQLite / Redis)",
             f"{gw['acknowledged_events']:,} / {rg['acknowledged_events']:,}"),
            ("no-op ceiling (events/s)", rep["noop_events_per_s"]),
            *rows,
            ("Redis mode: acknowledged (events/s)", rg["ack_events_per_s"]),
            ("Redis mode: sustained (events/s)", rg["sustained_events_per_s"]),
            ("Redis mode: apply after the burst (s)", rg["apply_after_burst_s"]),
            ("Redis mode: worker CPU (us/event)", rg["worker_cpu_us_per_event"]),
            ("Redis / SQLite, sustained (target >= 0.5)", rep["redis_sustained_vs_sqlite"]),
            ("Redis / SQLite, acknowledged", rep["redis_ack_vs_sqlite"]),
            ("Redis commands per event", rg["redis"]["commands_per_event"]),
            ("Redis network bytes in / out per event",
             f"{rg['redis']['net_in_bytes_per_event']} / {rg['redis']['net_out_bytes_per_event']}"),
            ("Redis CPU (us/event)", rg["redis"]["cpu_us_per_event"]),
            *((f"{mode} mode: CPU us/event, {' / '.join(split)}",
               " / ".join(str(split[k]) for k in split))
              for mode, split in (("SQLite", gw["cpu_us_per_event"]),
                                  ("Redis", rg["cpu_us_per_event"]))),
            ("Redis mode, apply: CPU share of worker / front / Redis",
             " / ".join(str(rg["cpu_share"]["apply"].get(k)) for k in ("worker", "front", "redis"))),
            ("Redis mode: entries per read, events per partition commit",
             f"{rg['pipeline']['entries_per_read']}, {rg['pipeline']['events_per_commit']}"),
            ("Redis mode: peak RSS of front / worker (MB)",
             f"{rg['hwm_mb'].get('front')} / {rg['hwm_mb'].get('worker')}"),
            ("Redis used_memory / AOF growth (bytes/event)",
             f"{rg['redis']['used_memory_bytes_per_event']} / "
             f"{rg['redis']['aof_bytes_per_event']}"),
        ]
    print(table(rows))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(rep), indent=2) + b"\n")
    print(msgspec.json.encode(rep).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
