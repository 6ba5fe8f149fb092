"""Segment message -> Accoil call: pure functions, no I/O (DESIGN 3)."""

from gateway.mapping.calls import Call, Kind, Skip, call_kind, counted, to_call
from gateway.mapping.traits import MS_THRESHOLD, created_at, iso, normalise_traits, utc_day
from gateway.mapping.upstream import STAGING_BASE_URL, Upstream, upstream

__all__ = [
    "MS_THRESHOLD",
    "STAGING_BASE_URL",
    "Call",
    "Kind",
    "Skip",
    "Upstream",
    "call_kind",
    "counted",
    "created_at",
    "iso",
    "normalise_traits",
    "to_call",
    "utc_day",
    "upstream",
]
