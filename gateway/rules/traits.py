"""Identify and group calls: trait merge and same-day suppression (DESIGN 4).

Pending calls of one key (a user's identify, a (group, user) pair's group) merge trait by
trait, the later timestamp winning per trait. A call that would change nothing already
sent that UTC day is not sent again; one that does carries every trait known that day.
"""

from __future__ import annotations

from typing import Any


class Pending:
    """An identify or group call being merged: per trait, the value with the latest timestamp."""

    __slots__ = ("kind", "path", "body", "ts", "traits")

    def __init__(self, kind: str, path: str, body: dict[str, Any], ts: str) -> None:
        self.kind = kind
        self.path = path
        self.body = body
        self.ts = ts
        self.traits: dict[str, tuple[Any, str]] = {}

    def merge(self, path: str, body: dict[str, Any], traits: dict[str, Any], ts: str) -> None:
        if ts >= self.ts:
            self.path, self.body, self.ts = path, body, ts
        for name, value in traits.items():
            old = self.traits.get(name)
            if old is None or ts >= old[1]:
                self.traits[name] = (value, ts)

    @property
    def day(self) -> str:
        return self.ts[:10]

    def values(self) -> dict[str, Any]:
        return {name: value for name, (value, _) in self.traits.items()}


def outgoing(pending: Pending, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """The traits to send for `pending`, given those already sent that day (`before`);
    None when the call would change nothing."""
    traits = pending.values()
    if before is not None and all(
        name in before and before[name] == value for name, value in traits.items()
    ):
        return None
    return {**(before or {}), **traits}


def body_of(pending: Pending, traits: dict[str, Any]) -> dict[str, Any]:
    return {**pending.body, "traits": traits, "timestamp": pending.ts}


def fold(unsent: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
    """A call replacing an unsent one of the same key keeps the unsent one's traits under its own."""
    if unsent is None:
        return body
    return {**body, "traits": {**(unsent.get("traits") or {}), **(body.get("traits") or {})}}
