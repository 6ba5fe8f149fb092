"""The actor rules, called directly: dedupe, ledger and track mode, trait merge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.keys import (
    DEDUPE_BYTES,
    DedupeKeys,
    dedupe_key,
    dedupe_prefix,
    group_key,
    ledger_key,
)
from gateway.rules.dead_letters import group
from gateway.rules.dedupe import first_seen
from gateway.rules.ledger import Hit, Latest, LedgerKey, Row, discount, settle, tally
from gateway.rules.traits import Pending, fold, outgoing
from gateway.store import DeadLetter

KEY = LedgerKey("s", "2026-11-28", "u1", "acme", "Clicked")


def hit(ts: str, key: LedgerKey = KEY) -> Hit:
    return Hit(key, ts, "/v2/track", {"userId": key.user, "event": key.event, "timestamp": ts})


def test_first_seen_drops_stored_keys_and_repeats_within_the_turn() -> None:
    assert first_seen([b"a", b"b", b"a", b"c"], {b"c"}) == [True, True, False, False]
    assert first_seen([b"a", b"b"], set()) == [True, True]
    assert first_seen([], set()) == []


def test_dedupe_keys_are_fixed_size_and_never_mix_sources() -> None:
    short = dedupe_key(dedupe_prefix("s"), "m")
    long = dedupe_key(dedupe_prefix("s"), "m" * 200)
    assert len(short) == len(long) == DEDUPE_BYTES
    # the prefix carries the source's length: ("ab", "c") and ("a", "bc") differ
    assert dedupe_key(dedupe_prefix("ab"), "c") != dedupe_key(dedupe_prefix("a"), "bc")
    assert dedupe_key(dedupe_prefix("s"), "m") == short


def test_a_sources_dedupe_keys_are_those_of_dedupe_key_whatever_the_order() -> None:
    # the keys on disk stay the same: a gateway upgraded inside the window still finds them
    keys = DedupeKeys(dedupe_prefix("src"))
    ids = ["m", "", "m" * 200, "é-ü", "m"]
    assert [keys(i) for i in ids] == [dedupe_key(dedupe_prefix("src"), i) for i in ids]
    assert keys("m") != DedupeKeys(dedupe_prefix("sr"))("cm")


def test_group_and_ledger_keys_are_unambiguous() -> None:
    assert group_key("a\x1fb", "c") != group_key("a", "b\x1fc")
    assert ledger_key("d", "u,1", "a", "e") != ledger_key("d", "u", "1,a", "e")


def test_latest_counts_and_keeps_the_latest_the_later_taken_on_a_tie() -> None:
    t0 = datetime(2026, 11, 28, 10, tzinfo=UTC)
    latest = Latest(t0, "first")
    latest.add(t0 - timedelta(seconds=1), "earlier")
    assert (latest.count, latest.item) == (2, "first")
    latest.add(t0, "tie")
    latest.add(t0 + timedelta(seconds=1), "later")
    latest.add(t0, "older again")
    assert (latest.count, latest.at, latest.item) == (5, t0 + timedelta(seconds=1), "later")


def test_tally_counts_per_key_and_keeps_the_latest_call() -> None:
    other = KEY._replace(event="Other")
    t = tally([hit("2026-11-28T10:00:00.000Z"), hit("2026-11-28T12:00:00.000Z"),
               hit("2026-11-28T11:00:00.000Z"), hit("2026-11-28T09:00:00.000Z", other)])
    assert (t[KEY].count, t[KEY].timestamp) == (3, "2026-11-28T12:00:00.000Z")
    assert t[KEY].body["timestamp"] == "2026-11-28T12:00:00.000Z"
    assert t[other].count == 1


def test_discount_takes_back_repeats_and_leaves_the_tallies_given() -> None:
    other = KEY._replace(event="Other")
    t = tally([hit("2026-11-28T10:00:00.000Z"), hit("2026-11-28T12:00:00.000Z"),
               hit("2026-11-28T09:00:00.000Z", other)])
    less = discount(t, [KEY, other])
    assert list(less) == [KEY] and less[KEY].count == 1
    assert less[KEY].timestamp == "2026-11-28T12:00:00.000Z"
    assert (t[KEY].count, t[other].count) == (2, 1)


def test_exact_mode_sends_every_new_occurrence_with_the_latest_timestamp() -> None:
    t = tally([hit("2026-11-28T10:00:00.000Z"), hit("2026-11-28T10:00:01.000Z")])
    stored = {KEY: Row(KEY, 5, "2026-11-28T23:00:00.000Z")}
    rows, sends = settle(t, stored, {"s": "exact"})
    assert rows == [Row(KEY, 7, "2026-11-28T23:00:00.000Z")]
    (send,) = sends
    assert send.repeat == 2 and send.body["timestamp"] == "2026-11-28T23:00:00.000Z"
    assert send.key == ledger_key(KEY.day, KEY.user, KEY.account, KEY.event)


def test_daily_unique_sends_once_per_key_and_day() -> None:
    t = tally([hit("2026-11-28T10:00:00.000Z"), hit("2026-11-28T10:00:01.000Z")])
    rows, sends = settle(t, {}, {"s": "daily-unique"})
    assert rows[0].events == 2 and [s.repeat for s in sends] == [1]
    rows, sends = settle(t, {KEY: rows[0]}, {"s": "daily-unique"})
    assert rows[0].events == 4 and sends == []


def test_pending_merge_keeps_the_latest_value_per_trait() -> None:
    p = Pending("identify", "/v2/identify", {"userId": "u", "timestamp": "2026-01-02"}, "2026-01-02")
    p.merge("/v2/identify", {"userId": "u", "timestamp": "2026-01-02"}, {"a": 1, "b": 1}, "2026-01-02")
    p.merge("/v2/identify", {"userId": "u", "timestamp": "2026-01-01"}, {"a": 0, "c": 0}, "2026-01-01")
    p.merge("/v2/identify", {"userId": "u", "timestamp": "2026-01-03"}, {"b": 3}, "2026-01-03")
    assert p.values() == {"a": 1, "b": 3, "c": 0}
    assert p.ts == "2026-01-03" and p.day == "2026-01-03"


def test_same_day_suppression_and_fold() -> None:
    p = Pending("identify", "/v2/identify", {"userId": "u"}, "2026-01-02T00:00:00.000Z")
    p.merge("/v2/identify", {"userId": "u"}, {"plan": "pro"}, "2026-01-02T00:00:00.000Z")
    assert outgoing(p, None) == {"plan": "pro"}
    assert outgoing(p, {"plan": "pro", "seats": 3}) is None  # nothing new that day
    assert outgoing(p, {"plan": "free", "seats": 3}) == {"plan": "pro", "seats": 3}
    unsent = {"userId": "u", "traits": {"seats": 3, "plan": "free"}}
    assert fold(unsent, {"userId": "u", "traits": {"plan": "pro"}})["traits"] == {
        "seats": 3, "plan": "pro"
    }
    assert fold(None, {"traits": {}}) == {"traits": {}}


def test_dead_letters_of_one_fault_group_and_others_are_each_kept() -> None:
    def letter(reason: str, grouped: bool = True, source: str = "s") -> DeadLetter:
        return DeadLetter(source=source, stage="mapping", reason=reason, payload=b"{}",
                          grouped=grouped)

    letters = [letter("a"), letter("b"), letter("a"), letter("c"), letter("c", source="t"),
               letter("a", grouped=False), letter("a")]
    new, joins = group(letters, {("s", "mapping", "c"): 41})
    assert [(d.source, d.reason, d.repeat, d.grouped) for d in new] == [
        ("s", "a", 3, True), ("s", "b", 1, True), ("t", "c", 1, True), ("s", "a", 1, False),
    ]
    assert joins == {41: 1}
    assert letters[0].repeat == 1  # the letters given are left as they are
