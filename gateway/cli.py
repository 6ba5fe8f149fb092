"""`accoil-gateway`: run the gateway (`serve`) or validate its configuration (`check-config`).

Exit codes: 0 ok, 1 the server stopped on an error, 2 bad usage or bad configuration,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib import metadata
from typing import Any

from gateway.config import Settings
from gateway.loader import LOG_LEVELS, ConfigError, load_settings, shown_url
from gateway.mapping.upstream import STAGING_BASE_URL, upstream


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    config_path = args.config or os.environ.get("GATEWAY_CONFIG") or None
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        overrides = {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "flush_interval": args.flush_interval,
            "log_format": args.log_format,
            "log_level": args.log_level,
        }
    try:
        settings = load_settings(config_path=config_path, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(describe(settings, config_path))
        return 0
    return _serve(settings, config_path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accoil-gateway",
        description="A Segment-compatible sidecar that forwards product events to Accoil.",
        epilog="Precedence: flags > environment (GATEWAY_*, ACCOIL_*) > config file > defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    check = sub.add_parser(
        "check-config", help="validate the configuration, print the sources and exit"
    )
    for p in (serve, check):
        p.add_argument(
            "--config", metavar="PATH",
            help="TOML config file (default: $GATEWAY_CONFIG; none: environment only)",
        )
    serve.add_argument("--host", metavar="H", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", metavar="P", type=int, help="port to bind (default 8088)")
    serve.add_argument("--data-dir", metavar="D", help="directory of the store (default ./data)")
    serve.add_argument(
        "--flush-interval", metavar="S", type=float,
        help="seconds between actor flushes (default 2)",
    )
    serve.add_argument(
        "--log-format", choices=["auto", "json", "console"],
        help="auto: console on a terminal, JSON otherwise (default auto)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="(default info)")
    return parser


def describe(settings: Settings, config_path: str | None) -> str:
    """What check-config prints: secret-free, one line per source."""
    n = len(settings.sources)
    lines = [f"config ok ({config_path or 'environment only'}): {n} source{'s' * (n != 1)}"]
    header = ("id", "api", "base_url", "track_mode", "rate_cap/s", "concurrency_cap")
    # where calls really go: a stg_ key on the segment dialect goes to Accoil's staging host
    rows = [header] + [
        (s.id, s.api, upstream(s).base_url, s.track_mode,
         "none" if s.rate_per_second is None else f"{s.rate_per_second:g}",
         "none" if s.max_concurrency is None else str(s.max_concurrency))
        for s in settings.sources
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    lines += [
        f"  {s.id}: stg_ key on the segment dialect: calls go to {STAGING_BASE_URL}/segment "
        "with the prefix stripped"
        for s in settings.sources if upstream(s).base_url != s.base_url
    ]
    lines.append(
        f"server: {settings.host}:{settings.port}, data_dir {settings.data_dir}, "
        f"admin routes {'on' if settings.admin_token else 'off'}"
    )
    if settings.store == "redis" and settings.redis_url:
        lines.append(
            f"store: redis at {shown_url(settings.redis_url)}, {settings.partitions} partitions, "
            f"WAIT for {settings.redis_wait_replicas} replicas (not contacted here)"
        )
    return "\n".join(lines)


def _serve(settings: Settings, config_path: str | None) -> int:
    import structlog

    from gateway.observability.logging import Redactor, configure_logging

    configure_logging(
        settings.log_format, settings.log_level, redactor=Redactor.from_settings(settings)
    )
    log = structlog.get_logger("gateway.cli")
    log.info(
        "starting", config=config_path, host=settings.host, port=settings.port,
        sources=[s.id for s in settings.sources],
    )
    # imported late: the server pulls in aiohttp and the store, which the other commands
    # do not need
    from gateway.app import StartupError
    from gateway.server import serve

    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130
    except StartupError as exc:
        # the operator's to fix, and the message says what: one line, no traceback
        log.error(f"cannot start: {exc}")
        return 1
    except Exception:
        # logged rather than left to the interpreter, so the traceback goes through redaction
        log.exception("gateway stopped on an error")
        return 1
    return 0


def _version() -> str:
    try:
        return metadata.version("accoil-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
