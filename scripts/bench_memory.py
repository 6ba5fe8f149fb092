"""Memory benchmark: the gateway's resident memory while a large backlog builds up with
Accoil down, once it is applied, and while it drains after Accoil comes back.

    python scripts/bench_memory.py                       # 1,000,000 events, 100,000 accounts
    python scripts/bench_memory.py --events 20000 --accounts 2000 --drain-seconds 0

1. The gateway starts with its upstream on a port where nothing listens (forwarding fails,
   the circuit opens), GATEWAY_MAX_BACKLOG above `--events`.
2. `--events` messages arrive (every account gets traffic: users are visited in a shuffled
   cycle, two users an account by default), as fast as the gateway acknowledges them.
3. Wait until the inbox is applied (everything is in the ledger and the outbox), then until
   idle actors are passivated.
4. mock_accoil starts on the upstream port; the drain rate is measured for
   `--drain-seconds` (0: until the outbox is empty) from the first call that goes through
   (after a long outage the circuit probes Accoil once a minute at most).

VmRSS of the gateway (its process and its pipeline worker, summed) is sampled every 100 ms
from /proc; the report gives the peak
of each phase, and VmHWM (the kernel's peak). Target: < 200 MB with 1M events, 100k accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
from benchkit.client import PushResult, push
from benchkit.stack import (
    Keys,
    Sampler,
    exit_on_sigterm,
    free_port,
    get_json,
    memory,
    start_gateway,
    start_mock,
    stopping,
    wait_for,
    workdir,
)
from benchkit.stats import Progress, table
from benchkit.traffic import DEFAULT_MIX, Tally, Traffic, parse_mix

MB = 1024.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--users", type=int, help="default: two per account")
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--drain-seconds", type=float, default=60.0,
                   help="seconds of drain to measure; 0: until the outbox is empty")
    p.add_argument("--idle-wait", type=float, default=30.0,
                   help="seconds to wait for idle actors to be passivated")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for each phase")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.users = args.users or 2 * args.accounts
    if args.users < args.accounts:
        p.error("--users must be at least --accounts")
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(str(exc))
    args.env = dict(item.partition("=")[::2] for item in args.gateway_env)
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = Keys()
    upstream_port = free_port()  # nothing listens there until the drain phase
    env = {
        "GATEWAY_MAX_BACKLOG": str(max(5_000_000, 2 * args.events)),
        "ACCOIL_RATE_PER_SECOND": "1000000",
        "ACCOIL_MAX_CONCURRENCY": "32",
        "GATEWAY_RETRY_BASE": "0.2",
        "GATEWAY_RETRY_MAX": "1",
        "GATEWAY_CIRCUIT_COOLDOWN": "1",
        **args.env,
    }
    gw = start_gateway(workdir, keys, f"http://127.0.0.1:{upstream_port}", env=env)
    mock = None
    sampler = Sampler(gw.child.pid)
    report: dict[str, Any] = {
        "events": args.events, "accounts": args.accounts, "users": args.users,
        "gateway_env": env,
    }
    try:
        def stats() -> dict[str, Any]:
            result: dict[str, Any] = get_json(gw.url + "/admin/stats", token=keys.admin_token,
                                              timeout=120)
            return result

        start = memory(gw.child.pid)
        report["rss_start_mb"] = round(start.rss_kb / MB, 1) if start else None
        traffic = Traffic(accounts=args.accounts, users=args.users, mix=args.mix_weights,
                          order="cycle", seed=args.seed, id_prefix=f"bm{int(time.time())}")
        tally = Tally(traffic)
        progress = None if args.no_progress else Progress(args.events)
        t0 = time.monotonic()

        def show(r: PushResult) -> None:
            if progress is not None:
                rss = sampler.last / MB
                progress.update(r.events, f"{r.events:,} events accepted, "
                                f"{r.events / max(time.monotonic() - t0, 1e-9):,.0f}/s, "
                                f"RSS {rss:,.0f} MB")

        pushed = asyncio.run(push(gw.url, keys.write_key, traffic, tally, events=args.events,
                                  batch_size=args.batch_size, connections=args.connections,
                                  on_progress=show))
        if progress is not None:
            progress.close()
        report["ingest"] = {
            "seconds": round(pushed.seconds, 1),
            "events_per_s": round(pushed.events / pushed.seconds, 1),
            "requests": pushed.requests, "retried_batches": pushed.retried,
            "status": dict(pushed.status),
            "distinct_accounts": len(traffic.accounts_seen),
            "peak_rss_mb": round(sampler.mark() / MB, 1),
        }
        print(f"ingested {pushed.events:,} events in {pushed.seconds:.1f} s; applying ...",
              file=sys.stderr, flush=True)
        waited = wait_for(lambda: stats()["inbox_messages"] == 0, timeout=args.timeout,
                          every=1.0, what="inbox applied")
        s = stats()
        report["applied"] = {
            "seconds_after_ingest": round(waited, 1),
            "outbox_calls": s["outbox_calls"], "ledger": s["ledger"],
            "active_actors": s["active_actors"],
            "peak_rss_mb": round(sampler.mark() / MB, 1),
            "rss_mb": round(sampler.last / MB, 1),
        }
        print(f"applied after {waited:.1f} s more; waiting for actors to passivate ...",
              file=sys.stderr, flush=True)
        try:
            wait_for(lambda: stats()["active_actors"] == 0, timeout=args.idle_wait, every=1.0)
            idle = True
        except TimeoutError:
            idle = False
        report["idle"] = {"all_passivated": idle, "active_actors": stats()["active_actors"],
                          "rss_mb": round(sampler.last / MB, 1)}
        sampler.mark()

        queued = stats()["outbox_calls"]
        mock = start_mock(workdir, port=upstream_port, max_calls=100_000)
        started = time.monotonic()
        # after a long outage the circuit probes Accoil once a cooldown (at most 60 s): the
        # drain rate counts from the first call that went through
        first: float | None = None
        limit = args.drain_seconds if args.drain_seconds > 0 else args.timeout
        left = queued
        polled = started
        while True:
            time.sleep(0.5)
            left = stats()["outbox_calls"]
            now = time.monotonic()
            if first is None and left < queued:
                first = polled  # the first call went through after the previous look
            polled = now
            if progress is not None:
                progress.update(queued - left, f"draining: {queued - left:,} of {queued:,} "
                                f"calls, RSS {sampler.last / MB:,.0f} MB")
            if left == 0 or (first is not None and now - first >= limit):
                break
            if first is None and now - started > max(limit, 90.0):
                break  # Accoil never came back into use: report it as such
        took = (time.monotonic() - first) if first is not None else 0.0
        if progress is not None:
            progress.close()
        report["drain"] = {
            "queued_calls": queued,
            "first_call_after_s": None if first is None else round(first - started, 1),
            "sent_calls": queued - left,
            "seconds": round(took, 1),
            "calls_per_s": round((queued - left) / took, 1) if took else 0.0,
            "emptied": left == 0,
            "peak_rss_mb": round(sampler.mark() / MB, 1),
        }
    finally:
        sampler.stop()
        with stopping(mock, gw):
            pass
    peak = max(report["ingest"]["peak_rss_mb"], report["applied"]["peak_rss_mb"],
               report["drain"]["peak_rss_mb"])
    report["peak_rss_mb"] = peak
    report["vm_hwm_mb"] = round(sampler.hwm / MB, 1)
    report["target_mb"] = 200
    report["rss_series_kb"] = sampler.series
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with workdir(args.workdir, "bench-memory-") as folder:
        rep = run(args, folder)
    print(table([
        ("events / accounts", f"{rep['events']:,} / {rep['accounts']:,}"),
        ("ingest (events/s)", rep["ingest"]["events_per_s"]),
        ("peak RSS while ingesting (MB)", rep["ingest"]["peak_rss_mb"]),
        ("peak RSS while applying (MB)", rep["applied"]["peak_rss_mb"]),
        ("RSS once idle (MB)", rep["idle"]["rss_mb"]),
        ("peak RSS while draining (MB)", rep["drain"]["peak_rss_mb"]),
        ("VmHWM (MB)", rep["vm_hwm_mb"]),
        ("drain (calls/s)", rep["drain"]["calls_per_s"]),
    ]))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(rep), indent=2) + b"\n")
    slim = {k: v for k, v in rep.items() if k != "rss_series_kb"}
    print(msgspec.json.encode(slim).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
