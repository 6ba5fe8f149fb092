"""Synthetic Segment traffic: accounts, users with Zipf-skewed activity, a mix of calls,
re-sends of earlier messages.

Everything random comes from one seeded `random.Random`, so a seed gives the same traffic
(who does what, in which order). Message ids are `<id_prefix>-<seq>`: pick a fresh prefix
per run against a long-lived gateway, since it remembers ids for days.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

KINDS = ("track", "page", "screen", "identify", "group")
# kinds Accoil counts: one ledger occurrence per distinct message
COUNTED = ("track", "page", "screen")

EVENTS = (
    "Report Viewed", "Dashboard Loaded", "Search Performed", "Filter Applied",
    "Export Started", "Comment Added", "File Uploaded", "Invite Sent", "Report Built",
    "Alert Created", "Integration Connected", "Chart Shared", "Settings Changed",
    "Project Created", "Task Completed", "Signed In", "Signed Up", "Plan Upgraded",
    "Seat Added", "Trial Started",
)
PAGES = ("Home", "Dashboard", "Reports", "Settings", "Billing", "Pricing", "Docs", "Team")
SCREENS = ("Feed", "Inbox", "Profile", "Notifications", "Search", "Detail")
PLANS = ("free", "starter", "pro", "enterprise")

Order = Literal["zipf", "cycle"]
_encode = msgspec.json.encode


def parse_mix(text: str) -> dict[str, float]:
    """`"track=60,page=15,screen=5,identify=10,group=10"` -> weights; unnamed kinds get 0."""
    weights = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in weights:
            raise ValueError(f"mix: {part!r} is not KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"mix: weight of {kind} is not a number: {value!r}") from None
        if not weight >= 0:
            raise ValueError(f"mix: weight of {kind} must be >= 0")
        weights[kind] = weight
    if sum(weights.values()) <= 0:
        raise ValueError("mix: at least one weight must be > 0")
    return weights


DEFAULT_MIX = "track=60,page=15,screen=5,identify=12,group=8"


def zipf_cumulative(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf's law with exponent `s` (0: uniform)."""
    return list(itertools.accumulate(1.0 / (k**s) for k in range(1, n + 1)))


class Batch(msgspec.Struct):
    body: bytes  # JSON, not gzipped
    seqs: list[int]  # the sequence number of each message, in order (re-sends repeat one)
    resent: int  # messages in it that re-send an earlier message


class Traffic:
    """Builds `/v1/batch` bodies; remembers which sequence numbers are counted events."""

    def __init__(
        self,
        *,
        accounts: int,
        users: int,
        mix: dict[str, float] | None = None,
        skew: float = 1.1,
        order: Order = "zipf",
        dup_rate: float = 0.0,
        seed: int = 0,
        id_prefix: str = "lt",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if accounts < 1 or users < accounts:
            raise ValueError("need at least one account and at least as many users as accounts")
        if not 0.0 <= dup_rate < 1.0:
            raise ValueError("dup_rate must be in [0, 1)")
        self.accounts = accounts
        self.users = users
        self.order = order
        self.dup_rate = dup_rate
        self.id_prefix = id_prefix
        self.rng = random.Random(seed)
        self._clock = clock
        weights = mix if mix is not None else parse_mix(DEFAULT_MIX)
        self._kinds = [k for k in KINDS if weights.get(k, 0) > 0]
        self._kind_cum = list(itertools.accumulate(weights[k] for k in self._kinds))
        # rank -> user: the most active users are spread over accounts, not packed in the first
        self._by_rank = list(range(users))
        self.rng.shuffle(self._by_rank)
        self._user_cum = zipf_cumulative(users, skew) if order == "zipf" else []
        self._event_cum = zipf_cumulative(len(EVENTS), 1.0)
        self._cycle = 0
        # the name Accoil counts for each counted message, by sequence number; "" otherwise
        self.names: list[str] = []
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=4096)
        self.seq = 0
        self.accounts_seen: set[int] = set()

    # who and what

    def _user(self) -> int:
        if self.order == "cycle":
            user = self._by_rank[self._cycle % self.users]
            self._cycle += 1
            return user
        rank = bisect.bisect_left(self._user_cum, self.rng.random() * self._user_cum[-1])
        return self._by_rank[min(rank, self.users - 1)]

    def account_of(self, user: int) -> int:
        return user % self.accounts

    def _pick(self, cum: Sequence[float], items: Sequence[str]) -> str:
        i = bisect.bisect_left(cum, self.rng.random() * cum[-1])
        return items[min(i, len(items) - 1)]

    def _message(self, seq: int, ts: str, id_suffix: str) -> tuple[dict[str, Any], str]:
        rng = self.rng
        kind = self._pick(self._kind_cum, self._kinds)
        user = self._user()
        uid = f"user-{user}"
        account = self.account_of(user)
        self.accounts_seen.add(account)
        acct = f"acct-{account}"
        msg: dict[str, Any] = {
            "type": kind,
            "messageId": f"{self.id_prefix}-{seq}{id_suffix}",
            "userId": uid,
            "timestamp": ts,
            "context": {"groupId": acct},
        }
        name = ""
        if kind == "track":
            name = self._pick(self._event_cum, EVENTS)
            msg["event"] = name
            msg["properties"] = {"plan": PLANS[user % 4], "items": rng.randrange(1, 50)}
        elif kind in ("page", "screen"):
            view = rng.choice(PAGES if kind == "page" else SCREENS)
            msg["name"] = view
            msg["properties"] = {"path": f"/{view.lower()}"}
            name = f"{kind.capitalize()} Viewed {view}"
        elif kind == "identify":
            msg["traits"] = {"email": f"{uid}@example.com", "name": f"User {user}",
                             "role": ("admin", "member")[user % 2], "plan": rng.choice(PLANS)}
        else:
            msg["groupId"] = acct
            msg["traits"] = {"name": f"Account {account}", "plan": rng.choice(PLANS),
                             "mrr": rng.randrange(0, 5000)}
        return msg, name

    # batches

    def batch(self, size: int, *, id_suffix: str = "") -> Batch:
        """`size` messages; each is new, or (with probability `dup_rate`) an earlier one again."""
        ts = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds")
        ts = ts.replace("+00:00", "Z")
        parts: list[bytes] = []
        seqs: list[int] = []
        resent = 0
        for _ in range(size):
            if self._recent and self.dup_rate and self.rng.random() < self.dup_rate:
                seq, raw = self._recent[self.rng.randrange(len(self._recent))]
                resent += 1
            else:
                seq = self.seq
                self.seq += 1
                msg, name = self._message(seq, ts, id_suffix)
                raw = _encode(msg)
                self.names.append(name)
                self._recent.append((seq, raw))
            parts.append(raw)
            seqs.append(seq)
        return Batch(b'{"batch":[' + b",".join(parts) + b"]}", seqs, resent)


class Tally:
    """Which messages the gateway accepted; what Accoil should therefore count."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self._accepted = bytearray()
        self.distinct = 0  # distinct messages accepted
        self.expected: dict[str, int] = {}  # event name -> distinct counted messages accepted

    def accept(self, seqs: Sequence[int], rejected: Sequence[int] = ()) -> None:
        """A batch answered 200; `rejected` are the indexes its reply listed as rejected."""
        flags = self._accepted
        if len(flags) < self.traffic.seq:
            flags.extend(bytes(self.traffic.seq - len(flags)))
        skip = set(rejected)
        names = self.traffic.names
        for i, seq in enumerate(seqs):
            if flags[seq] or i in skip:
                continue
            flags[seq] = 1
            self.distinct += 1
            name = names[seq]
            if name:
                self.expected[name] = self.expected.get(name, 0) + 1
