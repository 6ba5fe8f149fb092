"""Segment message -> Accoil call: pure functions, no I/O (DESIGN 3)."""

from gateway.mapping.calls import Call, Skip, to_call
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
from gateway.mapping.traits import MS_THRESHOLD, created_at, iso, normalise_traits

__all__ = [
    "MS_THRESHOLD",
    "STAGING_BASE_URL",
    "Call",
    "Dialect",
    "Kind",
    "Skip",
    "Upstream",
    "call_kind",
    "created_at",
    "dialect",
    "iso",
    "normalise_traits",
    "spoken_at",
    "to_call",
    "upstream",
]
