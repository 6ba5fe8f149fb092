"""Load test: realistic Segment traffic into a running gateway, then check what reached Accoil.

    python scripts/loadtest.py --spawn --duration 20 --rate 5000 --json report.json
    # against `make run`'s demo (its keys; a gateway refuses keys under 8 characters)
    python scripts/loadtest.py --url http://127.0.0.1:8088 --mock-url http://127.0.0.1:8089 \\
        --write-key demo_write_key --admin-token demo_admin_token --api-key demo_api_key \\
        --duration 30

N accounts and M users (each user in one account, users' activity Zipf-skewed), a mix of
identify, group, track, page and screen, a share of re-sends (same messageId), batches of a
given size, gzip or not, at a target rate or as fast as the gateway answers, for a duration.
Then it waits for the gateway to drain (admin stats: inbox and outbox empty) and compares
mock_accoil's counts with what it should have counted: the distinct accepted track, page and
screen messages, per event name (`track_mode = "exact"`).

`--spawn` starts mock_accoil and the gateway on free ports (forwarding at 5,000 calls/s,
concurrency 32, unless `--gateway-env` says otherwise) and stops them afterwards. Otherwise
point it at a gateway whose upstream is the mock given by `--mock-url`; run it against a mock
nobody else is using, since it reads the mock's whole journal.

With `--rate`, requests leave on a fixed schedule (open loop) and latency is measured from
the time a request was due, so a slow gateway cannot hide behind a slowed-down client
(coordinated omission). Without it, `--connections` clients send back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from benchkit.client import Inspect, Outcome, Poster
from benchkit.stack import Keys, Service, exit_on_sigterm, start_gateway, start_mock
from benchkit.stats import Progress, latency_ms, table
from benchkit.traffic import DEFAULT_MIX, Tally, Traffic, parse_mix

SPAWN_ENV = {"ACCOIL_RATE_PER_SECOND": "5000", "ACCOIL_MAX_CONCURRENCY": "32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = p.add_argument_group("target")
    target.add_argument("--spawn", action="store_true",
                        help="start mock_accoil and the gateway on free ports, stop them after")
    target.add_argument("--url", default="http://127.0.0.1:8088", help="the gateway")
    target.add_argument("--mock-url", default="http://127.0.0.1:8089",
                        help="the mock_accoil the gateway forwards to")
    target.add_argument("--write-key", default=os.environ.get("GATEWAY_WRITE_KEY"),
                        help="(default $GATEWAY_WRITE_KEY)")
    target.add_argument("--admin-token", default=os.environ.get("GATEWAY_ADMIN_TOKEN"),
                        help="for /admin/stats (default $GATEWAY_ADMIN_TOKEN); without it "
                             "the drain is judged from the mock's counts alone")
    target.add_argument("--api-key", default=os.environ.get("ACCOIL_API_KEY"),
                        help="count only the mock's counts under this key (default $ACCOIL_API_KEY)")
    target.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="with --spawn: a setting for the gateway (repeatable), e.g. "
                             "GATEWAY_MAX_BACKLOG=100000")
    target.add_argument("--workdir", type=Path,
                        help="with --spawn: where logs and the store go (default: a temp dir)")
    load = p.add_argument_group("traffic")
    load.add_argument("--accounts", type=int, default=200)
    load.add_argument("--users", type=int, default=2000)
    load.add_argument("--skew", type=float, default=1.1,
                      help="Zipf exponent of user activity; 0 is uniform (default 1.1)")
    load.add_argument("--mix", default=DEFAULT_MIX, help=f"call weights (default {DEFAULT_MIX})")
    load.add_argument("--dup-rate", type=float, default=0.02,
                      help="share of messages that re-send an earlier messageId (default 0.02)")
    load.add_argument("--batch-size", type=int, default=100)
    load.add_argument("--gzip", action="store_true", help="Content-Encoding: gzip")
    load.add_argument("--rate", type=float, default=0.0,
                      help="target events/s, open loop; 0: as fast as answered (default)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    load.add_argument("--connections", type=int, default=16,
                      help="concurrent requests at most (default 16)")
    load.add_argument("--seed", type=int, default=1)
    out = p.add_argument_group("report")
    out.add_argument("--json", type=Path, metavar="PATH", help="also write the report here")
    out.add_argument("--drain-timeout", type=float, default=120.0,
                     help="seconds to wait for the gateway to forward everything")
    out.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    args = p.parse_args(argv)
    if not args.write_key and not args.spawn:
        p.error("--write-key (or $GATEWAY_WRITE_KEY) is needed without --spawn")
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(str(exc))
    for name, value, low in (("--accounts", args.accounts, 1), ("--batch-size", args.batch_size, 1),
                             ("--connections", args.connections, 1)):
        if value < low:
            p.error(f"{name} must be at least {low}")
    if args.users < args.accounts:
        p.error("--users must be at least --accounts (every account has a user)")
    if not 0 <= args.dup_rate < 1:
        p.error("--dup-rate must be in [0, 1)")
    env: dict[str, str] = {}
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--gateway-env {item!r}: expected NAME=VALUE")
        env[name] = value
    args.env = env
    return args


class Load:
    """The load phase: who sent what, what came back."""

    def __init__(self, args: argparse.Namespace, traffic: Traffic, tally: Tally) -> None:
        self.args = args
        self.traffic = traffic
        self.tally = tally
        self.latencies: list[float] = []
        self.status: Counter[str] = Counter()
        self.requests = 0
        self.sent = 0  # messages, re-sends included
        self.resent = 0
        self.accepted = 0  # messages in batches answered 200, re-sends included
        self.late = 0  # open loop: requests that left more than 10 ms after they were due

    def record(self, batch_seqs: list[int], size: int, resent: int, out: Outcome) -> None:
        self.requests += 1
        self.sent += size
        self.resent += resent
        self.latencies.append(out.latency)
        self.status[str(out.status) if out.status is not None else "error"] += 1
        if out.status == 200:
            self.accepted += size - len(out.rejected)
            self.tally.accept(batch_seqs, out.rejected)

    async def run(self, poster: Poster, progress: Progress | None) -> float:
        a = self.args
        start = time.perf_counter()
        end = start + a.duration
        slots = itertools.count()
        interval = a.batch_size / a.rate if a.rate > 0 else 0.0

        async def worker() -> None:
            while True:
                # a batch is built only once it is sure to be sent: a re-send must repeat
                # a message that really went out
                due: float | None = None
                if interval:
                    due = start + next(slots) * interval
                    if due >= end:
                        return
                elif time.perf_counter() >= end:
                    return
                batch = self.traffic.batch(a.batch_size)
                data = poster.encode(batch.body)
                if due is not None:
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif wait < -0.010:
                        self.late += 1
                out = await poster.post(data, started=due)
                self.record(batch.seqs, len(batch.seqs), batch.resent, out)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    progress.update(elapsed, (
                        f"{elapsed:5.1f}/{a.duration:g}s  sent {self.sent:,}  accepted "
                        f"{self.accepted:,}  ({self.accepted / max(elapsed, 1e-9):,.0f} ev/s)  "
                        f"503 {self.status.get('503', 0)}  errors {self.status.get('error', 0)}"
                    ))

        ticker = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker() for _ in range(a.connections)))
        finally:
            ticker.cancel()
        return time.perf_counter() - start


async def drain(
    inspect: Inspect, tally: Tally, within: float, progress: Progress | None
) -> dict[str, Any]:
    """Wait until the gateway has nothing left to forward (or the mock counts all we expect)."""
    t0 = time.perf_counter()
    expected_total = sum(tally.expected.values())
    quiet = 0
    stats: dict[str, Any] | None = None
    counted_total = 0
    while True:
        await inspect.journal()
        stats = await inspect.stats()
        counted = await inspect.counts()
        counted_total = sum(counted.get(k, 0) for k in tally.expected)
        elapsed = time.perf_counter() - t0
        if stats is not None:
            empty = stats["inbox_messages"] == 0 and stats["outbox_calls"] == 0
        else:
            empty = counted_total >= expected_total
        quiet = quiet + 1 if empty else 0
        if progress is not None:
            inbox = stats["inbox_messages"] if stats else "?"
            outbox = stats["outbox_calls"] if stats else "?"
            progress.update(min(elapsed, within), (
                f"draining {elapsed:5.1f}s  inbox {inbox}  outbox {outbox}  "
                f"counted {counted_total:,}/{expected_total:,}"
            ))
        if quiet >= 2:
            return {"drained": True, "seconds": round(elapsed, 3), "stats": stats}
        if elapsed > within:
            return {"drained": False, "seconds": round(elapsed, 3), "stats": stats}
        await asyncio.sleep(0.25)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        keys = Keys()
        gateway_url, mock_url = args.url, args.mock_url
        write_key, token, api_key = args.write_key, args.admin_token, args.api_key
        mock: Service | None = None
        if args.spawn:
            if args.workdir is not None:
                workdir = args.workdir
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loadtest-")))
            mock = start_mock(workdir, max_calls=1_000_000)
            stack.callback(mock.child.stop)
            gw = start_gateway(workdir, keys, mock.url, env={**SPAWN_ENV, **args.env})
            stack.callback(gw.child.stop)
            gateway_url, mock_url = gw.url, mock.url
            write_key, token, api_key = keys.write_key, keys.admin_token, keys.api_key
        timeout = aiohttp.ClientTimeout(total=60)
        load_session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.connections), timeout=timeout))
        side_session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        inspect = Inspect(side_session, gateway_url, token, mock_url, api_key)
        await inspect.journal_start(fresh=mock is not None)
        counts_before = await inspect.counts()
        stats_before = await inspect.stats()
        track_mode = _track_mode(stats_before)

        traffic = Traffic(
            accounts=args.accounts, users=args.users, mix=args.mix_weights, skew=args.skew,
            dup_rate=args.dup_rate, seed=args.seed, id_prefix="lt" + secrets.token_hex(4),
        )
        tally = Tally(traffic)
        load = Load(args, traffic, tally)
        poster = Poster(load_session, gateway_url, write_key, use_gzip=args.gzip)
        show = not args.no_progress
        progress = Progress(args.duration) if show else None
        seconds = await load.run(poster, progress)
        if progress is not None:
            progress.close()
        progress = Progress(args.drain_timeout) if show else None
        drained = await drain(inspect, tally, args.drain_timeout, progress)
        if progress is not None:
            progress.close()
        await inspect.journal()
        counts_after = await inspect.counts()
        return report(args, load, tally, seconds, drained, inspect, track_mode,
                      counts_before, counts_after, spawned=mock is not None)
    raise AssertionError("unreachable")


def _track_mode(stats: dict[str, Any] | None) -> str:
    if stats:
        modes = {s.get("track_mode") for s in stats.get("sources", [])}
        if len(modes) == 1:
            return str(modes.pop())
    return "exact"


def report(
    args: argparse.Namespace,
    load: Load,
    tally: Tally,
    seconds: float,
    drained: dict[str, Any],
    inspect: Inspect,
    track_mode: str,
    before: dict[str, int],
    after: dict[str, int],
    *,
    spawned: bool,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name in sorted(set(tally.expected) | {k for k in after if after[k] != before.get(k, 0)}):
        counted = after.get(name, 0) - before.get(name, 0)
        rows.append({"event": name, "expected": tally.expected.get(name, 0), "counted": counted})
    expected_total = sum(int(r["expected"]) for r in rows)
    counted_total = sum(int(r["counted"]) for r in rows)
    mismatches = [r for r in rows if r["expected"] != r["counted"]]
    calls = inspect.calls_seen
    return {
        "config": {
            "spawned": spawned, "accounts": args.accounts, "users": args.users,
            "skew": args.skew, "mix": args.mix_weights, "dup_rate": args.dup_rate,
            "batch_size": args.batch_size, "gzip": args.gzip, "rate": args.rate or None,
            "duration": args.duration, "connections": args.connections, "seed": args.seed,
            "gateway_env": {**(SPAWN_ENV if spawned else {}), **args.env},
        },
        "duration_s": round(seconds, 3),
        "requests": {"sent": load.requests, "status": dict(load.status), "late": load.late},
        "events": {
            "sent": load.sent,
            "resent": load.resent,
            "accepted": load.accepted,
            "accepted_distinct": tally.distinct,
        },
        "throughput": {
            "events_per_s": round(load.accepted / seconds, 1) if seconds else 0.0,
            "requests_per_s": round(load.requests / seconds, 1) if seconds else 0.0,
        },
        "latency_ms": {**latency_ms(load.latencies),
                       "from": "due time (open loop)" if args.rate else "send time"},
        "upstream": {
            "calls": calls,
            "by_path": dict(inspect.calls_by_path),
            "by_status": dict(inspect.calls_by_status),
            "calls_per_event": round(calls / tally.distinct, 4) if tally.distinct else None,
        },
        "drain": {"drained": drained["drained"], "seconds": drained["seconds"]},
        "gateway_stats": drained["stats"],
        "completeness": {
            "mode": track_mode,
            "checked": track_mode == "exact",
            "ok": track_mode == "exact" and not mismatches and drained["drained"],
            "expected_total": expected_total,
            "counted_total": counted_total,
            "events": rows,
            "mismatches": mismatches,
        },
    }


def render(rep: dict[str, Any]) -> str:
    ev, lat, up, comp = rep["events"], rep["latency_ms"], rep["upstream"], rep["completeness"]
    status = ", ".join(f"{k}: {v:,}" for k, v in sorted(rep["requests"]["status"].items()))
    summary = table([
        ("duration (s)", rep["duration_s"]),
        ("requests", f"{rep['requests']['sent']:,} ({status})"),
        ("events sent (re-sends)", f"{ev['sent']:,} ({ev['resent']:,})"),
        ("events accepted (distinct)", f"{ev['accepted']:,} ({ev['accepted_distinct']:,})"),
        ("ingest throughput (events/s)", rep["throughput"]["events_per_s"]),
        (f"latency ms, from {lat['from']}",
         f"p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}"),
        ("upstream calls", up["calls"]),
        ("upstream calls / distinct event", up["calls_per_event"]),
        ("drained", f"{rep['drain']['drained']} after {rep['drain']['seconds']} s"),
    ])
    counts = table(
        [(r["event"], r["expected"], r["counted"], "" if r["expected"] == r["counted"] else "MISMATCH")
         for r in comp["events"]],
        header=("event", "expected", "counted", ""),
    )
    verdict = (
        f"completeness ({comp['mode']}): " + (
            "not checked (track_mode is not exact)" if not comp["checked"] else
            f"OK, {comp['counted_total']:,} of {comp['expected_total']:,}" if comp["ok"] else
            f"FAILED, counted {comp['counted_total']:,} of {comp['expected_total']:,}, "
            f"{len(comp['mismatches'])} event names differ"
        )
    )
    return f"{summary}\n\n{counts}\n\n{verdict}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    rep = asyncio.run(run(args))
    print(render(rep))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(rep), indent=2) + b"\n")
    return 0 if rep["completeness"]["ok"] or not rep["completeness"]["checked"] else 1


if __name__ == "__main__":
    sys.exit(main())
