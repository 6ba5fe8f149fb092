"""Forwarding benchmark, two scenarios.

`--scenario bare` (the default): how fast the gateway drains its outbox into an Accoil with
no latency and no limit, against a bare aiohttp loop posting the same calls to the same
mock, as a ratio.

    python scripts/bench_forward.py --calls 20000 --concurrency 16 --json forward.json

1. mock_accoil answers 503 to everything; the gateway (at most `--concurrency` calls in
   flight, short backoff) takes `--calls` track/page/screen events and queues one call each
   (exact mode), unable to deliver them.
2. The fault is lifted; the gateway drains. Its rate is calls / (last - first accepted call),
   both times from the mock's journal, so the circuit's cooldown before the first call does
   not count.
3. The calls the mock accepted are posted again, same paths and bodies, by `--concurrency`
   aiohttp workers in one loop, and timed the same way from the journal.

`--scenario capacity`: does the gateway, with its default settings, find the pace of an
Accoil that answers in `--latency` seconds and takes only so many calls a second, a
capacity it is not told (mock_accoil's capacity fault: 429 with Retry-After past it)?

    python scripts/bench_forward.py --scenario capacity --phases 400:60,100:20,400:20

The events are queued while the mock drops every connection (a failure that says nothing
of Accoil's pace); then the connections are back, under the first phase's capacity. Each
phase holds its capacity for its seconds (the first from the first call on), and the rest
drains at the last one. Pacing is the gateway's default (no cap); only the retry and
circuit timers are short, so that the drain starts as soon as the mock is back. From the mock's journal: accepted calls a second and 429s in each
phase, and after each change how long until a one-second window holds at least 0.8 x the
new capacity with at most 5% of calls answered 429. From the mock's counts: every event
counted exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from benchkit import pace
from benchkit.client import push
from benchkit.stack import (
    Keys,
    descendants,
    exit_on_sigterm,
    get_json,
    send_json,
    start_gateway,
    start_mock,
    start_py_spy,
    stopping,
    wait_for,
    workdir,
)
from benchkit.stats import table
from benchkit.traffic import Tally, Traffic, parse_mix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("bare", "capacity"), default="bare")
    p.add_argument("--calls", type=int,
                   help="events queued, one call each (default: bare 20000; capacity: enough "
                        "to keep the gateway busy through every phase, plus 10%%)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="bare: calls in flight, the gateway's ACCOIL_MAX_CONCURRENCY and the loop's")
    p.add_argument("--phases", default="400:60,100:20,400:20", metavar="RATE:SECONDS,...",
                   help="capacity: the mock's calls a second, and for how long")
    p.add_argument("--latency", type=float, default=0.05,
                   help="capacity: seconds the mock takes to answer each call")
    p.add_argument("--burst", type=int,
                   help="capacity: calls the mock allows at once (default a tenth of a second's)")
    p.add_argument("--accounts", type=int, default=500)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--mix", default="track=75,page=20,screen=5",
                   help="counted kinds only, so that every event is one call")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a gateway setting (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each phase")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the report here")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record the gateway with py-spy while it drains (--profile-seconds)")
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args(argv)
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as exc:
        p.error(str(exc))
    if any(args.mix_weights[k] for k in ("identify", "group")):
        p.error("--mix: identify and group coalesce, so calls would not match events; leave them out")
    try:
        args.phase_list = parse_phases(args.phases)
    except ValueError as exc:
        p.error(f"--phases: {exc}")
    if args.calls is None:
        args.calls = (20000 if args.scenario == "bare" else
                      int(sum(r * s for r, s in args.phase_list) * 1.1) + 500)
    return args


def parse_phases(text: str) -> list[tuple[float, float]]:
    """"400:30,100:20" -> [(400.0, 30.0), (100.0, 20.0)]: (calls a second, seconds)."""
    phases = []
    for part in text.split(","):
        rate, sep, seconds = part.partition(":")
        try:
            phase = (float(rate), float(seconds))
        except ValueError:
            raise ValueError(f"{part!r}: expected RATE:SECONDS") from None
        if not sep or phase[0] <= 0 or phase[1] <= 0:
            raise ValueError(f"{part!r}: expected RATE:SECONDS, both positive")
        phases.append(phase)
    return phases


def _when(call: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(call["time"]).replace("Z", "+00:00")).timestamp()


def rate_of(calls: list[dict[str, Any]]) -> tuple[float, float]:
    """(calls per second, seconds) between the first and last call of the journal slice."""
    if len(calls) < 2:
        return 0.0, 0.0
    span = _when(calls[-1]) - _when(calls[0])
    # journal times have millisecond resolution
    span = max(span, 0.001)
    return (len(calls) - 1) / span, span


def last_seq(mock: str, since: int = 0) -> int:
    calls = get_json(f"{mock}/_mock/calls?since={since}")
    return int(calls[-1]["seq"]) if calls else since


def lift_drop(mock: str, since: int) -> int:
    """Lift the mock's faults, and return the journal's seq after which every call came
    after the lift: the last call the drop fault took (`since` if none did after it).

    A seq read before the lift is not that boundary: the gateway's first calls (the
    limiter's first 8) and its circuit's probes go out about when its inbox empties, tens
    of milliseconds from the read, and on a loaded machine they land between the read and
    the lift. The mock decides and journals each call under one lock, and every call
    before the lift is dropped, none after it."""
    send_json(mock + "/_mock/faults", "DELETE")
    calls = get_json(f"{mock}/_mock/calls?since={since}")
    return max([since, *(int(c["seq"]) for c in calls if c["status"] is None)])


async def bare_loop(mock: str, api_key: str, calls: list[dict[str, Any]], concurrency: int
                    ) -> dict[str, Any]:
    headers = {"Authorization": f"Basic {api_key}", "Content-Type": "application/json"}
    work = [(mock + c["path"], msgspec.json.encode(c["body"])) for c in calls]
    todo = iter(work)
    status: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for url, data in todo:
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    status[resp.status] = status.get(resp.status, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    return {"seconds": took, "status": status}


def gateway_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """The gateway's settings: short retry and circuit timers, so that a drain starts at
    once when the mock is back instead of up to a minute later; then `extra`, then
    `--gateway-env`."""
    return {
        "GATEWAY_RETRY_BASE": "0.05",
        "GATEWAY_RETRY_MAX": "0.5",
        "GATEWAY_CIRCUIT_COOLDOWN": "0.5",
        "GATEWAY_MAX_BACKLOG": str(max(5_000_000, args.calls * 2)),
        **extra,
        **dict(item.partition("=")[::2] for item in args.gateway_env),
    }


def admin_stats(url: str, keys: Keys) -> dict[str, Any]:
    result: dict[str, Any] = get_json(url + "/admin/stats", token=keys.admin_token)
    return result


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = Keys()
    mock = start_mock(workdir, max_calls=args.calls * 3 + 10_000, fault_status=503)
    gw = start_gateway(workdir, keys, mock.url,
                       env=gateway_env(args, ACCOIL_MAX_CONCURRENCY=str(args.concurrency)))
    with stopping(mock, gw):

        def stats() -> dict[str, Any]:
            return admin_stats(gw.url, keys)

        traffic = Traffic(accounts=args.accounts, users=args.users, mix=args.mix_weights,
                          seed=args.seed, id_prefix=f"bf{int(time.time())}")
        tally = Tally(traffic)
        pushed = asyncio.run(push(gw.url, keys.write_key, traffic, tally, events=args.calls))
        expected = sum(tally.expected.values())
        wait_for(lambda: stats()["inbox_messages"] == 0, timeout=args.timeout,
                 what="gateway applying the events")
        queued = stats()["outbox_calls"]
        seq0 = last_seq(mock.url)
        spy = None
        if args.profile is not None:
            # the forwarders run in the gateway's pipeline worker, a child process
            target = next(iter(descendants(gw.child.pid)), gw.child.pid)
            spy = start_py_spy(target, args.profile, args.profile_seconds, "forward")
        send_json(mock.url + "/_mock/faults", "DELETE")
        t0 = time.monotonic()
        wait_for(lambda: stats()["outbox_calls"] == 0, timeout=args.timeout, every=0.1,
                 what="gateway draining its outbox")
        wall = time.monotonic() - t0
        if spy is not None:
            spy.wait()
        gw_calls = get_json(f"{mock.url}/_mock/calls?status=202&since={seq0}")
        gw_rate, gw_span = rate_of(gw_calls)

        seq1 = last_seq(mock.url, seq0)
        bare = asyncio.run(bare_loop(mock.url, keys.api_key, gw_calls, args.concurrency))
        bare_calls = get_json(f"{mock.url}/_mock/calls?status=202&since={seq1}")
        bare_rate, bare_span = rate_of(bare_calls)
        final = stats()
    return {
        "calls": len(gw_calls),
        "events": pushed.events,
        "expected_calls": expected,
        "queued_before_drain": queued,
        "concurrency": args.concurrency,
        "gateway_calls_per_s": round(gw_rate, 1),
        "gateway_seconds": round(gw_span, 3),
        "gateway_wall_seconds": round(wall, 3),
        "bare_calls_per_s": round(bare_rate, 1),
        "bare_seconds": round(bare_span, 3),
        "bare_client_seconds": round(bare["seconds"], 3),
        "bare_status": {str(k): v for k, v in bare["status"].items()},
        "gateway_vs_bare": round(gw_rate / bare_rate, 3) if bare_rate else None,
        "target": ">= 0.5",
        "dead_letters": final["dead_letters"],
        "gateway_forwarding": final["sources"][0]["forwarding"],
        "complete": len(gw_calls) == expected and final["outbox_calls"] == 0,
    }


CAPACITY_TARGETS = {
    "drain_vs_capacity": ">= 0.8",
    "share_429": "<= 0.05",
    "converged_after_s": "<= 15 after each change",
    "lost": "0",
    "doubled": "0",
}


def run_capacity(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = Keys()
    phases: list[tuple[float, float]] = args.phase_list
    capacity: dict[str, Any] = {"latency": args.latency}
    if args.burst is not None:
        capacity["burst"] = args.burst
    mock = start_mock(workdir, max_calls=args.calls * 3 + 10_000)
    send_json(mock.url + "/_mock/capacity", "PUT", {**capacity, "rate": phases[0][0]})
    # while the events are queued the mock drops every connection: a failure that says
    # nothing about Accoil's pace, so the limit starts the drain as it would start any day
    send_json(mock.url + "/_mock/faults", "POST", {"drop": True})
    # default pacing: no rate or concurrency cap, nothing the gateway is told about Accoil
    gw = start_gateway(workdir, keys, mock.url, env=gateway_env(args))
    with stopping(mock, gw):

        def stats() -> dict[str, Any]:
            return admin_stats(gw.url, keys)

        def forwarding() -> dict[str, Any]:
            found: dict[str, Any] = stats()["sources"][0]["forwarding"] or {}
            return found

        traffic = Traffic(accounts=args.accounts, users=args.users, mix=args.mix_weights,
                          seed=args.seed, id_prefix=f"bc{int(time.time())}")
        tally = Tally(traffic)
        pushed = asyncio.run(push(gw.url, keys.write_key, traffic, tally, events=args.calls))
        wait_for(lambda: stats()["inbox_messages"] == 0, timeout=args.timeout,
                 what="gateway applying the events")
        queued = stats()["outbox_calls"]
        seq0 = lift_drop(mock.url, last_seq(mock.url))
        wait_for(lambda: int(get_json(mock.url + "/_mock/capacity")["admitted"]) > 0,
                 timeout=args.timeout, every=0.05, what="the first call")
        started = time.time()
        changes = [started]
        samples: list[dict[str, Any]] = []
        for i, (rate, seconds) in enumerate(phases):
            if i:
                changes.append(time.time())
                send_json(mock.url + "/_mock/capacity", "PUT", {**capacity, "rate": rate})
            until = changes[-1] + seconds
            while (now := time.time()) < until:
                fwd = forwarding()
                samples.append({"t": round(now - started, 1), "capacity": rate,
                                "limit": fwd.get("limit"), "in_flight": fwd.get("in_flight"),
                                "calls_per_s": fwd.get("calls_per_s")})
                time.sleep(min(0.5, max(0.0, until - time.time())))
        ended = time.time()
        wait_for(lambda: (st := stats())["inbox_messages"] == 0 and st["outbox_calls"] == 0,
                 timeout=args.timeout, every=0.25, what="gateway draining the rest")
        final = stats()
        journal = get_json(f"{mock.url}/_mock/calls?since={seq0}")
        counted: dict[str, int] = {}
        for row in get_json(f"{mock.url}/_mock/counts?api_key={keys.api_key}"):
            counted[row["event"]] = counted.get(row["event"], 0) + int(row["count"])

    ok = sorted(_when(c) for c in journal if c["status"] == 202)
    limited = sorted(_when(c) for c in journal if c["status"] == 429)
    others = [c for c in journal if c["status"] not in (202, 429)]
    other = len(others)
    # the first phase starts with the first call the mock journaled, not when we saw it
    first = min(ok[:1] + limited[:1], default=started)
    bounds = [first, *changes[1:], ended]
    report_phases = [pace.phase(ok, limited, bounds[i], bounds[i + 1], rate)
                     for i, (rate, _) in enumerate(phases)]
    expected = tally.expected
    lost = sum(max(0, n - counted.get(k, 0)) for k, n in expected.items())
    doubled = sum(max(0, counted.get(k, 0) - expected.get(k, 0)) for k in counted)
    during = pace.between(ok, first, ended)
    refused = pace.between(limited, first, ended)
    drain = report_phases[0]
    converged = [p["converged_after_s"] for p in report_phases[1:]]
    share_429 = round(refused / (during + refused), 4) if during + refused else 0.0
    rep: dict[str, Any] = {
        "scenario": "capacity",
        "latency_s": args.latency,
        "burst": args.burst,
        "phases": report_phases,
        "drain_calls_per_s": drain["accepted_per_s"],
        "drain_vs_capacity": drain["vs_capacity"],
        "share_429": share_429,
        "converged_after_s": converged,
        "events": pushed.events,
        "queued_before_drain": queued,
        "expected_calls": sum(expected.values()),
        "accepted_calls": len(ok),
        "answered_429": len(limited),
        "other_answers": other,
        # what they were, so that a run with any says why (status and the mock's reply)
        "other_replies": [[c["status"], c.get("reply")] for c in others[:5]],
        "counted": sum(counted.values()),
        "lost": lost,
        "doubled": doubled,
        "dead_letters": final["dead_letters"],
        "gateway_forwarding": final["sources"][0]["forwarding"],
        "limit_samples": samples[::2],
        "timeline": pace.timeline(ok, limited, first, bounds[-1]),
        "targets": CAPACITY_TARGETS,
    }
    rep["meets_targets"] = bool(
        rep["drain_vs_capacity"] >= 0.8 and share_429 <= 0.05
        and all(c is not None and c <= 15 for c in converged) and lost == 0 and doubled == 0
    )
    rep["complete"] = lost == 0 and doubled == 0 and final["outbox_calls"] == 0
    return rep


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with workdir(args.workdir, "bench-forward-") as folder:
        rep = run_capacity(args, folder) if args.scenario == "capacity" else run(args, folder)
    if args.scenario == "capacity":
        rows: list[tuple[object, ...]] = [
            (f"capacity {p['capacity_per_s']:g}/s for {p['seconds']:g} s", p["accepted_per_s"],
             p["vs_capacity"], p["share_429"], p["converged_after_s"])
            for p in rep["phases"]
        ]
        print(table(rows, header=("phase", "accepted/s", "x capacity", "429 share",
                                  "converged after s")))
        print(table([
            ("drain vs capacity", f"{rep['drain_vs_capacity']} (target >= 0.8)"),
            ("share answered 429", f"{rep['share_429']} (target <= 0.05)"),
            ("counted / expected", f"{rep['counted']} / {rep['expected_calls']}"),
            ("lost, doubled", f"{rep['lost']}, {rep['doubled']}"),
            ("meets targets", rep["meets_targets"]),
        ]))
    else:
        print(table([
            ("calls forwarded", rep["calls"]),
            ("gateway drain (calls/s)", rep["gateway_calls_per_s"]),
            ("bare aiohttp loop (calls/s)", rep["bare_calls_per_s"]),
            ("gateway / bare", f"{rep['gateway_vs_bare']} (target {rep['target']})"),
            ("all queued calls delivered", rep["complete"]),
        ]))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(rep), indent=2) + b"\n")
    print(msgspec.json.encode(rep).decode())
    return 0 if rep["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
