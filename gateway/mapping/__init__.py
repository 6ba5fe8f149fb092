"""Segment message -> Accoil call: pure functions, no I/O (DESIGN 3)."""

from gateway.mapping.calls import Call, Skip, counted, to_call
from gateway.mapping.dialects import (
    STAGING_BASE_URL,
    Dialect,
    Kind,
    Upstream,
    call_kind,
    dialect,
    spoken_at,
    upstream,
)
from gateway.mapping.traits import MS_THRESHOLD, created_at, iso, normalise_traits, utc_day

__all__ = [
    "MS_THRESHOLD",
    "STAGING_BASE_URL",
    "Call",
    "Dialect",
    "Kind",
    "Skip",
    "Upstream",
    "call_kind",
    "counted",
    "created_at",
    "dialect",
    "iso",
    "normalise_traits",
    "spoken_at",
    "to_call",
    "utc_day",
    "upstream",
]
