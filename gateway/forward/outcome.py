"""What one POST to Accoil came to: delivered, worth retrying, or rejected for good.

A `Reject` becomes a dead letter that admins read and replay, so its body is
clipped to `BODY_LIMIT` characters and scrubbed of the source's credentials:
an upstream that echoes the request headers back must not leak the API key into
the store, the admin API or a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

# Dead letters keep enough of an error reply to diagnose it, not whole pages.
BODY_LIMIT = 4096
REDACTED = "[REDACTED]"
TRUNCATED = "...[truncated]"


class Delivered(msgspec.Struct, frozen=True, tag="delivered"):
    """A 2xx answer (Accoil answers 202): the call is Accoil's now."""

    status: int
    latency: float


class Retry(msgspec.Struct, frozen=True, tag="retry"):
    """Not delivered, but may be later: 429, 408, 5xx, timeouts, connection errors.

    `reason` is a short stable code (for logs and metric labels), never an
    exception message: "rate_limited", "server_error", "timeout", "connection",
    "disconnected", "client_error" or "closed". `retry_after` is the server's
    Retry-After in seconds, uncapped (see `backoff.delay`).
    """

    reason: str
    status: int | None
    retry_after: float | None
    latency: float


class Reject(msgspec.Struct, frozen=True, tag="reject"):
    """A final refusal (any other non-2xx): dead-letter it with status and body."""

    status: int
    body: str
    latency: float


Outcome = Delivered | Retry | Reject


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret, in any letter case."""
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    return text


def reject_body(raw: bytes, secrets: Iterable[str], *, complete: bool) -> str:
    """The dead-letter form of an error reply: decoded, redacted, then clipped.

    `complete` is False when `raw` is only the start of a longer body; its tail
    may then hold the first part of a secret that redaction cannot recognise,
    so that tail is dropped before clipping.
    """
    secrets = [s for s in secrets if s]
    text = redact(raw.decode("utf-8", errors="replace"), secrets)
    if not complete:
        text = text[: max(0, len(text) - max((len(s) for s in secrets), default=0))]
    if not complete or len(text) > BODY_LIMIT:
        text = text[:BODY_LIMIT] + TRUNCATED
    return text
