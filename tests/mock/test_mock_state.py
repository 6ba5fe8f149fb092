"""The state engine on its own: no server, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any

import pytest

from mock_accoil.faults import Fault
from mock_accoil.state import MockAccoil
from tests.mock.mock_helpers import KEY, OTHER_KEY
from tests.net import basic

# 2026-11-28T12:00:00Z
NOON = datetime(2026, 11, 28, 12, tzinfo=UTC).timestamp()


def send(mock: MockAccoil, path: str, body: Any, key: str = KEY) -> int | None:
    auth = f"Basic {key}"
    if path == "/segment":
        auth = basic(key)
    return mock.receive(path, authorization=auth, body=json.dumps(body).encode()).status


def test_identify_merges_traits_trait_by_trait() -> None:
    mock = MockAccoil()
    assert send(mock, "/v2/identify", {"userId": "u1", "traits": {"a": 1, "b": 1}}) == 202
    assert send(mock, "/v2/identify", {"userId": "u1", "traits": {"b": 2, "c": 3}}) == 202
    assert send(mock, "/v2/identify", {"userId": "u1"}) == 202
    [user] = mock.users()
    assert (user.api_key, user.user_id, user.traits) == (KEY, "u1", {"a": 1, "b": 2, "c": 3})


def test_membership_from_identify_group_id_and_group_user_id() -> None:
    mock = MockAccoil()
    send(mock, "/v2/identify", {"userId": "u1", "groupId": "g1"})
    send(mock, "/v2/group", {"groupId": "g1", "userId": "u2", "traits": {"plan": "pro", "mrr": 1}})
    send(mock, "/v2/group", {"groupId": "g1", "traits": {"mrr": 2}})
    send(mock, "/v2/group", {"groupId": "g2"})
    g1, g2 = mock.accounts()
    assert (g1.group_id, g1.traits, g1.members) == ("g1", {"plan": "pro", "mrr": 2}, ["u1", "u2"])
    assert (g2.group_id, g2.traits, g2.members) == ("g2", {}, [])
    # a group call creates no user; only identify does
    assert [u.user_id for u in mock.users()] == ["u1"]


def test_state_is_partitioned_by_api_key() -> None:
    mock = MockAccoil()
    send(mock, "/v2/identify", {"userId": "u1", "traits": {"k": 1}}, key=KEY)
    send(mock, "/v2/identify", {"userId": "u1", "traits": {"k": 2}}, key=OTHER_KEY)
    send(mock, "/v2/track", {"userId": "u1", "event": "E"}, key=KEY)
    send(mock, "/v2/track", {"userId": "u1", "event": "E"}, key=OTHER_KEY)
    send(mock, "/v2/track", {"userId": "u1", "event": "E"}, key=OTHER_KEY)
    assert {u.api_key: u.traits for u in mock.users()} == {KEY: {"k": 1}, OTHER_KEY: {"k": 2}}
    assert mock.count("u1", "E", api_key=KEY) == 1
    assert mock.count("u1", "E", api_key=OTHER_KEY) == 2
    assert mock.count("u1", "E") == 3


def test_track_counts_per_utc_day_of_timestamp_else_receive_time() -> None:
    mock = MockAccoil(clock=lambda: NOON)
    send(mock, "/v2/track", {"userId": "u", "event": "E", "timestamp": "2026-11-27T23:59:59Z"})
    # 01:00 at +02:00 is 23:00 the day before in UTC
    send(mock, "/v2/track", {"userId": "u", "event": "E", "timestamp": "2026-11-28T01:00:00+02:00"})
    send(mock, "/v2/track", {"userId": "u", "event": "E"})
    send(mock, "/v2/track", {"userId": "u", "event": "F", "timestamp": "2026-11-28T00:00:00.000Z"})
    rows = {(c.day, c.event): c.count for c in mock.counts()}
    assert rows == {("2026-11-27", "E"): 2, ("2026-11-28", "E"): 1, ("2026-11-28", "F"): 1}
    assert mock.count("u", "E", day=date(2026, 11, 27)) == 2
    assert mock.count("u", "E", day="2026-11-28") == 1
    assert [c.event for c in mock.counts(day="2026-11-28", user_id="u")] == ["E", "F"]
    assert mock.counts(user_id="nobody") == []


def test_segment_dialect_counts_page_and_screen_as_events() -> None:
    mock = MockAccoil(clock=lambda: NOON)
    assert send(mock, "/segment", {"type": "identify", "userId": "u", "traits": {"n": 1}}) == 202
    assert send(mock, "/segment", {"type": "group", "groupId": "g", "userId": "u"}) == 202
    assert send(mock, "/segment", {"type": "track", "userId": "u", "event": "Clicked"}) == 202
    assert send(mock, "/segment", {"type": "page", "userId": "u", "name": "Home"}) == 202
    assert send(mock, "/segment", {"type": "screen", "userId": "u", "name": "Main"}) == 202
    assert {c.event: c.count for c in mock.counts()} == {
        "Clicked": 1,
        "Page Viewed Home": 1,
        "Screen Viewed Main": 1,
    }
    assert mock.users()[0].traits == {"n": 1}
    assert mock.accounts()[0].members == ["u"]


def test_legacy_v1_uses_body_key_and_millisecond_timestamps() -> None:
    mock = MockAccoil()
    ms = int(datetime(2026, 1, 2, 3, tzinfo=UTC).timestamp() * 1000)
    base = {"api_key": OTHER_KEY, "timestamp": ms}
    assert (
        send(mock, "/v1/users", {**base, "user_id": "u", "group_id": "g", "traits": {"x": 1}})
        == 202
    )
    assert send(mock, "/v1/groups", {**base, "group_id": "g", "traits": {"plan": "a"}}) == 202
    assert send(mock, "/v1/events", {**base, "user_id": "u", "event": "E"}) == 202
    assert [(u.api_key, u.user_id, u.traits) for u in mock.users()] == [(OTHER_KEY, "u", {"x": 1})]
    [account] = mock.accounts()
    assert (account.api_key, account.traits, account.members) == (OTHER_KEY, {"plan": "a"}, ["u"])
    [count] = mock.counts()
    assert (count.api_key, count.day, count.event, count.count) == (OTHER_KEY, "2026-01-02", "E", 1)


def test_only_accepted_calls_change_state_but_every_call_is_journaled() -> None:
    mock = MockAccoil()
    send(mock, "/v2/track", {"userId": "u"})  # 400: no event
    mock.receive("/v2/track", authorization=None, body=b'{"userId":"u","event":"E"}')  # 401
    mock.receive("/v2/track", authorization=f"Basic {KEY}", body=b"{not json")  # 400
    mock.add_fault(Fault(status=503, count=1))
    send(mock, "/v2/identify", {"userId": "u"})  # 503
    assert mock.users() == [] and mock.counts() == [] and mock.accounts() == []
    calls = mock.calls()
    assert [c.status for c in calls] == [400, 401, 400, 503]
    assert [c.seq for c in calls] == [1, 2, 3, 4]
    assert calls[2].body == "{not json"
    assert calls[1].api_key is None and calls[3].api_key == KEY
    assert calls[3].fault == 1 and calls[0].fault is None


def test_journal_filters_and_cap() -> None:
    mock = MockAccoil(max_calls=3)
    for i in range(5):
        send(mock, "/v2/track", {"userId": f"u{i}", "event": "E"}, key=KEY if i % 2 else OTHER_KEY)
    assert [c.seq for c in mock.calls()] == [3, 4, 5]
    assert [c.seq for c in mock.calls(since=3)] == [4, 5]
    assert [c.seq for c in mock.calls(api_key=KEY)] == [4]
    assert mock.calls(path="/v2/identify") == []
    assert [c.seq for c in mock.calls(status=202, path="/v2/track")] == [3, 4, 5]


def test_reset_forgets_everything_but_seq_keeps_counting() -> None:
    mock = MockAccoil()
    send(mock, "/v2/identify", {"userId": "u", "groupId": "g"})
    send(mock, "/v2/track", {"userId": "u", "event": "E"})
    mock.add_fault(Fault(status=500))
    mock.reset()
    assert (mock.users(), mock.accounts(), mock.counts(), mock.calls(), mock.faults()) == (
        [],
        [],
        [],
        [],
        [],
    )
    send(mock, "/v2/track", {"userId": "u", "event": "E"})
    assert [c.seq for c in mock.calls()] == [3]


def test_receive_refuses_non_ingest_paths() -> None:
    with pytest.raises(ValueError, match="not an ingest path"):
        MockAccoil().receive("/_mock/calls")


def test_query_results_are_copies() -> None:
    mock = MockAccoil()
    send(mock, "/v2/identify", {"userId": "u", "traits": {"a": 1}})
    mock.users()[0].traits["a"] = 99
    assert mock.users()[0].traits == {"a": 1}
