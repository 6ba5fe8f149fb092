"""The one redactor: secrets never reach a log line, an admin reply or a dead letter.

A `Redactor` holds the secrets to mask (write keys, API keys, the admin token, the Redis
URL's password) and masks each of them in every form it travels in: as given, in any letter
case, the `stg_`-stripped API key, base64 (v2 and Segment-style Basic credentials) and
URL-quoted. Logging uses it as a structlog processor, where in addition the value of any
key that looks secret (`api_key`, `writeKey`, `authorization`, `token`, ...) is masked
whatever it holds, at any depth of nested dicts and lists; the admin API masks the dead
letters it shows with it; the forwarder's client scrubs Accoil's error replies with it
before they become dead letters.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from structlog.typing import EventDict, WrappedLogger

from gateway.loader import MIN_SECRET, redis_secrets

if TYPE_CHECKING:
    from gateway.config import Settings

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
            # in any case: an upstream may echo a key upper-cased, and over-masking is harmless
            self._pattern = re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)

    @property
    def longest(self) -> int:
        """Characters in the longest form masked: how much of a cut-off text's tail may be
        the start of a secret that `mask` cannot recognise."""
        return max(map(len, self._secrets), default=0)

    def mask(self, text: str) -> str:
        """`text` with every registered secret, in any letter case, replaced by "***"."""
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
