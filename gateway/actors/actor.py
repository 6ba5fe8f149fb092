"""One actor per (source, account): a mailbox, and the account's state until it is committed.

The router puts messages in the mailbox; the dispatcher runs the actor when it has mail
(`work`). Identify and group calls merge trait by trait into one pending call per user (or
group and user); track, page and screen become ledger hits. The actor holds no task, no
event and no timer: a dispatcher turn collects its state (`gateway.actors.turn`) and
commits it with every other actor's. Between turns an actor holds nothing, so passivating
it is dropping it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import msgspec

from gateway.actors.envelope import Envelope
from gateway.actors.integrations import enabled
from gateway.config import Source
from gateway.keys import group_key, identify_key
from gateway.mapping import Skip, counted, iso, to_call, utc_day
from gateway.mapping.calls import counted_body
from gateway.mapping.dialects import DIALECTS
from gateway.rules.ledger import Latest, LedgerKey, Row, Tally
from gateway.rules.traits import Pending
from gateway.segment import AnyMessage, CountedCall
from gateway.store import DeadLetter

if TYPE_CHECKING:
    from datetime import date

    from gateway.observability.metrics import Metrics


class Actor:
    __slots__ = (
        "source", "account", "mail", "hit_keys", "hit_refs", "hits", "marks", "pending",
        "accounts", "dead", "held", "last", "ledger", "partition",
    )

    def __init__(self, source: Source, account: str) -> None:
        self.source = source
        self.account = account
        self.partition = 0  # of the store: the users whose messages it takes are in it
        self.mail: deque[Envelope] = deque()
        self.last = 0.0  # when it last had mail (the dispatcher's clock)
        # the account's ledger rows as committed, so that a turn need not fetch them again
        self.ledger: dict[LedgerKey, Row] = {}
        # each counted call's dedupe key and ledger key, in order; and per ledger key, the
        # occurrences counted and the latest message (its call is built at the turn's end)
        self.hit_keys: list[bytes] = []
        self.hit_refs: list[LedgerKey] = []
        # keyed by (UTC date, user, event), a plain tuple: the LedgerKey (and its day's text)
        # is made once per key, not per message. The latest is the envelope, or the message
        # itself where the C take took it (its context is its own, its timestamp the latest's)
        self.hits: dict[tuple[date, str, str], tuple[LedgerKey, Latest[Envelope | AnyMessage]]] = {}
        self.marks: list[bytes] = []  # dedupe keys of the messages that are not hits
        self.pending: dict[str, Pending] = {}
        self.accounts: list[tuple[str, str]] = []  # (user, account) from group calls
        self.dead: list[DeadLetter] = []
        self.held = 0  # messages taken since the last commit

    def reset(self) -> None:
        """Forget what a committed turn made durable (a turn copies what it takes)."""
        if self.held:
            self.hit_keys.clear()
            self.hit_refs.clear()
            self.hits.clear()
            # with many accounts most actors took a hit or two and nothing else
            if self.marks or self.pending or self.accounts or self.dead:
                self.marks.clear()
                self.pending.clear()
                self.accounts.clear()
                self.dead.clear()
            self.held = 0

    def become(self, source: Source, account: str) -> Actor:
        """This passivated actor, activated again for another account (no new containers)."""
        self.source, self.account = source, account
        self.ledger.clear()
        return self

    def work(self, metrics: Metrics) -> None:
        """Take every message in the mailbox into the pending state."""
        mail = self.mail
        while mail:
            self._take(mail.popleft(), metrics)

    def _take(self, env: Envelope, metrics: Metrics) -> None:
        self.held += 1
        msg = env.message
        source = self.source
        if env.integrations and not enabled(env.integrations):
            # turned off for Accoil by the sender (consent): counted, never a dead letter
            self.marks.append(env.key)
            metrics.skipped.labels(source.id, "integrations").inc()
            return
        if isinstance(msg, CountedCall):
            # counted in the ledger: its call is built once per key, for the latest message
            hit = counted(msg, source.unnamed_pages, env.user)
            if isinstance(hit, Skip):
                self._skip(env, hit, metrics)
                return
            user, event = hit
            at = env.timestamp
            short = (at.date(), user, event)
            found = self.hits.get(short)
            self.hit_keys.append(env.key)
            if found is None:
                key = LedgerKey(source.id, utc_day(at), user, self.account, event)
                self.hits[short] = (key, Latest(at, env))
                self.hit_refs.append(key)
            else:
                self.hit_refs.append(found[0])
                found[1].add(at, env)
            return
        call = to_call(
            msg, api=source.api, timestamp=env.timestamp, context=env.context,
            unnamed_pages=source.unnamed_pages,
        )
        if isinstance(call, Skip):
            self._skip(env, call, metrics)
            return
        ts: str = call.body["timestamp"]
        self.marks.append(env.key)
        if call.kind == "identify":
            assert call.user_id is not None
            key_ = identify_key(call.user_id)
        else:
            assert call.group_id is not None
            key_ = group_key(call.group_id, call.user_id)
            if call.user_id is not None:
                self.accounts.append((call.user_id, call.group_id))
        pending = self.pending.get(key_)
        if pending is None:
            pending = self.pending[key_] = Pending(call.kind, call.path, call.body, ts)
        else:
            metrics.coalesced.labels(source.id, call.kind).inc()
        pending.merge(call.path, call.body, call.traits or {}, ts)

    def _skip(self, env: Envelope, skip: Skip, metrics: Metrics) -> None:
        """A message that is not forwarded: counted, or kept as a dead letter."""
        source = self.source
        if skip.unsupported:
            self.marks.append(env.key)
            metrics.unsupported.labels(source.id, str(env.message.__struct_config__.tag)).inc()
        elif skip.counted is not None:
            self.marks.append(env.key)
            metrics.skipped.labels(source.id, skip.counted).inc()
        else:
            self.dead.append(DeadLetter(
                source=source.id, stage="mapping", reason=skip.reason,
                payload=msgspec.json.encode(env.message), account=self.account, key=env.key,
                grouped=True,
            ))

    def tallies(self, out: dict[LedgerKey, Tally] | None = None) -> dict[LedgerKey, Tally]:
        """The occurrences taken per ledger key, each with the call of its latest message
        (`to_call`'s, built from what the key already holds: its user and event); added to
        `out` when given (a turn's: one dict, not one per actor)."""
        source = self.source
        dialect = DIALECTS[source.api]
        path = dialect.path("track")
        unnamed = source.unnamed_pages
        if out is None:
            out = {}
        for key, latest in self.hits.values():
            item = latest.item
            msg = item.message if isinstance(item, Envelope) else item
            assert isinstance(msg, CountedCall), "only counted calls are hits"
            when = iso(latest.at)
            body = counted_body(dialect, msg, key.user, key.event, when, unnamed)  # type: ignore[arg-type]
            out[key] = Tally(when, path, body, latest.count)
        return out
