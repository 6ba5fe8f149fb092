"""A dispatcher turn: the state of every actor that took mail, committed as one transaction.

`Flush` collects what the actors hold; `commit` is the script the store runs inside one
transaction (`Store.transact`): fetch what the rules need (dedupe keys, ledger rows, the
traits sent today, unsent calls), ask the rules (`gateway.rules`), write their answer set
by set (executemany), and mark the turn's messages applied in the inbox, in the same
transaction: a crash loses a whole turn or nothing, and the inbox replays it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from itertools import compress
from typing import Any, NamedTuple

import msgspec

from gateway.actors.actor import Actor
from gateway.config import TrackMode
from gateway.rules.dead_letters import group, group_keys
from gateway.rules.dedupe import first_seen
from gateway.rules.ledger import LedgerKey, Row, Tally, discount, settle
from gateway.rules.traits import Pending, body_of, fold, outgoing
from gateway.store.base import DeadLetter, Known, Queued, Turn

_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode


class PendingCall(NamedTuple):
    source: str
    account: str
    key: str
    pending: Pending


class Flush:
    """What a turn commits: the state the actors took, the dead letters the router kept,
    and how many messages of each inbox record that completes."""

    def __init__(
        self, modes: Mapping[str, TrackMode], cached: Callable[[LedgerKey], Row | None]
    ) -> None:
        self.modes = modes
        self.cached = cached  # a ledger row as the actors remember it, if they do
        self.hit_keys: list[bytes] = []
        self.hit_refs: list[LedgerKey] = []
        self.tallies: dict[LedgerKey, Tally] = {}
        self.marks: list[bytes] = []
        self.mark_sources: list[str] = []
        self.calls: list[PendingCall] = []
        self.accounts: list[tuple[str, str, str]] = []
        self.dead: list[DeadLetter] = []
        self.inbox: dict[int, int] = {}
        self.messages = 0

    def add(self, actor: Actor) -> None:
        if actor.hit_keys:
            self.hit_keys += actor.hit_keys
            self.hit_refs += actor.hit_refs
            actor.tallies(self.tallies)  # ledger keys name the account: no overlap
        # with many accounts most actors hold a hit or two and nothing else: the rest is
        # looked at only when there is some
        if actor.marks or actor.pending or actor.accounts or actor.dead:
            src, account = actor.source.id, actor.account
            self.marks += actor.marks
            self.mark_sources += [src] * len(actor.marks)
            self.calls += [PendingCall(src, account, k, p) for k, p in actor.pending.items()]
            self.accounts += [(src, user, acct) for user, acct in actor.accounts]
            self.dead += actor.dead


class Outcome(NamedTuple):
    counted: int  # track occurrences new to the ledger
    duplicates: Counter[str]  # per source: messages whose id was seen before
    suppressed: Counter[tuple[str, str]]  # (source, kind): calls that changed nothing today
    calls: Counter[str]  # per source: upstream calls added to the outbox
    dead: list[DeadLetter]  # the dead letters kept (once per key)
    rows: list[Row]  # the ledger rows written


def commit(f: Flush, tx: Turn) -> Outcome:
    """Apply `f` inside the transaction `tx` (run by the store's writer)."""
    calls: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()

    # dedupe: every key at once, hits first; a dead letter's key keeps it once
    keyed = [d for d in f.dead if d.key is not None]
    keys = f.hit_keys + f.marks + [d.key for d in keyed if d.key is not None]
    fresh = first_seen(keys, tx.state.remember(keys))
    n_hits, n_marks = len(f.hit_keys), len(f.marks)
    counted = n_hits
    tallies = f.tallies
    if not all(fresh[:n_hits]):
        repeats = [ref for ref, ok in zip(f.hit_refs, fresh[:n_hits], strict=True) if not ok]
        tallies = discount(f.tallies, repeats)
        counted -= len(repeats)
        for ref in repeats:
            duplicates[ref.source] += 1
    if not all(fresh[n_hits : n_hits + n_marks]):
        for src, ok in zip(f.mark_sources, fresh[n_hits : n_hits + n_marks], strict=True):
            if not ok:
                duplicates[src] += 1
    dead = [d for d in f.dead if d.key is None]
    dead += compress(keyed, fresh[n_hits + n_marks :])

    # the ledger: one row per key, the calls its new occurrences send
    stored: dict[LedgerKey, Row] = {}
    missing: list[LedgerKey] = []
    for key in tallies:
        row = f.cached(key)
        if row is None:
            missing.append(key)
        else:
            stored[key] = row
    stored.update(tx.state.ledger(missing))
    rows, sends = settle(tallies, stored, f.modes)
    tx.state.put_ledger(rows)
    tx.outbox.add([
        Queued(s.source, s.key, s.account, "track", s.path, _encode(s.body), s.repeat)
        for s in sends
    ])
    for s in sends:
        calls[s.source] += s.repeat

    # identify and group: only what changes what went out that day
    suppressed: Counter[tuple[str, str]] = Counter()
    if f.calls:
        pairs = [(c.source, c.key) for c in f.calls]
        known = tx.state.known(pairs)
        unsent = tx.outbox.unsent(pairs)
        queued: list[Queued] = []
        remembered: list[Known] = []
        for c in f.calls:
            pair = (c.source, c.key)
            p = c.pending
            k = known.get(pair)
            traits = outgoing(p, k.traits if k is not None and k.day == p.day else None)
            if traits is None:
                suppressed[(c.source, p.kind)] += 1
                continue
            old = unsent.get(pair)
            body = _encode(fold(None if old is None else _decode(old), body_of(p, traits)))
            queued.append(Queued(c.source, c.key, c.account, p.kind, p.path, body))
            known[pair] = Known(c.source, c.key, p.day, traits)
            remembered.append(known[pair])
            if old is None:
                calls[c.source] += 1
            unsent[pair] = body
        tx.outbox.replace(queued)
        tx.state.put_known(remembered)
    if f.accounts:
        tx.state.put_accounts(f.accounts)
    if dead:
        new, joins = group(dead, tx.dead.open_groups(group_keys(dead)))
        tx.dead.join(joins)
        tx.dead.add(new)
    tx.inbox.applied(f.inbox)
    return Outcome(counted, duplicates, suppressed, calls, dead, rows)
