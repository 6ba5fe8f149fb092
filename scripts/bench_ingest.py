"""Ingest benchmark: events/s the gateway acknowledges durably, against two baselines
measured in the same run, on the same pre-built batches, with the same load generator.

    python scripts/bench_ingest.py                      # 10 s a target, wrk if installed
    python scripts/bench_ingest.py --duration 20 --rounds 3 --profile /tmp/prof

Targets, each its own process (so each server gets a core of its own and wrk the other):
- noop:    an aiohttp handler that reads the body and answers 200, in a plain aiohttp app
           (router, one route per path, no middleware): DESIGN.md section 8's ceiling, which
           the ingest target (`gateway_vs_noop` >= 0.4) is judged against;
- noop_lean: the same handler reached as the gateway reaches its ingest handlers, without
           aiohttp's router: a stricter ceiling (`gateway_vs_noop_lean`), shown beside it;
- naive:   a relay that POSTs each event to mock_accoil's /v2/* before answering;
- gateway: the gateway with its defaults (durable acks, fsync "normal"), mock_accoil upstream,
           but a backlog bound of 50M: a full bound answers 503, which is not ingest.

Batches: 100 events (~20 KB), a realistic mix, built once as templates; every request gives
each event its own messageId (see benchkit/wrk.py). The load generator is wrk (1 thread,
`--connections`) with a Lua script; without wrk, an aiohttp client (it says which ran).

Then latency at half the gateway's measured maximum: a fresh gateway (an empty data dir),
a warm-up at that rate, then a wait until the worker has applied what the warm-up left (so
the measured run does not start beside a backlog of earlier load; the backlog at its start
and end is reported), then an open-loop generator sending at a fixed rate, latency counted
from each request's due time. wrk
cannot do that (its Lua `delay()` only pauses a connection after its own reply, which is
still a closed loop that hides queueing), and wrk2 is not packaged in Debian.

The last line of output is one JSON object (see `summary`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
from benchkit.stack import (
    Keys,
    Service,
    basic,
    cpu_seconds,
    exit_on_sigterm,
    get_json,
    send_json,
    start_gateway,
    start_mock,
    start_py_spy,
    start_target,
    workdir,
)
from benchkit.stats import table
from benchkit.traffic import DEFAULT_MIX, Traffic, parse_mix
from benchkit.wrk import Bodies, Run, closed_loop, have_wrk, open_loop, run_wrk

TARGETS = ("noop", "noop_lean", "naive", "gateway")
BASELINES = {
    "noop": "DESIGN.md section 8's ceiling: a plain aiohttp app (router, no middleware) whose "
            "handler reads the body and answers 200",
    "noop_lean": "the same handler without aiohttp's router, as the gateway serves ingest",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per target")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each target this many times (fresh process each); report medians")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: one core)")
    p.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto",
                   help="auto: wrk if installed, else aiohttp")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated subset of " + ",".join(TARGETS))
    p.add_argument("--bodies", type=int, default=100, help="distinct batch templates")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--latency-duration", type=float, default=10.0,
                   help="seconds of the half-rate latency run; 0 skips it")
    p.add_argument("--latency-rate", type=float, metavar="EVENTS_PER_S",
                   help="offer this rate in the latency run instead of half the gateway's "
                        "measured one (to compare two gateways at the same rate)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds the half-rate run waits, after its warm-up, for the backlog "
                        "to be applied before it measures (it measures anyway after that)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a gateway setting (repeatable)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record the gateway with py-spy during its (last) measured run")
    p.add_argument("--workdir", type=Path, help="keep bodies, script and logs here")
    args = p.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = set(args.target_list) - set(TARGETS)
    if bad or not args.target_list:
        p.error(f"--targets: choose among {', '.join(TARGETS)}")
    if args.generator == "wrk" and not have_wrk():
        p.error("--generator wrk: wrk is not installed (scripts/ensure_wrk.sh installs it)")
    args.env = dict(item.partition("=")[::2] for item in args.gateway_env)
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(str(exc))
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.keys = Keys()
        self.auth = basic(self.keys.write_key)
        self.generator = "wrk" if args.generator == "wrk" or (
            args.generator == "auto" and have_wrk()) else "aiohttp"
        traffic = Traffic(accounts=args.accounts, users=args.users, mix=args.mix_weights,
                          seed=args.seed, id_prefix="bi" + secrets.token_hex(3))
        self.bodies = Bodies(traffic, workdir / "bodies", count=args.bodies, size=args.batch_size)
        self.script = workdir / "batch.lua"
        self.script.write_text(self.bodies.lua(self.auth))
        self.mock: Service | None = None
        self.notes: dict[str, Any] = {}

    def load(self, url: str, seconds: float) -> Run:
        nonce = secrets.token_hex(3)  # every run its own messageIds, warm-ups included
        if self.generator == "wrk":
            a = self.args
            return run_wrk(url, self.script, seconds=seconds, connections=a.connections,
                           threads=a.threads, nonce=nonce, events_per_request=self.bodies.size)
        return asyncio.run(closed_loop(url, self.bodies, self.auth, seconds=seconds,
                                       connections=self.args.connections, nonce=nonce))

    def start(self, target: str) -> Service:
        assert self.mock is not None
        if target in BASELINES:
            return start_target(self.workdir, target)
        if target == "naive":
            return start_target(self.workdir, "naive", "--upstream", self.mock.url,
                                "--api-key", self.keys.api_key)
        data = self.workdir / "gateway-data"
        shutil.rmtree(data, ignore_errors=True)  # each gateway run starts from an empty store
        # a short shutdown: the backlog a run leaves behind is of no interest
        env = {
            "GATEWAY_SHUTDOWN_TIMEOUT": "1",
            # ingest acknowledges faster than the worker applies, so the default 5M bound
            # fills within a round and the rest of it is 503s: that measures the bound, not
            # ingest (the no-op has none). Applying is bench_sustained.py's to measure
            "GATEWAY_MAX_BACKLOG": "50000000",
            **self.args.env,
        }
        return start_gateway(self.workdir, self.keys, self.mock.url, env=env)

    def measure(self, target: str, last_round: bool) -> Run:
        a = self.args
        svc = self.start(target)
        spy: subprocess.Popen[bytes] | None = None
        try:
            if a.warmup > 0:
                self.load(svc.url, a.warmup)
                settle(svc, target)
            if target == "gateway" and a.profile is not None and last_round:
                spy = start_py_spy(svc.child.pid, a.profile, a.duration)
            # the server process's own CPU (the gateway's front, not its worker): whether a
            # target was CPU-bound or waited on the generator, and what a request costs it
            cpu0 = cpu_seconds(svc.child.pid)
            run = self.load(svc.url, a.duration)
            cpu1 = cpu_seconds(svc.child.pid)
            if cpu0 is not None and cpu1 is not None and run.requests and run.seconds:
                run.extra["cpu_us_per_request"] = round((cpu1 - cpu0) / run.requests * 1e6, 1)
                run.extra["core_busy"] = round((cpu1 - cpu0) / run.seconds, 3)
            if target == "gateway":
                run.extra["backlog_after"], run.extra["inbox_after"] = self.backlog(svc)
        finally:
            if spy is not None:
                spy.wait()
            svc.child.stop(5.0)
            if self.mock is not None:
                # forget what the naive relay sent, so the mock stays small and quick
                with contextlib.suppress(OSError):
                    send_json(self.mock.url + "/_mock/reset", "POST")
        return run

    def half_rate_latency(self, gateway_eps: float) -> Run | None:
        a = self.args
        if a.latency_duration <= 0 or gateway_eps <= 0:
            return None
        rps = gateway_eps / 2 / self.bodies.size
        svc = self.start("gateway")
        try:
            if a.warmup > 0:
                asyncio.run(open_loop(svc.url, self.bodies, self.auth, rate=rps,
                                      seconds=a.warmup, nonce=secrets.token_hex(3)))
            left, waited = self.drain(svc, a.drain_timeout)
            start, _ = self.backlog(svc)
            run = asyncio.run(open_loop(svc.url, self.bodies, self.auth, rate=rps,
                                        seconds=a.latency_duration, nonce=secrets.token_hex(3)))
            run.extra["backlog_after"], run.extra["inbox_after"] = self.backlog(svc)
            run.extra.update(backlog_after_warmup=left, drain_wait_s=round(waited, 2),
                             backlog_start=start)
        finally:
            svc.child.stop(5.0)
        return run

    def backlog(self, svc: Service) -> tuple[int, int]:
        """The gateway's backlog (messages and calls not done), and its inbox's share."""
        stats = get_json(svc.url + "/admin/stats", token=self.keys.admin_token)
        return int(stats["backlog"]["total"]), int(stats["inbox_messages"])

    def drain(self, svc: Service, within: float) -> tuple[int, float]:
        """Wait until the gateway's backlog is empty, at most `within` seconds: the backlog
        found at first, and the seconds waited."""
        t0 = time.monotonic()
        first = total = self.backlog(svc)[0]
        while total and time.monotonic() - t0 < within:
            time.sleep(0.2)
            total = self.backlog(svc)[0]
        return first, time.monotonic() - t0


def settle(svc: Service, target: str, within: float = 60.0) -> None:
    """Let the target finish what the warm-up left (the naive relay goes on relaying)."""
    if target == "gateway":
        return
    deadline = time.monotonic() + within
    while get_json(svc.url + "/healthz")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)


def median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.events_per_s)
    return ordered[len(ordered) // 2]


def summary(args: argparse.Namespace, bench: Bench, results: dict[str, list[Run]],
            latency: Run | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generator": bench.generator,
        "duration_s": args.duration,
        "connections": args.connections,
        "threads": args.threads if bench.generator == "wrk" else None,
        "rounds": args.rounds,
        "batch_events": bench.bodies.size,
        "batch_bytes": round(bench.bodies.mean_bytes),
        "cpus": os.cpu_count(),
    }
    eps: dict[str, float] = {}
    for target, runs in results.items():
        med = median_run(runs)
        eps[target] = med.events_per_s
        out[f"{target}_events_per_s"] = round(med.events_per_s, 1)
        out[f"{target}_requests_per_s"] = round(med.ok / med.seconds, 1) if med.seconds else 0.0
        out[f"{target}_rounds_events_per_s"] = [round(r.events_per_s, 1) for r in runs]
        out[f"{target}_latency_ms"] = med.latency
        if med.errors:
            out[f"{target}_errors"] = med.errors
        for k, v in med.extra.items():
            out[f"{target}_{k}"] = v
    out["baselines"] = {t: BASELINES[t] for t in BASELINES if t in results}
    for name in ("noop", "noop_lean", "naive"):
        base = f"gateway_vs_{name}"
        if "gateway" in eps and name in eps and eps[name] > 0:
            out[base] = round(eps["gateway"] / eps[name], 3)
        else:
            out[base] = None
    # requests a core serves, gateway over no-op: the ratio with each server given a whole
    # core, whichever side the generator held back (a no-op that leaves its core idle is
    # measuring wrk, not aiohttp)
    gateway_cost = out.get("gateway_cpu_us_per_request")
    for name in BASELINES:
        cost = out.get(f"{name}_cpu_us_per_request")
        out[f"gateway_vs_{name}_per_core"] = (
            round(cost / gateway_cost, 3) if cost and gateway_cost else None
        )
    if latency is not None:
        out["half_rate"] = {
            "generator": latency.generator,
            "events_per_s_target": round(latency.extra["target_rps"] * bench.bodies.size, 1),
            "rate_from": "--latency-rate" if args.latency_rate else "half the gateway's median",
            "events_per_s_achieved": round(latency.events_per_s, 1),
            "seconds": round(latency.seconds, 2),
            "latency_ms": latency.latency,
            "send_lag_ms": latency.extra["send_lag_ms"],
            "errors": latency.errors,
            "backlog_after_warmup": latency.extra.get("backlog_after_warmup"),
            "drain_wait_s": latency.extra.get("drain_wait_s"),
            "backlog_start": latency.extra.get("backlog_start"),
            "backlog_after": latency.extra.get("backlog_after"),
        }
        out["half_rate_p99_ms"] = latency.latency.get("p99")
    return out


def render(s: dict[str, Any], targets: list[str]) -> str:
    rows = []
    for t in targets:
        lat = s.get(f"{t}_latency_ms") or {}
        rows.append((t, s.get(f"{t}_events_per_s"), s.get(f"{t}_requests_per_s"),
                     lat.get("p50"), lat.get("p99"), s.get(f"{t}_cpu_us_per_request"),
                     s.get(f"{t}_core_busy"), str(s.get(f"{t}_errors", ""))))
    text = table(rows, header=("target", "events/s", "requests/s", "p50 ms", "p99 ms",
                               "CPU us/request", "core busy", "errors"))
    ratios = table([("gateway / noop (DESIGN 8's ceiling)", s["gateway_vs_noop"], ">= 0.4"),
                    ("gateway / noop, a core each (CPU per request)",
                     s["gateway_vs_noop_per_core"], ""),
                    ("gateway / noop_lean (no router: stricter)", s["gateway_vs_noop_lean"], ""),
                    ("gateway / noop_lean, a core each",
                     s["gateway_vs_noop_lean_per_core"], ""),
                    ("gateway / naive", s["gateway_vs_naive"], ">= 20")],
                   header=("ratio", "value", "target"))
    lines = [f"generator: {s['generator']}, {s['connections']} connections, "
             f"{s['duration_s']:g} s a target, {s['batch_events']} events "
             f"(~{s['batch_bytes']:,} bytes) a request", text, "", ratios]
    half = s.get("half_rate")
    if half:
        lat = half["latency_ms"]
        lines += ["", f"half rate ({half['events_per_s_target']:,.0f} events/s target, "
                      f"{half['events_per_s_achieved']:,.0f} achieved, open loop): "
                      f"p50 {lat['p50']} ms  p95 {lat['p95']} ms  p99 {lat['p99']} ms  "
                      f"max {lat['max']} ms  (target p99 < 50 ms)",
                  f"backlog: {half['backlog_after_warmup']:,} after the warm-up, "
                  f"{half['backlog_start']:,} at the start ({half['drain_wait_s']} s waited), "
                  f"{half['backlog_after']:,} at the end"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with workdir(args.workdir, "bench-ingest-") as folder:
        bench = Bench(args, folder)
        print(f"generator: {bench.generator}"
              + ("" if bench.generator == "wrk" else " (wrk not found: ratios to noop are "
                 "limited by the Python client)"), file=sys.stderr, flush=True)
        bench.mock = start_mock(folder, max_calls=10_000)
        results: dict[str, list[Run]] = {}
        latency: Run | None = None
        try:
            for r in range(args.rounds):
                for target in args.target_list:
                    print(f"round {r + 1}/{args.rounds}: {target} ...", file=sys.stderr,
                          flush=True)
                    run = bench.measure(target, last_round=r == args.rounds - 1)
                    results.setdefault(target, []).append(run)
                    print(f"  {run.events_per_s:,.0f} events/s", file=sys.stderr, flush=True)
            if "gateway" in results or args.latency_rate:
                gw = (2 * args.latency_rate if args.latency_rate
                      else statistics.median(r.events_per_s for r in results["gateway"]))
                print("half-rate latency run ...", file=sys.stderr, flush=True)
                latency = bench.half_rate_latency(gw)
        finally:
            bench.mock.child.stop()
        s = summary(args, bench, results, latency)
        print(render(s, args.target_list))
        print(msgspec.json.encode(s).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
