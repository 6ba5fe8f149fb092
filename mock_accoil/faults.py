"""Injected faults: which ingest calls fail, how, and for how long. No I/O.

A fault matches a call by path (every ingest path when it names none), fires
with probability `rate` (always when unset) and, when `count` is set, expires
after firing that many times. A firing fault adds its `latency`; the first
firing fault with a `status` or `drop` decides the reply, so a call spends at
most one count-limited failure.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec

# Every path that takes ingest calls; faults and the journal of unknown calls apply to these.
INGEST_PATHS: tuple[str, ...] = (
    "/v2/identify",
    "/v2/group",
    "/v2/track",
    "/segment",
    "/v1/events",
    "/v1/users",
    "/v1/groups",
)

DEFAULT_RETRY_AFTER = 1


class Fault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What to do to matching calls; the body of `POST /_mock/faults`."""

    status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None
    retry_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    count: Annotated[int, msgspec.Meta(ge=1)] | None = None
    rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    path: str | None = None
    latency: Annotated[float, msgspec.Meta(ge=0.0, le=300.0)] = 0.0
    drop: bool = False

    def __post_init__(self) -> None:
        if self.path is not None and self.path not in INGEST_PATHS:
            raise ValueError(f"path must be one of {', '.join(INGEST_PATHS)}")
        if self.status is not None and self.drop:
            raise ValueError("a fault either replies with a status or drops the connection")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after needs a status")
        if self.status is None and not self.drop and self.latency == 0:
            raise ValueError("a fault needs a status, drop or latency")


class ActiveFault(Fault, kw_only=True, omit_defaults=False):
    """A fault the mock holds: its spec, id, calls it has hit and hits left."""

    id: int
    hits: int = 0
    remaining: int | None = None


class Decision(msgspec.Struct, kw_only=True, frozen=True):
    """What the faults do to one call."""

    latency: float = 0.0
    status: int | None = None
    retry_after: int | None = None
    drop: bool = False
    fault_id: int | None = None

    @property
    def decides_reply(self) -> bool:
        return self.drop or self.status is not None


NO_FAULT = Decision()


class FaultSet:
    """The active faults, in the order they were added. Not thread-safe: the owner locks."""

    def __init__(self, seed: int | None = 0) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._faults: list[ActiveFault] = []
        self._next_id = 1

    def add(self, fault: Fault) -> ActiveFault:
        active = ActiveFault(
            **msgspec.structs.asdict(fault), id=self._next_id, remaining=fault.count
        )
        self._next_id += 1
        self._faults.append(active)
        return msgspec.structs.replace(active)

    def clear(self, *, reseed: bool = False) -> None:
        self._faults.clear()
        if reseed:
            self._rng = random.Random(self._seed)

    def active(self) -> list[ActiveFault]:
        return [msgspec.structs.replace(f) for f in self._faults]

    def decide(self, path: str) -> Decision:
        latency = 0.0
        decided: ActiveFault | None = None
        for fault in list(self._faults):
            if fault.path is not None and fault.path != path:
                continue
            adds_reply = fault.status is not None or fault.drop
            if adds_reply and decided is not None:
                # the reply is already decided: keep this fault's count for a later call
                continue
            if fault.rate is not None and self._rng.random() >= fault.rate:
                continue
            latency += fault.latency
            fault.hits += 1
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            if adds_reply:
                decided = fault
        if decided is None:
            return Decision(latency=latency) if latency else NO_FAULT
        retry_after = decided.retry_after
        if decided.status == 429 and retry_after is None:
            retry_after = DEFAULT_RETRY_AFTER
        return Decision(
            latency=latency,
            status=decided.status,
            retry_after=retry_after,
            drop=decided.drop,
            fault_id=decided.id,
        )
