"""Dedupe: a message counts once per (source, messageId) within the window."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def first_seen(keys: Sequence[bytes], stored: Collection[bytes]) -> list[bool]:
    """For each key, in order: True when it is new, neither stored nor earlier in `keys`."""
    if not stored and len(set(keys)) == len(keys):
        return [True] * len(keys)  # the common case: all new, decided in C
    seen = set(stored)
    fresh: list[bool] = []
    for key in keys:
        if key in seen:
            fresh.append(False)
        else:
            seen.add(key)
            fresh.append(True)
    return fresh
