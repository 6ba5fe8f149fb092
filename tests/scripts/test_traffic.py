"""The synthetic traffic: reproducible, shaped as asked, and honest about what to expect."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from benchkit.traffic import KINDS, Tally, Traffic, parse_mix


def messages(t: Traffic, n: int, size: int = 50) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        out += msgspec.json.decode(t.batch(size).body)["batch"]
    return out


def fixed(**kw: Any) -> Traffic:
    base: dict[str, Any] = {"accounts": 20, "users": 200, "seed": 7, "id_prefix": "t",
                            "clock": lambda: 1_700_000_000.0}
    return Traffic(**{**base, **kw})


def test_same_seed_same_traffic_other_seed_other_traffic() -> None:
    assert fixed().batch(100).body == fixed().batch(100).body
    assert fixed().batch(100).body != fixed(seed=8).batch(100).body


def test_every_message_is_valid_segment_with_its_own_id() -> None:
    msgs = messages(fixed(), 2000)
    assert len({m["messageId"] for m in msgs}) == len(msgs)
    for m in msgs:
        assert m["type"] in KINDS and m["userId"].startswith("user-")
        assert m["context"]["groupId"].startswith("acct-")
        if m["type"] == "track":
            assert m["event"]
        elif m["type"] in ("page", "screen"):
            assert m["name"]
        elif m["type"] == "group":
            assert m["groupId"] == m["context"]["groupId"]


def test_a_user_always_belongs_to_the_same_account() -> None:
    accounts: dict[str, set[str]] = {}
    for m in messages(fixed(), 3000):
        accounts.setdefault(m["userId"], set()).add(m["context"]["groupId"])
    assert all(len(a) == 1 for a in accounts.values())


def test_mix_is_respected() -> None:
    kinds = Counter(m["type"] for m in messages(
        fixed(mix=parse_mix("track=50,identify=50")), 10_000))
    assert set(kinds) == {"track", "identify"}
    assert 0.45 < kinds["track"] / 10_000 < 0.55


def test_zipf_skews_activity_and_zero_skew_does_not() -> None:
    def top_share(skew: float) -> float:
        users = Counter(m["userId"] for m in messages(fixed(users=1000, skew=skew), 20_000))
        return sum(n for _, n in users.most_common(10)) / 20_000

    assert top_share(1.2) > 0.3  # ten users of a thousand do a third of everything
    assert top_share(0.0) < 0.05


def test_cycle_order_reaches_every_account() -> None:
    t = fixed(accounts=300, users=600, order="cycle")
    msgs = messages(t, 600)
    assert len({m["context"]["groupId"] for m in msgs}) == 300
    assert t.accounts_seen == set(range(300))


def test_resends_repeat_an_earlier_message_byte_for_byte() -> None:
    t = fixed(dup_rate=0.2)
    seen: dict[int, bytes] = {}
    resent = total = 0
    for _ in range(100):
        batch = t.batch(50)
        resent += batch.resent
        total += len(batch.seqs)
        raws = [msgspec.json.encode(m) for m in msgspec.json.decode(batch.body)["batch"]]
        for seq, raw in zip(batch.seqs, raws, strict=True):
            assert seen.setdefault(seq, raw) == raw
    assert 0.15 < resent / total < 0.25
    assert t.seq == total - resent


def test_tally_counts_each_accepted_counted_message_once() -> None:
    t = fixed(mix=parse_mix("track=1,page=1,identify=1"), dup_rate=0.3)
    tally = Tally(t)
    first = t.batch(200)
    tally.accept(first.seqs)
    tally.accept(first.seqs)  # the same batch acknowledged twice: still once each
    t.batch(200)  # never acknowledged: nothing of it is expected unless re-sent later
    third = t.batch(200)
    tally.accept(third.seqs, rejected=[0])  # the reply listed its first message as rejected
    accepted = set(first.seqs) | set(third.seqs[1:])
    assert tally.distinct == len(accepted)
    assert tally.expected == Counter(t.names[s] for s in accepted if t.names[s])
    assert any(name.startswith("Page Viewed ") for name in tally.expected)


@pytest.mark.parametrize("text", ["track", "tracks=1", "track=x", "track=-1", "track=0"])
def test_bad_mix_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="mix"):
        parse_mix(text)


def test_bad_population_is_refused() -> None:
    with pytest.raises(ValueError):
        Traffic(accounts=10, users=5)
