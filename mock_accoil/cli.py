"""`mock-accoil` / `python -m mock_accoil`: serve the mock until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

import msgspec
import structlog
from aiohttp import web

from mock_accoil.app import create_app
from mock_accoil.capacity import Capacity
from mock_accoil.faults import INGEST_PATHS, Fault
from mock_accoil.state import DEFAULT_MAX_CALLS, MockAccoil

EPILOG = """\
examples:
  mock-accoil --port 8089
  mock-accoil --fault-status 503 --fault-rate 0.2      # a fifth of the calls get 503
  mock-accoil --fault-status 429 --fault-count 3 --retry-after 2
  mock-accoil --latency 0.05 --drop-rate 0.01 --fault-path /v2/track
  mock-accoil --fault '{"status": 500, "count": 2, "path": "/v2/identify"}'
  mock-accoil --capacity-rate 400 --capacity-concurrency 64 --capacity-latency 0.05

Faults apply to ingest calls only, before auth and validation; faulted calls
change no state. 429 always carries Retry-After (default 1 s). Faults can be
added, listed and cleared at run time too: POST/GET/DELETE /_mock/faults.

A capacity is what a rate-limited Accoil allows: past N calls a second (a token
bucket, bursts of a tenth of a second's worth unless --capacity-burst) or C calls
in flight, calls get 429 with Retry-After. It can be changed at run time with
PUT /_mock/capacity (GET shows it and its counts, DELETE lifts it).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mock-accoil",
        description="A local double of Accoil's ingestion API (v2, /segment, legacy v1), "
        "with inspection and fault injection under /_mock/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8089, help="port to bind; 0 picks a free one")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault-rate RNG (default 0)")
    p.add_argument(
        "--max-calls",
        type=int,
        default=DEFAULT_MAX_CALLS,
        help=f"calls the journal keeps, oldest dropped first (default {DEFAULT_MAX_CALLS})",
    )
    f = p.add_argument_group("faults")
    f.add_argument(
        "--fault-status", type=int, metavar="S", help="reply S (400-599) instead of handling calls"
    )
    f.add_argument(
        "--fault-rate", type=float, metavar="R", help="fail this fraction of calls (default: all)"
    )
    f.add_argument(
        "--fault-count", type=int, metavar="N", help="fail only the next N calls, then expire"
    )
    f.add_argument(
        "--retry-after", type=int, metavar="SEC", help="Retry-After header of failures, seconds"
    )
    f.add_argument(
        "--latency", type=float, metavar="SEC", help="add SEC seconds before every reply"
    )
    f.add_argument(
        "--drop-rate",
        type=float,
        metavar="R",
        help="close the connection, unanswered, for fraction R of calls",
    )
    f.add_argument(
        "--fault-path",
        choices=INGEST_PATHS,
        metavar="PATH",
        help="limit --fault-status, --latency and --drop-rate to one ingest path",
    )
    f.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="JSON",
        help="a fault as POST /_mock/faults takes it (repeatable)",
    )
    c = p.add_argument_group("capacity")
    c.add_argument("--capacity-rate", type=float, metavar="N", help="calls a second allowed")
    c.add_argument("--capacity-burst", type=int, metavar="B",
                   help="calls allowed at once within the rate (default N / 10)")
    c.add_argument("--capacity-concurrency", type=int, metavar="C",
                   help="calls allowed in flight at once")
    c.add_argument("--capacity-latency", type=float, metavar="SEC",
                   help="seconds each admitted call takes")
    c.add_argument("--capacity-retry-after", type=int, metavar="SEC",
                   help="Retry-After of the 429s past the capacity (default 1)")
    log = p.add_argument_group("logging")
    log.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    log.add_argument("--log-level", default="info", help="debug, info, warning, error")
    return p


def faults_from_args(args: argparse.Namespace) -> list[Fault]:
    """The faults the flags ask for; raises ValueError naming the flag at fault."""
    specs: list[dict[str, Any]] = []
    path = args.fault_path
    if args.fault_status is not None:
        specs.append(
            {
                "status": args.fault_status,
                "rate": args.fault_rate,
                "count": args.fault_count,
                "retry_after": args.retry_after,
                "path": path,
            }
        )
    elif args.fault_rate is not None or args.fault_count is not None or args.retry_after:
        raise ValueError("--fault-rate, --fault-count and --retry-after need --fault-status")
    if args.latency is not None:
        specs.append({"latency": args.latency, "path": path})
    if args.drop_rate is not None:
        specs.append({"drop": True, "rate": args.drop_rate, "path": path})
    for text in args.fault:
        try:
            specs.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--fault {text!r}: not JSON ({exc})") from None
    faults = []
    for spec in specs:
        try:
            faults.append(msgspec.convert({k: v for k, v in spec.items() if v is not None}, Fault))
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid fault {spec}: {exc}") from None
    return faults


def capacity_from_args(args: argparse.Namespace) -> Capacity | None:
    """The capacity the flags ask for, or None; raises ValueError naming the flag at fault."""
    spec = {
        "rate": args.capacity_rate,
        "burst": args.capacity_burst,
        "concurrency": args.capacity_concurrency,
        "latency": args.capacity_latency,
        "retry_after": args.capacity_retry_after,
    }
    given = {k: v for k, v in spec.items() if v is not None}
    if not given:
        return None
    if args.capacity_rate is None and args.capacity_concurrency is None:
        raise ValueError("--capacity-* flags need --capacity-rate or --capacity-concurrency")
    if args.capacity_burst is not None and args.capacity_rate is None:
        raise ValueError("--capacity-burst needs --capacity-rate")
    try:
        return msgspec.convert(given, Capacity)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid capacity: {_flag_named(str(exc))}") from None


def _flag_named(error: str) -> str:
    # "Expected `float` > 0.0 - at `$.rate`" -> "--capacity-rate: Expected float > 0.0"
    text, _, where = error.partition(" - at `$.")
    field = where.rstrip("`")
    text = text.replace("`", "")
    return f"--capacity-{field.replace('_', '-')}: {text}" if field else text


def configure_logging(fmt: str, level: str) -> None:
    renderer: Any
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def serve(state: MockAccoil, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and return."""
    log = structlog.get_logger("mock_accoil")
    runner = web.AppRunner(
        create_app(state), access_log=None, handle_signals=False, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        log.info("listening", url=f"http://{host}:{bound}", faults=len(state.faults()))
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        faults = faults_from_args(args)
        capacity = capacity_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_format, args.log_level)
    state = MockAccoil(seed=args.seed, max_calls=args.max_calls)
    for fault in faults:
        state.add_fault(fault)
    if capacity is not None:
        state.set_capacity(capacity)
    try:
        asyncio.run(serve(state, args.host, args.port))
    except OSError as exc:
        structlog.get_logger("mock_accoil").error("cannot serve", error=str(exc))
        return 1
    return 0
