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

HEADERS = 1024  # Authorization values remembered (each one named a configured key)


class Keys:
    """Finds the source of a write key, comparing every key in constant time."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._sources = [(s.write_key.encode(), s) for s in sources]
        # Authorization header -> its source, for headers that named a configured key: a
        # client sends the same header on every request, and decoding and comparing it
        # again cost more than the rest of the check. The lookup hashes the whole value
        # with the process's random SipHash key, so its time tells nothing about a key
        self._headers: dict[str, Source] = {}

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

    def known_header(self, header: str | None) -> Source | None:
        """The source of an Authorization header seen before (`by_header`), else None."""
        return None if header is None else self._headers.get(header)

    def by_header(self, header: str) -> Source | None:
        """The source of the write key a Basic header names (None: no configured key),
        remembered for the next request that sends the same header."""
        found = self.find(basic_user(header))
        if found is not None:
            if len(self._headers) >= HEADERS:
                self._headers.clear()  # only valid headers get here: a rare reset
            self._headers[header] = found
        return found


def names_key(header: str) -> bool:
    """Whether an Authorization header names a write key: any scheme but Bearer (an OAuth
    token); a scheme other than Basic, or a malformed Basic value, names no configured key."""
    return header.strip().partition(" ")[0].lower() != "bearer"


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
