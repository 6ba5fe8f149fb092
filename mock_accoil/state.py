"""The state engine: what Accoil would keep, the call journal and the faults. No I/O.

`MockAccoil.receive()` takes one ingest request and returns the reply the
HTTP layer should give (status, body, headers, added latency, or a dropped
connection). Everything the mock knows can be asserted on directly through
the query methods, which return copies.

The state is partitioned by API key, as Accoil partitions it by product:

- users: user id -> traits; a later call's traits override earlier ones
  trait by trait (arrival order);
- accounts: group id -> traits (merged the same way) and member user ids; an
  identify with a group id or a group call with a user id adds a member;
- counts: occurrences per (API key, UTC day, user, event), the day taken from
  the call's timestamp, else from the time the mock received it.

Only accepted (202) calls change state; every call, faulted or not, is
journaled with the status it got. Methods are thread-safe, so a test can read
the state while the server runs on another thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import msgspec

from mock_accoil.capacity import Capacity, Gate, Refusal, Report
from mock_accoil.faults import INGEST_PATHS, ActiveFault, Decision, Fault, FaultSet
from mock_accoil.wire import GroupOp, IdentifyOp, Op, TrackOp, parse

DEFAULT_MAX_CALLS = 100_000


class Call(msgspec.Struct, kw_only=True):
    """One journaled request. `status` is None when a fault dropped the connection."""

    seq: int
    time: str
    method: str
    path: str
    api_key: str | None
    body: Any
    status: int | None
    reply: Any = None
    fault: int | None = None
    # body fields Accoil does not document for this endpoint (see `wire.unknown_fields`)
    unknown_fields: list[str] = []


class User(msgspec.Struct, kw_only=True, rename={"user_id": "userId"}):
    api_key: str
    user_id: str
    traits: dict[str, Any]


class Account(msgspec.Struct, kw_only=True, rename={"group_id": "groupId"}):
    api_key: str
    group_id: str
    traits: dict[str, Any]
    members: list[str]


class Count(msgspec.Struct, kw_only=True, rename={"user_id": "userId"}):
    api_key: str
    day: str
    user_id: str
    event: str
    count: int


class Reply(msgspec.Struct, kw_only=True, frozen=True):
    """What the HTTP layer answers: wait `latency`, then drop or send status/body/headers.

    `held`: the call holds a capacity slot, which the HTTP layer gives back (`release`)
    once it has answered."""

    status: int | None
    body: dict[str, Any] | None
    headers: dict[str, str]
    latency: float
    drop: bool
    call: Call
    held: bool = False


class _Account:
    __slots__ = ("traits", "members")

    def __init__(self) -> None:
        self.traits: dict[str, Any] = {}
        self.members: set[str] = set()


def _iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _day(when: datetime | None, received: float) -> str:
    if when is None:
        return datetime.fromtimestamp(received, tz=UTC).date().isoformat()
    return when.astimezone(UTC).date().isoformat()


class MockAccoil:
    """Accoil's ingestion state, journal and injected faults, behind a lock."""

    def __init__(
        self,
        *,
        seed: int | None = 0,
        max_calls: int = DEFAULT_MAX_CALLS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._monotonic = monotonic
        self._faults = FaultSet(seed)
        self._gate = Gate()
        self._journal: deque[Call] = deque(maxlen=max_calls)
        self._seq = 0
        self._users: dict[tuple[str, str], dict[str, Any]] = {}
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._counts: dict[tuple[str, str, str, str], int] = {}

    # -- ingest ----------------------------------------------------------------

    def receive(
        self,
        path: str,
        *,
        authorization: str | None = None,
        body: bytes = b"",
        method: str = "POST",
    ) -> Reply:
        """Handle one ingest request as Accoil (plus the active faults) would."""
        if path not in INGEST_PATHS:
            raise ValueError(f"not an ingest path: {path}")
        with self._lock:
            received = self._clock()
            decision = self._faults.decide(path)
            outcome = parse(path, authorization, body)
            headers: dict[str, str] = {}
            latency, held = decision.latency, False
            if decision.decides_reply:
                status, reply = self._fault_reply(decision, headers)
            elif (refused := self._gate.admit(self._monotonic())) is not None:
                status, reply = self._capacity_reply(refused, headers)
            else:
                held = True
                if self._gate.capacity is not None:
                    latency += self._gate.capacity.latency
                status, reply = outcome.status, outcome.reply
                if outcome.op is not None and outcome.api_key is not None:
                    self._apply(outcome.api_key, outcome.op, received)
            call = self._journal_call(
                method,
                path,
                api_key=outcome.api_key,
                body=outcome.body,
                status=status,
                reply=reply,
                fault=decision.fault_id,
                received=received,
                unknown_fields=outcome.unknown_fields,
            )
            return Reply(
                status=status,
                body=reply,
                headers=headers,
                latency=latency,
                drop=decision.drop,
                call=call,
                held=held,
            )

    @staticmethod
    def _fault_reply(
        decision: Decision, headers: dict[str, str]
    ) -> tuple[int | None, dict[str, Any] | None]:
        if decision.drop:
            return None, None
        if decision.retry_after is not None:
            headers["Retry-After"] = str(decision.retry_after)
        return decision.status, {"error": f"mock fault {decision.fault_id}: {decision.status}"}

    def _capacity_reply(
        self, refused: Refusal, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        cap = self._gate.capacity
        assert cap is not None  # only a capacity refuses
        headers["Retry-After"] = str(cap.retry_after)
        if refused == "rate":
            text = f"mock capacity: more than {cap.rate:g} calls a second"
        else:
            text = f"mock capacity: more than {cap.concurrency} calls in flight"
        return 429, {"error": text}

    def release(self) -> None:
        """An admitted call (`Reply.held`) has been answered: its slot is free."""
        with self._lock:
            self._gate.release()

    def note(
        self,
        method: str,
        path: str,
        *,
        status: int | None,
        body: Any = None,
        reply: Any = None,
        api_key: str | None = None,
    ) -> Call:
        """Journal a request that never reached an ingest handler (unknown path, too large)."""
        with self._lock:
            return self._journal_call(
                method,
                path,
                api_key=api_key,
                body=body,
                status=status,
                reply=reply,
                fault=None,
                received=self._clock(),
            )

    def _apply(self, api_key: str, op: Op, received: float) -> None:
        if isinstance(op, IdentifyOp):
            self._users.setdefault((api_key, op.user_id), {}).update(op.traits)
            if op.group_id is not None:
                self._account(api_key, op.group_id).members.add(op.user_id)
        elif isinstance(op, GroupOp):
            account = self._account(api_key, op.group_id)
            account.traits.update(op.traits)
            if op.user_id is not None:
                account.members.add(op.user_id)
        elif isinstance(op, TrackOp):
            key = (api_key, _day(op.timestamp, received), op.user_id, op.event)
            self._counts[key] = self._counts.get(key, 0) + 1

    def _account(self, api_key: str, group_id: str) -> _Account:
        account = self._accounts.get((api_key, group_id))
        if account is None:
            account = self._accounts[(api_key, group_id)] = _Account()
        return account

    def _journal_call(
        self,
        method: str,
        path: str,
        *,
        api_key: str | None,
        body: Any,
        status: int | None,
        reply: Any,
        fault: int | None,
        received: float,
        unknown_fields: list[str] | None = None,
    ) -> Call:
        self._seq += 1
        call = Call(
            seq=self._seq,
            time=_iso(received),
            method=method,
            path=path,
            api_key=api_key,
            body=body,
            status=status,
            reply=reply,
            fault=fault,
            unknown_fields=unknown_fields or [],
        )
        self._journal.append(call)
        return call

    # -- inspection ------------------------------------------------------------

    def calls(
        self,
        *,
        path: str | None = None,
        status: int | None = None,
        api_key: str | None = None,
        since: int | None = None,
    ) -> list[Call]:
        """Journaled calls, oldest first; `since` keeps calls with a greater seq."""
        with self._lock:
            return [
                msgspec.structs.replace(c)
                for c in self._journal
                if (path is None or c.path == path)
                and (status is None or c.status == status)
                and (api_key is None or c.api_key == api_key)
                and (since is None or c.seq > since)
            ]

    def users(self, *, api_key: str | None = None, user_id: str | None = None) -> list[User]:
        with self._lock:
            return [
                User(api_key=k, user_id=u, traits=dict(traits))
                for (k, u), traits in self._users.items()
                if (api_key is None or k == api_key) and (user_id is None or u == user_id)
            ]

    def accounts(self, *, api_key: str | None = None, group_id: str | None = None) -> list[Account]:
        with self._lock:
            return [
                Account(api_key=k, group_id=g, traits=dict(a.traits), members=sorted(a.members))
                for (k, g), a in self._accounts.items()
                if (api_key is None or k == api_key) and (group_id is None or g == group_id)
            ]

    def counts(
        self,
        *,
        day: str | date | None = None,
        user_id: str | None = None,
        event: str | None = None,
        api_key: str | None = None,
    ) -> list[Count]:
        """Daily event counts; `day` is a UTC date or `YYYY-MM-DD`."""
        want_day = day.isoformat() if isinstance(day, date) else day
        with self._lock:
            return [
                Count(api_key=k, day=d, user_id=u, event=e, count=n)
                for (k, d, u, e), n in self._counts.items()
                if (want_day is None or d == want_day)
                and (user_id is None or u == user_id)
                and (event is None or e == event)
                and (api_key is None or k == api_key)
            ]

    def count(
        self,
        user_id: str,
        event: str,
        *,
        day: str | date | None = None,
        api_key: str | None = None,
    ) -> int:
        """How many times `user_id` did `event` (summed over days and keys unless given)."""
        return sum(
            c.count for c in self.counts(day=day, user_id=user_id, event=event, api_key=api_key)
        )

    # -- faults and reset ------------------------------------------------------

    def add_fault(self, fault: Fault) -> ActiveFault:
        with self._lock:
            return self._faults.add(fault)

    def faults(self) -> list[ActiveFault]:
        with self._lock:
            return self._faults.active()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_capacity(self, capacity: Capacity | None) -> Report:
        """Replace the capacity (None: no limit); it applies to the next call."""
        with self._lock:
            self._gate.set(capacity, self._monotonic())
            return self._gate.report()

    def capacity(self) -> Report:
        with self._lock:
            return self._gate.report()

    def reset(self, *, renumber: bool = False) -> None:
        """Forget state, journal, faults and capacity, and reseed the fault RNG. The journal's
        `seq` keeps counting, so a client's `since` never skips calls made after a reset,
        unless `renumber` (a new test: as good as a new mock)."""
        with self._lock:
            self._faults.clear(reseed=True)
            self._gate.reset(self._monotonic())
            if renumber:
                self._seq = 0
            self._journal.clear()
            self._users.clear()
            self._accounts.clear()
            self._counts.clear()


__all__ = [
    "Account",
    "Call",
    "Count",
    "MockAccoil",
    "Reply",
    "User",
]
