"""Segment's `integrations` object: whether a message may go to Accoil at all.

Consent tools and apps turn destinations off per message: `{"All": false}` turns off every
destination not named `true`, and `{"Accoil Analytics": false}` turns off this one. The
gateway stands in for Segment's Accoil destination, so it honours both as Segment would.
"""

from __future__ import annotations

from typing import Any

DESTINATION = "Accoil Analytics"  # the name of Segment's Accoil destination


def enabled(integrations: dict[str, Any] | None) -> bool:
    """Whether a message with these (batch-merged) integrations goes to Accoil.

    The destination's own entry decides when it is a boolean or a settings object (an
    object means on, as in Segment); otherwise `All: false` turns it off."""
    if not integrations:
        return True
    own = integrations.get(DESTINATION)
    if own is False:
        return False
    if own is True or isinstance(own, dict):
        return True
    return integrations.get("All") is not False
