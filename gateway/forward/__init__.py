"""Forwarding to Accoil: the HTTP client, its outcomes, throttle, backoff and circuit."""

from .backoff import MAX_RETRY_AFTER, delay
from .circuit import Circuit
from .client import AccoilClient, UpstreamLike, parse_retry_after
from .outcome import Delivered, Outcome, Reject, Retry
from .throttle import Throttle

__all__ = [
    "MAX_RETRY_AFTER",
    "AccoilClient",
    "Circuit",
    "Delivered",
    "Outcome",
    "Reject",
    "Retry",
    "Throttle",
    "UpstreamLike",
    "delay",
    "parse_retry_after",
]
