"""Forwarding to Accoil: the HTTP client, its outcomes, the adaptive limit, backoff and circuit."""

from .backoff import MAX_RETRY_AFTER, delay
from .circuit import Circuit
from .client import AccoilClient, parse_retry_after
from .limiter import Limit, Limiter
from .outcome import Delivered, Outcome, Reject, Retry

__all__ = [
    "MAX_RETRY_AFTER",
    "AccoilClient",
    "Circuit",
    "Delivered",
    "Limit",
    "Limiter",
    "Outcome",
    "Reject",
    "Retry",
    "delay",
    "parse_retry_after",
]
