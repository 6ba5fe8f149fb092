"""Forwarding benchmark: how fast the gateway drains its outbox into an unthrottled Accoil,
against a bare aiohttp loop posting the same calls to the same mock, as a ratio.

    python scripts/bench_forward.py --calls 20000 --concurrency 16 --json forward.json

1. mock_accoil answers 503 to everything; the gateway (rate 1,000,000/s, `--concurrency`
   calls in flight, short backoff) takes `--calls` track/page/screen events and queues one
   call each (exact mode), unable to deliver them.
2. The fault is lifted; the gateway drains. Its rate is calls / (last - first accepted call),
   both times from the mock's journal, so the circuit's cooldown before the first call does
   not count.
3. The calls the mock accepted are posted again, same paths and bodies, by `--concurrency`
   aiohttp workers in one loop, and timed the same way from the journal.
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
    p.add_argument("--calls", type=int, default=20000, help="events queued, one call each")
    p.add_argument("--concurrency", type=int, default=16,
                   help="calls in flight: the gateway's ACCOIL_MAX_CONCURRENCY and the loop's")
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
    return args


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


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    keys = Keys()
    mock = start_mock(workdir, max_calls=args.calls * 3 + 10_000, fault_status=503)
    env = {
        "ACCOIL_RATE_PER_SECOND": "1000000",
        "ACCOIL_MAX_CONCURRENCY": str(args.concurrency),
        "GATEWAY_RETRY_BASE": "0.05",
        "GATEWAY_RETRY_MAX": "0.5",
        "GATEWAY_CIRCUIT_COOLDOWN": "0.5",
        "GATEWAY_MAX_BACKLOG": str(max(5_000_000, args.calls * 2)),
        **dict(item.partition("=")[::2] for item in args.gateway_env),
    }
    gw = start_gateway(workdir, keys, mock.url, env=env)
    with stopping(mock, gw):

        def stats() -> dict[str, Any]:
            result: dict[str, Any] = get_json(gw.url + "/admin/stats", token=keys.admin_token)
            return result

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
        "complete": len(gw_calls) == expected and final["outbox_calls"] == 0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with workdir(args.workdir, "bench-forward-") as folder:
        rep = run(args, folder)
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
