"""Write-key authentication, as Segment does it: HTTP Basic user name, or `writeKey` in the body.

A `Bearer` header (SDKs in OAuth mode send one, with the write key in the body) is an OAuth
token, not a write key: it is ignored and the body's `writeKey` decides. When a Basic header
and the body's `writeKey` are both present they must name the same key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable

from gateway.config import Source


class Keys:
    """Finds the source of a write key, comparing every key in constant time."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._sources = [(s.write_key.encode(), s) for s in sources]

    def find(self, key: str | None) -> Source | None:
        if not key:
            return None
        given = key.encode()
        found = None
        for secret, source in self._sources:
            # no early exit: the time taken does not say which key matched
            if hmac.compare_digest(given, secret):
                found = source
        return found


def header_key(header: str | None) -> str | None:
    """The write key an Authorization header names: the Basic user name; None for no header
    or a Bearer token; "" (no such key) for any other scheme or a malformed Basic value."""
    if header is None:
        return None
    if header.strip().partition(" ")[0].lower() == "bearer":
        return None
    return basic_user(header)


def same_key(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def basic_user(header: str | None) -> str | None:
    """The user name of a Basic Authorization header; "" when the header is malformed."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]
