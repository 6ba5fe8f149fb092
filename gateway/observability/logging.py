"""Structured logging: JSON lines in production, a readable console on a terminal.

Log lines name their source with the key `source_id` (`Source.id`, never a key) and their
account with `account`. Bind them once per actor or request:
`log = structlog.get_logger().bind(source_id=src.id, account=account)`.

Secrets are kept out by a `Redactor` (`gateway.observability.redaction`, the one that also
scrubs admin replies and dead-letter bodies): in every event value, and again in the
rendered line, which also covers tracebacks. Records from the standard `logging` module
(aiohttp, asyncio) go through the same chain.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import Processor

from gateway.observability.redaction import MASK, Redactor, is_secret_key

__all__ = ["MASK", "BadRequestFilter", "Redactor", "configure_logging", "is_secret_key"]

def configure_logging(
    format: Literal["auto", "json", "console"],
    level: str,
    *,
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard `logging` root to write to `stream` (stderr)."""
    out = stream if stream is not None else sys.stderr
    redact = redactor if redactor is not None else Redactor()
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    tty = _isatty(out)
    console = format == "console" or (format == "auto" and tty)
    renderer: Processor
    tail: list[Processor]
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
        tail = [redact, renderer, redact.mask_rendered]
    else:
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.format_exc_info, redact, renderer, redact.mask_rendered]
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # not cached: a later configure_logging (tests, reload) must reach every logger
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.set_name("accoil-gateway")
    handler.addFilter(BadRequestFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                structlog.stdlib.ExtraAdder(),
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "accoil-gateway"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)


class BadRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (an over-long header, a bad request line) as an
    error with a traceback quoting the raw bytes, which may hold a credential that no mask
    recognises (the start of a longer Basic header): keep one warning line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            record.msg, record.args = "bad HTTP request: %s %s", (exc.code, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
