"""Structured logging: JSON lines in production, a readable console on a terminal.

Log lines name their source with the key `source_id` (`Source.id`, never a key) and their
account with `account`. Bind them once per actor or request:
`log = structlog.get_logger().bind(source_id=src.id, account=account)`.

Secrets are kept out twice over by a `Redactor`:
- keys that look secret (`api_key`, `writeKey`, `authorization`, `token`, ...) have their
  value replaced by "***", at any depth of nested dicts and lists;
- every registered secret value (write keys, API keys, the admin token, and the forms they
  travel in: base64 Basic credentials, the `stg_`-stripped key) is replaced by "***" in any
  string value, and again in the rendered line, which also covers tracebacks.
Records from the standard `logging` module (aiohttp, asyncio) go through the same chain.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TextIO
from urllib.parse import quote

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from gateway.loader import MIN_SECRET, redis_secrets

if TYPE_CHECKING:
    from gateway.config import Settings

SOURCE_ID = "source_id"
ACCOUNT = "account"

MASK = "***"

# Compared after lower-casing and dropping "_" and "-", so writeKey == write_key == write-key.
_SECRET_KEYS = frozenset(
    {"auth", "authorization", "proxyauthorization", "cookie", "setcookie", "credentials",
     "apikey", "xapikey", "accoilapikey", "writekey", "admintoken", "password", "passwd",
     "secret", "token", "bearer", "basic", "privatekey"}
)
_SECRET_SUFFIXES = ("apikey", "writekey", "token", "secret", "password", "passwd", "credential",
                    "credentials", "authorization")

_MAX_DEPTH = 8


def is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    norm = key.lower().replace("_", "").replace("-", "")
    return norm in _SECRET_KEYS or norm.endswith(_SECRET_SUFFIXES)


class Redactor:
    """Holds the secrets to mask; an instance is a structlog processor."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        secrets = [settings.admin_token] if settings.admin_token else []
        for src in settings.sources:
            secrets += [src.write_key, src.accoil_api_key]
        if settings.redis_url:
            # a short one would blot ordinary text out of every line; no log line carries the
            # URL's user part anyway (gateway.store.redis.connect.shown)
            secrets += [s for s in redis_secrets(settings.redis_url) if len(s) >= MIN_SECRET]
        return cls(secrets)

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            if secret:
                self._secrets.update(_variants(secret))
        if self._secrets:
            # longest first, so a key is masked whole before any shorter secret inside it
            alternatives = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives)))

    def mask(self, text: str) -> str:
        """`text` with every registered secret replaced by "***"."""
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return {k: self._value(k, v, 0) for k, v in event_dict.items()}

    def mask_rendered(self, logger: WrappedLogger, method_name: str, rendered: Any) -> str | bytes:
        """Last processor, after the renderer: catches what the renderer added (tracebacks)."""
        if isinstance(rendered, bytes):
            return self.mask(rendered.decode("utf-8", "replace")).encode()
        return self.mask(str(rendered))

    def _value(self, key: object, value: Any, depth: int) -> Any:
        if is_secret_key(key) and value is not None:
            return MASK
        if isinstance(value, str):
            return self.mask(value)
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, Mapping):
            return {k: self._value(k, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple) and key != "exc_info":
            return type(value)(self._value(None, v, depth + 1) for v in value)
        return value


def _variants(secret: str) -> set[str]:
    """The forms a secret travels in, each worth masking."""
    keys = {secret}
    if secret[:4].lower() == "stg_" and len(secret) > 4:
        keys.add(secret[4:])  # staging keys are sent without their prefix
    forms = set(keys)
    for key in keys:
        forms.add(base64.b64encode(key.encode()).decode())  # v2 Basic, some clients
        forms.add(base64.b64encode(f"{key}:".encode()).decode())  # Segment-style Basic
        forms.add(quote(key, safe=""))
    return forms


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
