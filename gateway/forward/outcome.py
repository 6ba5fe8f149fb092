"""What one POST to Accoil came to: delivered, worth retrying, or rejected for good.

A `Reject` becomes a dead letter that admins read and replay, so its body is
clipped to `BODY_LIMIT` characters and scrubbed of the source's credentials by the
gateway's one `Redactor`, as logs and admin replies are:
an upstream that echoes the request headers back must not leak the API key into
the store, the admin API or a log.
"""

from __future__ import annotations

import msgspec

from gateway.observability.redaction import Redactor

# Dead letters keep enough of an error reply to diagnose it, not whole pages.
BODY_LIMIT = 4096
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


def reject_body(raw: bytes, redactor: Redactor, *, complete: bool) -> str:
    """The dead-letter form of an error reply: decoded, redacted, then clipped.

    `complete` is False when `raw` is only the start of a longer body; its tail
    may then hold the first part of a secret that redaction cannot recognise,
    so that tail is dropped before clipping.
    """
    text = redactor.mask(raw.decode("utf-8", errors="replace"))
    if not complete:
        text = text[: max(0, len(text) - redactor.longest)]
    if not complete or len(text) > BODY_LIMIT:
        text = text[:BODY_LIMIT] + TRUNCATED
    return text
