"""Segment message types and request-body decoding (gateway.segment)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mapping import Call, Skip, to_call
from gateway.segment import (
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    Alias,
    AnyMessage,
    Context,
    Decoded,
    Group,
    Identify,
    InvalidBody,
    Message,
    Page,
    Screen,
    Stored,
    Track,
    anonymous_id,
    check_batch,
    context_group,
    context_traits,
    decode_batch,
    decode_single,
    decode_stored,
    effective_timestamp,
    in_full,
    merged,
    merged_context,
    user_id,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def batch_of(*raw: bytes, **top: Any) -> bytes:
    """A batch body whose messages are exactly these bytes (so `raw` can be compared)."""
    rest = "".join(f',"{k}":{json.dumps(v)}' for k, v in top.items())
    return b'{"batch":[' + b",".join(raw) + b"]" + rest.encode() + b"}"


TRACK = {"type": "track", "messageId": "m-track", "userId": "u1", "event": "Signed Up"}


# --- valid messages -------------------------------------------------------------------

VALID = [
    (
        {"type": "identify", "userId": "u1", "traits": {"email": "a@b.c"}},
        Identify(userId="u1", traits={"email": "a@b.c"}),
    ),
    (
        {"type": "group", "userId": 7, "groupId": "acct", "traits": {"plan": "pro"}},
        Group(userId=7, groupId="acct", traits={"plan": "pro"}),
    ),
    ({"type": "group", "anonymousId": "a", "groupId": 42}, Group(anonymousId="a", groupId=42)),
    (
        {"type": "track", "userId": "u1", "event": "Signed Up", "properties": {"x": 1}},
        Track(userId="u1", event="Signed Up", properties={"x": 1}),
    ),
    (
        {"type": "page", "userId": "u1", "name": "Home", "category": "Docs"},
        Page(userId="u1", name="Home", category="Docs"),
    ),
    ({"type": "page", "anonymousId": "a"}, Page(anonymousId="a")),
    ({"type": "screen", "userId": "u1", "name": "Settings"}, Screen(userId="u1", name="Settings")),
    ({"type": "alias", "userId": "u1", "previousId": "anon"}, Alias(userId="u1", previousId="anon")),
    # userId empty but anonymousId present; integer id 0 is an id
    ({"type": "track", "userId": "", "anonymousId": "a", "event": "E"},
     Track(userId="", anonymousId="a", event="E")),
    ({"type": "track", "userId": 0, "event": "E"}, Track(userId=0, event="E")),
    # unknown fields are ignored, as Segment does
    ({"type": "track", "userId": "u", "event": "E", "channel": "server", "version": 2},
     Track(userId="u", event="E")),
    (
        {
            "type": "track", "userId": "u", "event": "E", "messageId": "x" * 200,
            "timestamp": "2026-11-28T10:00:00.123Z", "originalTimestamp": "2026-11-28T10:00:00",
            "sentAt": "2026-11-28T12:00:00+02:00", "context": {"ip": "1.2.3.4"},
            "integrations": {"All": False},
        },
        Track(
            userId="u", event="E", messageId="x" * 200,
            timestamp=datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=UTC),
            originalTimestamp=datetime(2026, 11, 28, 10, 0, 0),
            sentAt=datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone(timedelta(hours=2))),
            context={"ip": "1.2.3.4"}, integrations={"All": False},
        ),
    ),
]


@pytest.mark.parametrize(("message", "expected"), VALID)
def test_valid_message_in_batch(message: dict[str, Any], expected: Message) -> None:
    body = dumps({"batch": [message]})
    decoded = decode_batch(body)
    assert decoded.rejected == []
    assert decoded.messages == [expected]
    assert decoded.body == body  # nothing rejected: persisted as sent


def test_valid_batch_keeps_body_and_top_level_fields() -> None:
    body = dumps({
        "batch": [TRACK, {"type": "identify", "userId": "u1"}],
        "context": {"library": {"name": "analytics-python"}},
        "integrations": {"All": True},
        "sentAt": "2026-11-28T10:00:01Z",
    })
    decoded = decode_batch(body)
    assert decoded.body is body
    assert [type(m) for m in decoded.messages] == [Track, Identify]
    assert decoded.context == {"library": {"name": "analytics-python"}}
    assert decoded.integrations == {"All": True}
    assert decoded.sent_at == datetime(2026, 11, 28, 10, 0, 1, tzinfo=UTC)
    assert decoded.write_key is None


def test_write_key_is_read_and_kept_out_of_the_stored_body() -> None:
    body = dumps({"batch": [TRACK], "writeKey": "wk_secret", "sentAt": "2026-11-28T10:00:01Z"})
    decoded = decode_batch(body)
    assert decoded.write_key == "wk_secret"
    assert b"wk_secret" not in decoded.body
    again = decode_batch(decoded.body)
    assert again.messages == decoded.messages
    assert again.sent_at == decoded.sent_at
    assert again.write_key is None


def test_empty_batch_is_valid() -> None:
    decoded = decode_batch(b'{"batch": []}')
    assert decoded.messages == [] and decoded.rejected == []


# --- invalid messages: rejected one by one, the rest accepted ---------------------------

INVALID = [
    ({"type": "track", "userId": "u"}, "Object missing required field `event`"),
    ({"type": "track", "userId": "u", "event": ""}, "Expected `str` of length >= 1 - at `event`"),
    ({"type": "track", "userId": "u", "event": 5}, "Expected `str`, got `int` - at `event`"),
    ({"type": "track", "event": "E"}, "userId or anonymousId is required"),
    ({"type": "track", "event": "E", "userId": "", "anonymousId": ""},
     "userId or anonymousId is required"),
    ({"type": "identify", "userId": None, "anonymousId": None}, "userId or anonymousId is required"),
    ({"type": "identify", "userId": True}, "at `userId`"),
    ({"type": "identify", "anonymousId": [1]}, "at `anonymousId`"),
    ({"type": "group", "userId": "u"}, "Object missing required field `groupId`"),
    ({"type": "group", "userId": "u", "groupId": ""}, "at `groupId`"),
    ({"type": "group", "userId": "u", "groupId": "g", "traits": []}, "at `traits`"),
    ({"type": "alias", "userId": "u"}, "Object missing required field `previousId`"),
    ({"type": "page", "userId": "u", "name": 3}, "at `name`"),
    ({"type": "merge", "userId": "u"}, "Invalid value 'merge' - at `type`"),
    ({"userId": "u", "event": "E"}, "Object missing required field `type`"),
    ({"type": "track", "userId": "u", "event": "E", "messageId": "x" * 201},
     "Expected `str` of length <= 200 - at `messageId`"),
    ({"type": "track", "userId": "u", "event": "E", "timestamp": "yesterday"},
     "at `timestamp`"),
    ({"type": "track", "userId": "u", "event": "E", "context": "web"},
     "Expected `object | null`, got `str` - at `context`"),
    # an id beyond the double range: not an id (docs/ingest.md), as a fraction is not
    ({"type": "track", "userId": 1e400, "anonymousId": "a", "event": "E"},
     "Number out of range - at `userId`"),
    ({"type": "group", "userId": "u", "groupId": -1e400}, "Number out of range - at `groupId`"),
    (3, "Expected `object`, got `int`"),
    ("track", "Expected `object`, got `str`"),
    ([TRACK], "Expected `object`, got `array`"),
]


@pytest.mark.parametrize(("message", "reason"), INVALID)
def test_invalid_message_is_rejected_alone(message: Any, reason: str) -> None:
    # json.dumps cannot write 1e400, so build the raw bytes by hand
    bad = json.dumps(message).replace("Infinity", "1e400").encode()
    good = [dumps({**TRACK, "messageId": f"m{i}"}) for i in range(3)]
    body = batch_of(good[0], bad, good[1], good[2], sentAt="2026-11-28T10:00:01Z")
    decoded = decode_batch(body)

    assert [m.messageId for m in decoded.messages] == ["m0", "m1", "m2"]
    assert len(decoded.rejected) == 1
    rejected = decoded.rejected[0]
    assert rejected.index == 1
    assert reason in rejected.reason
    assert "$" not in rejected.reason  # the path is relative to the message
    assert rejected.raw == bad
    expected_id = message.get("messageId") if isinstance(message, dict) else None
    assert rejected.messageId == expected_id


def test_rejected_reports_message_id_when_readable() -> None:
    body = batch_of(
        dumps({"type": "track", "userId": "u", "messageId": "keep-me"}),
        dumps({"type": "track", "userId": "u", "messageId": 12}),
    )
    decoded = decode_batch(body)
    assert [r.messageId for r in decoded.rejected] == ["keep-me", None]


def test_mixed_batch_reencodes_a_body_that_decodes_back() -> None:
    messages = [
        {**TRACK, "messageId": "a"},
        {"type": "track", "userId": "u"},  # no event
        {"type": "identify", "anonymousId": "x", "messageId": "b", "traits": {"n": 10**30}},
        {"type": "group", "userId": "u"},  # no groupId
        {"type": "page", "userId": "u", "name": "Home", "messageId": "c", "context": {"z": -0.0}},
    ]
    body = dumps({
        "batch": messages,
        "context": {"library": {"name": "l"}},
        "integrations": {"All": False},
        "sentAt": "2026-11-28T10:00:01.5+01:00",
        "writeKey": "wk_secret",
    })
    decoded = decode_batch(body)
    assert [r.index for r in decoded.rejected] == [1, 3]
    assert "`event`" in decoded.rejected[0].reason
    assert "`groupId`" in decoded.rejected[1].reason
    assert [m.messageId for m in decoded.messages] == ["a", "b", "c"]
    assert decoded.write_key == "wk_secret"

    stored = json.loads(decoded.body)
    assert "writeKey" not in stored
    again = decode_batch(decoded.body)
    # the stored body keeps the rejected too: the router keeps them as dead letters
    assert again.rejected == decoded.rejected
    assert again.messages == decoded.messages
    assert again.context == decoded.context
    assert again.integrations == decoded.integrations
    assert again.sent_at == decoded.sent_at
    assert again.body == decoded.body


def test_all_rejected_keeps_them_in_the_stored_body() -> None:
    decoded = decode_batch(batch_of(b"1", b"{}"))
    assert decoded.messages == []
    assert [r.index for r in decoded.rejected] == [0, 1]
    assert decoded.count == 2
    again = decode_batch(decoded.body)
    assert again.messages == []
    assert again.rejected == decoded.rejected


# --- limits --------------------------------------------------------------------------


def test_batch_of_2500_is_accepted_and_2501_is_not() -> None:
    one = dumps({"type": "track", "userId": "u", "event": "E"})
    assert len(decode_batch(batch_of(*[one] * MAX_BATCH)).messages) == MAX_BATCH
    with pytest.raises(InvalidBody, match="at most 2,500 messages"):
        decode_batch(batch_of(*[one] * (MAX_BATCH + 1)))
    # even when one of them is also invalid (the per-message path checks the count too)
    with pytest.raises(InvalidBody, match="at most 2,500 messages"):
        decode_batch(batch_of(*[one] * MAX_BATCH, b"{}"))


def sized(size: int, messageId: str) -> bytes:
    """A valid track message of exactly `size` bytes of JSON."""
    head = {"type": "track", "userId": "u", "event": "E", "messageId": messageId, "pad": ""}
    pad = size - len(dumps(head))
    raw = dumps({**head, "pad": "x" * pad})
    assert len(raw) == size
    return raw


def test_message_over_32kb_is_rejected() -> None:
    small = sized(200, "small")
    at_limit = sized(MAX_MESSAGE_BYTES, "at-limit")
    over = sized(MAX_MESSAGE_BYTES + 1, "over")
    decoded = decode_batch(batch_of(small, at_limit, over, small))
    assert [m.messageId for m in decoded.messages] == ["small", "at-limit", "small"]
    [rejected] = decoded.rejected
    assert rejected.index == 2
    assert rejected.messageId == "over"
    assert "32 KB" in rejected.reason and "32,769 bytes" in rejected.reason
    assert rejected.raw == over
    assert decode_batch(decoded.body).messages == decoded.messages


def test_large_body_of_small_messages_is_kept_as_sent() -> None:
    body = batch_of(*[sized(1000, f"m{i}") for i in range(100)])
    assert len(body) > MAX_MESSAGE_BYTES
    decoded = decode_batch(body)
    assert len(decoded.messages) == 100 and decoded.rejected == []
    assert decoded.body is body


# --- bodies that cannot be read at all -------------------------------------------------

INVALID_BODIES = [
    (b"", "not valid JSON"),
    (b"not json", "not valid JSON"),
    (b'{"batch": [', "not valid JSON"),
    (b'{"batch": []} trailing', "not valid JSON"),
    (b'{"batch": [], "context": {"ip": "\xff"}}', "not valid UTF-8"),
    # bytes msgspec would skip unread are checked too
    (b'{"batch": [{"type": "track", "userId": "u", "event": "E", "x": "\xc3\x28"}]}',
     "not valid UTF-8"),
    (b"[]", "Expected `object`, got `array`"),
    (b'"batch"', "Expected `object`, got `str`"),
    (b"{}", "Object missing required field `batch`"),
    (b'{"batch": {}}', "Expected `array`, got `object` - at `batch`"),
    (b'{"batch": null}', "at `batch`"),
    (b'{"batch": [], "context": []}', "at `context`"),
    (b'{"batch": [], "integrations": 1}', "at `integrations`"),
    (b'{"batch": [], "sentAt": "soon"}', "at `sentAt`"),
    (b'{"batch": [], "writeKey": 5}', "at `writeKey`"),
    (b'{"batch": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested too deeply"),
]


@pytest.mark.parametrize(("body", "reason"), INVALID_BODIES)
def test_invalid_body(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBody) as info:
        decode_batch(body)
    assert reason in info.value.reason
    assert "$" not in info.value.reason


def test_valid_utf8_is_accepted() -> None:
    body = dumps({"batch": [{**TRACK, "event": "Café ☕"}]}).replace(b"\\u00e9", "é".encode())
    assert decode_batch(body).messages[0].event == "Café ☕"  # type: ignore[union-attr]


# --- single-message routes ------------------------------------------------------------


def test_single_type_comes_from_the_path() -> None:
    body = dumps({"type": "identify", "userId": "u", "event": "Signed Up", "messageId": "m"})
    decoded = decode_single(body, "track")
    assert decoded.messages == [Track(userId="u", event="Signed Up", messageId="m")]
    assert decoded.rejected == []
    assert decode_batch(decoded.body).messages == decoded.messages


def test_single_without_type_in_body() -> None:
    decoded = decode_single(b'{"userId": "u", "groupId": "g"}', "group")
    assert decoded.messages == [Group(userId="u", groupId="g")]


def test_single_reads_and_drops_write_key() -> None:
    body = dumps({"userId": "u", "traits": {}, "writeKey": "wk_secret"})
    decoded = decode_single(body, "identify")
    assert decoded.write_key == "wk_secret"
    assert decoded.messages == [Identify(userId="u", traits={})]
    assert b"wk_secret" not in decoded.body
    assert decode_batch(decoded.body).messages == decoded.messages


def test_single_write_key_of_wrong_type_is_ignored() -> None:
    decoded = decode_single(b'{"userId": "u", "event": "E", "writeKey": 5}', "track")
    assert decoded.write_key is None
    assert len(decoded.messages) == 1


def test_single_invalid_message_is_rejected_not_raised() -> None:
    body = dumps({"userId": "u", "messageId": "m", "writeKey": "wk_secret"})
    decoded = decode_single(body, "track")
    assert decoded.messages == []
    [rejected] = decoded.rejected
    assert rejected.index == 0
    assert rejected.messageId == "m"
    assert "`event`" in rejected.reason
    assert b"wk_secret" not in rejected.raw
    assert json.loads(rejected.raw)["type"] == "track"
    assert decoded.write_key == "wk_secret"
    assert decode_batch(decoded.body).messages == []


def test_single_over_32kb_is_rejected() -> None:
    decoded = decode_single(sized(MAX_MESSAGE_BYTES + 100, "big"), "track")
    assert decoded.messages == []
    assert "32 KB" in decoded.rejected[0].reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[1]", "must be a JSON object"),
        (b"nope", "not valid JSON"),
        (b'{"userId": "\xff"}', "not valid UTF-8"),
    ],
)
def test_single_invalid_body(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidBody, match=reason):
        decode_single(body, "track")


# --- per-event helpers ---------------------------------------------------------------

RECEIVED = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
T0 = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("fields", "batch_sent_at", "received", "expected"),
    [
        # timestamp wins over everything
        ({"timestamp": T0, "originalTimestamp": RECEIVED, "sentAt": RECEIVED}, RECEIVED,
         RECEIVED, T0),
        # timestamp with an offset, and a naive one (taken as UTC)
        ({"timestamp": datetime(2026, 11, 28, 11, 0, tzinfo=PLUS2)}, None, RECEIVED, T0),
        ({"timestamp": datetime(2026, 11, 28, 9, 0)}, None, RECEIVED, T0),
        # skew corrected with the message's own sentAt (client clock 1 h fast)
        ({"originalTimestamp": T0 + timedelta(hours=1), "sentAt": T0 + timedelta(hours=4)},
         None, RECEIVED, RECEIVED - timedelta(hours=3)),
        # ... the message's sentAt before the batch's
        ({"originalTimestamp": T0, "sentAt": T0 + timedelta(minutes=1)},
         T0 + timedelta(hours=1), RECEIVED, RECEIVED - timedelta(minutes=1)),
        # ... else the batch's sentAt
        ({"originalTimestamp": T0}, T0 + timedelta(seconds=30), RECEIVED,
         RECEIVED - timedelta(seconds=30)),
        # ... naive values, mixed with aware ones
        ({"originalTimestamp": datetime(2026, 11, 28, 9, 0)}, datetime(2026, 11, 28, 11, 0, 5,
         tzinfo=PLUS2), datetime(2026, 11, 28, 12, 0), RECEIVED - timedelta(seconds=5)),
        # originalTimestamp without any sentAt: receivedAt
        ({"originalTimestamp": T0}, None, RECEIVED, RECEIVED),
        # sentAt without originalTimestamp: receivedAt
        ({"sentAt": T0}, T0, RECEIVED, RECEIVED),
        # nothing: receivedAt, made aware
        ({}, None, datetime(2026, 11, 28, 12, 0), RECEIVED),
        ({}, None, datetime(2026, 11, 28, 14, 0, tzinfo=PLUS2), RECEIVED),
        # a skew that leaves the calendar: receivedAt
        ({"originalTimestamp": datetime(1, 1, 1, tzinfo=UTC),
          "sentAt": datetime(9999, 1, 1, tzinfo=UTC)}, None, RECEIVED, RECEIVED),
        # a timestamp outside the calendar once in UTC: the rules after it decide
        ({"timestamp": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))}, None,
         RECEIVED, RECEIVED),
        ({"timestamp": datetime(9999, 12, 31, 23, 30, tzinfo=timezone(-timedelta(hours=1))),
          "originalTimestamp": T0, "sentAt": T0 + timedelta(seconds=30)}, None, RECEIVED,
         RECEIVED - timedelta(seconds=30)),
    ],
)
def test_effective_timestamp(
    fields: dict[str, Any], batch_sent_at: datetime | None, received: datetime,
    expected: datetime,
) -> None:
    msg = Track(userId="u", event="E", **fields)
    got = effective_timestamp(msg, batch_sent_at, received)
    assert got == expected
    assert got.tzinfo is UTC


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        (None, None, None),
        ({"a": 1}, None, {"a": 1}),
        (None, {"a": 1}, {"a": 1}),
        ({"a": 1, "b": 2}, {"b": 3}, {"a": 1, "b": 3}),
        # nested dicts merge, the message's values win
        ({"library": {"name": "py", "version": "1"}, "ip": "1.1.1.1"},
         {"library": {"version": "2"}, "groupId": "g"},
         {"library": {"name": "py", "version": "2"}, "ip": "1.1.1.1", "groupId": "g"}),
        ({"traits": {"a": {"b": 1, "c": 2}}}, {"traits": {"a": {"c": 3}}},
         {"traits": {"a": {"b": 1, "c": 3}}}),
        # a non-dict on either side replaces rather than merges
        ({"traits": {"a": 1}}, {"traits": None}, {"traits": None}),
        ({"traits": "x"}, {"traits": {"a": 1}}, {"traits": {"a": 1}}),
    ],
)
def test_merged(
    outer: dict[str, Any] | None, inner: dict[str, Any] | None, expected: dict[str, Any] | None
) -> None:
    before = json.dumps([outer, inner])
    assert merged(outer, inner) == expected
    assert json.dumps([outer, inner]) == before  # inputs untouched


@pytest.mark.parametrize(
    ("userId", "anonymousId", "user", "anon"),
    [
        ("u1", "a1", "u1", "a1"),
        (42, 0, "42", "0"),
        ("", "a", None, "a"),
        (None, "a", None, "a"),
        ("u", "", "u", None),
    ],
)
def test_ids_normalised(
    userId: str | int | None, anonymousId: str | int | None, user: str | None, anon: str | None
) -> None:
    msg = Track(userId=userId, anonymousId=anonymousId, event="E")
    assert user_id(msg) == user
    assert anonymous_id(msg) == anon


# --- properties ----------------------------------------------------------------------

ids = st.one_of(st.text(min_size=1, max_size=20), st.integers(-(2**63), 2**63 - 1))
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
json_object = st.dictionaries(st.text(max_size=8), json_value, max_size=4)
moments = st.datetimes(timezones=st.one_of(st.none(), st.just(UTC)))


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["identify", "group", "track", "page", "screen", "alias"]))
    msg: dict[str, Any] = {"type": kind}
    who = draw(st.sampled_from(["userId", "anonymousId", "both"]))
    if who in ("userId", "both"):
        msg["userId"] = draw(ids)
    if who in ("anonymousId", "both"):
        msg["anonymousId"] = draw(ids)
    optional = {
        "messageId": st.text(max_size=40),
        "timestamp": moments, "originalTimestamp": moments, "sentAt": moments,
        "context": json_object, "integrations": json_object,
    }
    if kind in ("identify", "group"):
        optional["traits"] = json_object
    if kind == "group":
        msg["groupId"] = draw(ids)
    if kind == "track":
        msg["event"] = draw(st.text(min_size=1, max_size=20))
    if kind in ("track", "page", "screen"):
        optional["properties"] = json_object
    if kind in ("page", "screen"):
        optional["name"] = st.text(max_size=10)
        optional["category"] = st.text(max_size=10)
    if kind == "alias":
        msg["previousId"] = draw(ids)
    for key, strategy in optional.items():
        if draw(st.booleans()):
            msg[key] = draw(strategy)
    return msg


def check_roundtrip(decoded: Decoded) -> None:
    again = decode_batch(decoded.body)
    # the stored body keeps the rejected too: the router keeps them as dead letters
    assert again.rejected == decoded.rejected
    assert again.messages == decoded.messages
    assert (again.context, again.integrations, again.sent_at) == (
        decoded.context, decoded.integrations, decoded.sent_at)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(valid_messages(), max_size=12),
    broken=st.sets(st.integers(0, 11)),
    context=st.one_of(st.none(), json_object),
    sent_at=st.one_of(st.none(), moments),
)
def test_generated_batches_roundtrip(
    messages: list[dict[str, Any]], broken: set[int], context: dict[str, Any] | None,
    sent_at: datetime | None,
) -> None:
    top: dict[str, Any] = {"batch": messages}
    if context is not None:
        top["context"] = context
    if sent_at is not None:
        top["sentAt"] = sent_at
    decoded = decode_batch(msgspec.json.encode(top))
    assert decoded.rejected == []
    assert len(decoded.messages) == len(messages)
    for sent, got in zip(messages, decoded.messages, strict=True):
        assert type(got).__name__.lower() == sent["type"]
        assert got.userId == sent.get("userId")
        assert got.anonymousId == sent.get("anonymousId")
        assert got.context == sent.get("context")
        assert getattr(got, "event", None) == sent.get("event")
        assert getattr(got, "groupId", None) == sent.get("groupId")
    check_roundtrip(decoded)

    # the same batch with some messages stripped of every id: exactly those are rejected
    bad = {i for i in broken if i < len(messages)}
    mangled = [
        {k: v for k, v in m.items() if k not in ("userId", "anonymousId")} if i in bad else m
        for i, m in enumerate(messages)
    ]
    decoded = decode_batch(msgspec.json.encode({**top, "batch": mangled}))
    assert [r.index for r in decoded.rejected] == sorted(bad)
    assert all(r.reason == "userId or anonymousId is required" for r in decoded.rejected)
    assert len(decoded.messages) == len(messages) - len(bad)
    check_roundtrip(decoded)


def only_invalid_body(call: Any, body: bytes) -> Decoded | None:
    try:
        result: Decoded = call(body)
    except InvalidBody as exc:
        assert exc.reason
        return None
    check_roundtrip(result)
    return result


bodies = st.one_of(
    st.binary(max_size=200),
    json_value.map(lambda v: msgspec.json.encode(v)),
    st.lists(json_value, max_size=4).map(lambda b: msgspec.json.encode({"batch": b})),
    st.lists(st.one_of(valid_messages(), json_object), max_size=4).map(
        lambda b: msgspec.json.encode({"batch": b})),
    st.tuples(st.lists(valid_messages(), max_size=6), json_value).map(
        lambda t: msgspec.json.encode({"batch": t[0], "context": t[1]})),
)


@settings(max_examples=150, deadline=None)
@given(body=bodies)
def test_decode_raises_only_invalid_body(body: bytes) -> None:
    decoded = only_invalid_body(decode_batch, body)
    if decoded is not None:
        assert len(decoded.messages) + len(decoded.rejected) == len(json.loads(body)["batch"])
    for kind in ("track", "identify", "nonsense"):
        single = only_invalid_body(lambda b, kind=kind: decode_single(b, kind), body)
        if single is not None:
            assert len(single.messages) + len(single.rejected) == 1


def same_verdict(body: bytes) -> None:
    """`check_batch` (ingest, pipeline in another process) says what `decode_batch` (the
    router) will: the same count, the same rejects with the same reasons, the same stored
    body, or the same `InvalidBody`."""
    try:
        full = decode_batch(body).checked()
    except InvalidBody as exc:
        with pytest.raises(InvalidBody) as info:
            check_batch(body)
        assert info.value.reason == exc.reason
        return
    assert check_batch(body) == full


@pytest.mark.parametrize(("message", "reason"), INVALID)
def test_check_batch_rejects_what_decode_batch_rejects(message: Any, reason: str) -> None:
    same_verdict(batch_of(dumps(TRACK), dumps(message)))
    same_verdict(batch_of(dumps(message), writeKey="wk"))


@settings(max_examples=200, deadline=None)
@given(body=bodies)
def test_check_batch_agrees_with_decode_batch(body: bytes) -> None:
    same_verdict(body)


ANONYMOUS_ONLY = {"type": "page", "anonymousId": "a1", "name": "Home"}


@pytest.mark.parametrize(
    "body",
    [
        # the common batch (each message has a userId, none a writeKey), checked in one decode
        batch_of(dumps(TRACK), dumps({**TRACK, "userId": 0})),
        batch_of(*[sized(1000, f"m{i}") for i in range(100)]),  # over 32 KB, kept as sent
        batch_of(sized(200, "a"), sized(MAX_MESSAGE_BYTES + 1, "over"), sized(200, "b")),
        batch_of(dumps(TRACK), writeKey="wk_top"),  # the top's key goes, the messages stay
        batch_of(*[sized(1000, f"k{i}") for i in range(40)], writeKey="wk_top"),
        # one message outside it, wherever it is: the batch is read again, the same verdict
        batch_of(dumps(TRACK), dumps(ANONYMOUS_ONLY)),
        batch_of(dumps(ANONYMOUS_ONLY), dumps(TRACK)),
        batch_of(dumps(TRACK), dumps({**ANONYMOUS_ONLY, "userId": ""})),
        batch_of(dumps(TRACK), dumps({**ANONYMOUS_ONLY, "userId": None})),
        batch_of(dumps(TRACK), dumps({**TRACK, "userId": ""})),  # no id at all: rejected
        batch_of(dumps(TRACK), dumps({**TRACK, "userId": True})),
        batch_of(dumps(TRACK), dumps({**TRACK, "writeKey": "wk_in_message"})),
        batch_of(dumps(TRACK), dumps({**TRACK, "writeKey": None})),
        batch_of(dumps(TRACK), dumps({**TRACK, "event": ""})),
        batch_of(dumps(TRACK), b'{"type":"track","userId":"u","event":"E"'),  # not JSON
    ],
)
def test_check_batch_agrees_on_either_side_of_its_fast_type(body: bytes) -> None:
    same_verdict(body)


def test_write_keys_inside_messages_are_not_stored() -> None:
    # analytics.js's batching mode: the key at the top and in every message
    body = msgspec.json.encode({
        "writeKey": "wk_secret_1",
        "batch": [
            {"type": "track", "userId": "u1", "event": "E", "writeKey": "wk_secret_1"},
            {"type": "track", "userId": "u1", "writeKey": "wk_secret_1"},  # no event: rejected
            {"type": "page", "userId": "u1", "name": "Home"},
        ],
    })
    decoded = decode_batch(body)
    checked = check_batch(body)
    assert decoded.write_key == checked.write_key == "wk_secret_1"
    assert [r.index for r in decoded.rejected] == [1]
    for stored in (decoded.body, checked.body, *(r.raw for r in decoded.rejected)):
        assert b"wk_secret_1" not in stored and b"writeKey" not in stored
    again = decode_batch(decoded.body)
    assert [type(m).__name__ for m in again.messages] == ["Track", "Page"]
    assert [r.index for r in again.rejected] == [1]


def test_write_keys_inside_valid_messages_are_not_stored() -> None:
    body = msgspec.json.encode({
        "batch": [{"type": "track", "userId": "u1", "event": "E", "writeKey": "wk_secret_2"}],
        "sentAt": "2026-11-20T10:00:00Z",
    })
    decoded, checked = decode_batch(body), check_batch(body)
    assert decoded.write_key is None and decoded.valid == checked.valid == 1
    for stored in (decoded.body, checked.body):
        assert b"wk_secret_2" not in stored
        assert decode_batch(stored).sent_at == decoded.sent_at


@pytest.mark.parametrize("name", [b"writeKey", b"write\\u004bey", b"\\u0077riteKey"])
def test_write_keys_spelt_with_escapes_are_not_stored(name: bytes) -> None:
    # JSON lets a key be spelt with \u escapes; msgspec reads it as writeKey all the same
    message = b'{"type":"track","userId":"u1","event":"E","' + name + b'":"wk_secret_3"}'
    body = b'{"batch":[' + message + b',{"type":"page","userId":"u2","name":"Home"}]}'
    decoded, checked = decode_batch(body), check_batch(body)
    assert decoded.valid == checked.valid == 2
    for stored in (decoded.body, checked.body):
        assert b"wk_secret_3" not in stored
        assert [type(m).__name__ for m in decode_batch(stored).messages] == ["Track", "Page"]


def test_a_null_write_key_leaves_the_body_as_sent() -> None:
    # no secret to remove: the body is stored as it came, by either path
    body = b'{"batch":[{"type":"track","userId":"u1","event":"E","writeKey":null}],"writeKey":null}'
    assert decode_batch(body).body == check_batch(body).body == body


# --- decode_stored: the stored body as apply reads it ---------------------------------


def read_context(context: dict[str, Any] | Context | None) -> tuple[Any, Any]:
    """(groupId, traits) of a merged context, UNSET where absent: all apply reads of it."""
    if context is None:
        return msgspec.UNSET, msgspec.UNSET
    if isinstance(context, dict):
        return context.get("groupId", msgspec.UNSET), context.get("traits", msgspec.UNSET)
    return context.groupId, context.traits


def calls(msg: AnyMessage, context: dict[str, Any] | Context | None) -> list[Call | Skip]:
    """Every call the mapping makes of `msg`: both dialects, every unnamed-pages setting."""
    at = datetime(2026, 12, 1, tzinfo=UTC)
    return [
        to_call(msg, api=api, timestamp=at, context=context, unnamed_pages=unnamed)
        for api in ("v2", "segment") for unnamed in ("skip", "title", "path")
    ]


def same_as_decode_batch(body: bytes) -> Stored | None:
    """`decode_stored` gives `decode_batch`'s verdict on `body` (the same `InvalidBody`, or
    the same rejects, reasons and raws), and the same of every accepted message as far as
    apply reads it: ids, timestamps, integrations, the batch's context merged under the
    message's, and the calls the mapping makes of it."""
    try:
        full = decode_batch(body)
    except InvalidBody as exc:
        with pytest.raises(InvalidBody) as info:
            decode_stored(body)
        assert info.value.reason == exc.reason
        return None
    stored = decode_stored(body)
    assert stored.rejected == full.rejected
    assert (stored.integrations, stored.sent_at) == (full.integrations, full.sent_at)
    assert len(stored.messages) == len(full.messages)
    for slim, whole in zip(stored.messages, full.messages, strict=True):
        assert slim.__struct_config__.tag == whole.__struct_config__.tag
        for field in ("messageId", "userId", "anonymousId", "timestamp", "originalTimestamp",
                      "sentAt", "integrations", "event", "groupId", "traits", "name",
                      "category", "previousId"):
            assert getattr(slim, field, None) == getattr(whole, field, None), field
        context = merged_context(stored.context, slim.context)
        whole_context = merged(full.context, whole.context)
        assert read_context(context) == read_context(whole_context)
        assert context_group(context) == context_group(whole_context)
        assert context_traits(context) == context_traits(whole_context)
        assert calls(slim, context) == calls(whole, whole_context)
    # a dead letter keeps the message in full
    assert in_full(body, stored, range(len(stored.messages))) == full.messages
    return stored


names = st.one_of(st.none(), ids, st.sampled_from(["", " ", "Home"]), json_value)
traits_values = st.one_of(
    st.none(), json_value, st.dictionaries(st.sampled_from(["a", "b", "c"]), json_value, max_size=3)
)
odd_objects = st.one_of(
    # a context or a page's properties, the fields apply reads among others
    st.fixed_dictionaries({}, optional={
        "groupId": names, "traits": traits_values, "ip": json_value,
        "name": names, "title": names, "path": names,
    }),
    json_object,
)
# escapes that spell the same names: msgspec reads them as the names
ESCAPES = [(b'"groupId"', b'"group\\u0049d"'), (b'"traits"', b'"tr\\u0061its"'),
           (b'"name"', b'"n\\u0061me"'), (b'"title"', b'"\\u0074itle"'),
           (b'"track"', b'"tr\\u0061ck"'), (b'"userId"', b'"user\\u0049d"')]


@st.composite
def odd_messages(draw: st.DrawFn) -> Any:
    """Messages with the contexts and properties apply reads part of, odd ones included:
    objects or not, ids of either type, nulls, nested traits; some without ids, some not
    messages at all."""
    msg = draw(st.one_of(valid_messages(), json_value))
    if not isinstance(msg, dict):
        return msg
    if draw(st.booleans()):
        msg["context"] = draw(st.one_of(odd_objects, odd_objects, json_value))
    if draw(st.booleans()):
        msg["properties"] = draw(st.one_of(odd_objects, odd_objects, json_value))
    if draw(st.booleans()):
        msg["integrations"] = draw(st.one_of(odd_objects, st.just({"Accoil": False})))
    if draw(st.integers(0, 7)) == 0:
        msg.pop("userId", None)
        msg.pop("anonymousId", None)
    return msg


@st.composite
def odd_bodies(draw: st.DrawFn) -> bytes:
    top: dict[str, Any] = {"batch": draw(st.lists(odd_messages(), max_size=8))}
    if draw(st.booleans()):
        top["context"] = draw(st.one_of(odd_objects, odd_objects, json_value))
    if draw(st.booleans()):
        top["integrations"] = draw(odd_objects)
    if draw(st.booleans()):
        top["sentAt"] = draw(moments)
    body = msgspec.json.encode(top)
    for name, escaped in ESCAPES:
        if draw(st.booleans()):
            body = body.replace(name, escaped)
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=odd_bodies())
def test_decode_stored_agrees_with_decode_batch(body: bytes) -> None:
    same_as_decode_batch(body)


@settings(max_examples=150, deadline=None)
@given(body=bodies)
def test_decode_stored_reads_a_stored_body_as_decode_batch_does(body: bytes) -> None:
    # the worker reads what ingest stored without searching it for write keys
    same_as_decode_batch(body)
    try:
        stored = check_batch(body).body
    except InvalidBody:
        return
    same_as_decode_batch(stored)


@pytest.mark.parametrize(("message", "reason"), INVALID)
def test_decode_stored_rejects_what_decode_batch_rejects(message: Any, reason: str) -> None:
    bad = json.dumps(message).replace("Infinity", "1e400").encode()
    for body in (batch_of(dumps(TRACK), bad), batch_of(bad)):
        stored = same_as_decode_batch(body)
        assert stored is not None
        assert len(stored.rejected) == 1
        assert reason in stored.rejected[0].reason


# --- numbers out of range: read as Segment's JavaScript reads them ---------------------

LONGEST_INT = 4300  # characters of an integer msgspec reads, its sign included


def number_as_js_forwards(text: str) -> Any:
    """A JSON number as the decoders read it where any value goes: a float beyond the double
    range is null (JSON.parse gives Infinity, JSON.stringify sends null), as is an integer
    too long for msgspec; other integers stay exact."""
    if any(c in text for c in ".eE"):
        value = float(text)
        return None if value in (float("inf"), float("-inf")) else value
    return int(text) if len(text) <= LONGEST_INT else None


def test_numbers_out_of_range_where_any_value_goes_read_as_null() -> None:
    # Where the check skips an object (properties, a context's other fields), the model and
    # the stored decode build it: all three accept the message, the value read as null.
    huge = "9" * (LONGEST_INT + 1)
    body = batch_of(
        b'{"type":"track","userId":"u","event":"E","properties":{"a":1e400,"b":[-1e400],'
        b'"c":1e-400,"d":' + huge.encode() + b',"e":"1e400"},"context":{"ip":[1e400]}}',
        b'{"type":"identify","userId":"u","traits":{"a":1e400,"big":18446744073709551616},'
        b'"context":{"traits":{"b":-' + huge.encode() + b'}}}',
        b'{"type":"page","userId":"u","properties":{"title":1e400,"path":"/p"}}',
    ).replace(b'"batch"', b'"context":{"groupId":"g","n":1e400},"batch"')
    assert check_batch(body).valid == 3
    track, identify, page = decode_batch(body).messages
    assert isinstance(track, Track) and track.properties == {
        "a": None, "b": [None], "c": 0.0, "d": None, "e": "1e400"}
    assert isinstance(identify, Identify) and identify.traits == {
        "a": None, "big": 2**64}
    assert identify.context == {"traits": {"b": None}}
    assert decode_batch(body).context == {"groupId": "g", "n": None}
    stored = same_as_decode_batch(body)
    assert stored is not None and stored.context == Context(groupId="g")
    # what is forwarded: JSON's null, as Segment sends such a value on
    assert msgspec.json.encode(identify.traits) == b'{"a":null,"big":18446744073709551616}'
    assert calls(page, None) == calls(decode_batch(body).messages[2], None)


def test_a_number_out_of_range_where_apply_reads_it() -> None:
    # context.groupId beyond the double range names no account: a null (which hides the
    # batch's groupId, as a message's own null does)
    for body in (
        batch_of(b'{"type":"track","userId":"u","event":"E","context":{"groupId":1e400}}',
                 context={"groupId": "g"}),
        batch_of(b'{"type":"page","userId":"u","properties":{"title":[1e400],"name":1e400}}'),
        batch_of(b'{"type":"identify","userId":"u","context":{"traits":{"a":1e400}}}'),
        batch_of(dumps(TRACK), context={"groupId": "1"}).replace(b'"1"', b"1e400"),
        batch_of(dumps(TRACK), context={"groupId": "1"}).replace(b'"1"', b"-" + b"9" * 5000),
    ):
        same_verdict(body)
        stored = same_as_decode_batch(body)
        assert stored is not None and stored.rejected == []
        (message,) = stored.messages
        assert context_group(merged_context(stored.context, message.context)) is None


def test_an_id_out_of_range_is_rejected_by_every_decode() -> None:
    # An id must be a string or an integer: 1e400 is neither (nor would Segment's null be an
    # id), so the message is rejected with its reason, listed in the reply, a dead letter.
    for field, value in (("userId", b"1e400"), ("anonymousId", b"-1e400"),
                         ("userId", b"9" * (LONGEST_INT + 1))):
        message = (b'{"type":"track","userId":"u","anonymousId":"a","event":"E"}'
                   .replace(b'"' + field.encode() + b'":"' + field[0].encode() + b'"',
                            b'"' + field.encode() + b'":' + value))
        assert value in message
        body = batch_of(dumps(TRACK), message)
        same_verdict(body)
        stored = same_as_decode_batch(body)
        assert stored is not None
        assert [(r.index, r.raw) for r in stored.rejected] == [(1, message)]
        assert "out of range - at `" + field + "`" in stored.rejected[0].reason
    for message in (b'{"type":"group","userId":"u","groupId":1e400}',
                    b'{"type":"alias","userId":"u","previousId":-1e400}'):
        checked = check_batch(batch_of(message))
        assert checked.valid == 0 and "Number out of range" in checked.rejected[0].reason


def test_a_batch_with_a_write_key_and_a_number_out_of_range_is_checked() -> None:
    # the body to store is re-encoded without the key: the batch's context with it
    body = batch_of(b'{"type":"track","userId":"u","event":"E","writeKey":"wk_1"}',
                    context={"n": 1, "m": [2]}).replace(b"1,", b"1e400,").replace(
                        b"[2]", b"[-" + b"9" * 4400 + b"]")
    checked = check_batch(body)
    assert checked.valid == 1 and b"wk_1" not in checked.body
    assert decode_batch(checked.body).context == {"n": None, "m": [None]}
    same_verdict(body)
    same_as_decode_batch(body)


digits = st.integers(1, 30).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
numbers = st.one_of(
    # integers: of 64 bits, beyond, and longer than msgspec reads
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.integers(-(10**40), 10**40).map(str),
    st.sampled_from([2**64, -(2**64) - 1, 10**308, 10**309]).map(str),
    st.tuples(st.sampled_from(["", "-"]), st.integers(LONGEST_INT - 2, LONGEST_INT + 2)).map(
        lambda t: t[0] + "9" * t[1]),
    # fractions and exponents: in range, beyond it (1e400, -1e400) and below it (1e-400)
    st.tuples(st.sampled_from(["", "-"]), st.integers(0, 10**6), digits,
              st.sampled_from(["e", "E", "e+", "e-"]),
              st.one_of(st.integers(0, 400), st.integers(0, 10**5))).map(
        lambda t: f"{t[0]}{t[1]}.{t[2]}{t[3]}{t[4]}"),
    st.tuples(st.sampled_from(["", "-"]), st.integers(1, 9), st.integers(290, 330)).map(
        lambda t: f"{t[0]}{t[1]}e{t[2]}"),
    st.sampled_from(["1e400", "-1e400", "1e-400", "-1e-400", "1.7976931348623157e308",
                     "1.7976931348623159e308", "4.9e-324", "2e-324", "0.0", "-0.0"]),
)
# Where a number goes (each `@` is replaced by it): inside an object or array where any value
# goes, with where the model holds it, ...
ANYWHERE: dict[bytes, Callable[[Any], Any]] = {
    b'{"type":"track","userId":"u","event":"E","properties":{"n":@}}':
        lambda m: m.properties["n"],
    b'{"type":"track","userId":"u","event":"E","properties":{"a":[1,{"n":@}]}}':
        lambda m: m.properties["a"][1]["n"],
    b'{"type":"track","userId":"u","event":"E","context":{"ip":@,"groupId":"g"}}':
        lambda m: m.context["ip"],
    b'{"type":"track","userId":"u","event":"E","context":{"groupId":@}}':
        lambda m: m.context["groupId"],
    b'{"type":"identify","userId":"u","context":{"traits":{"n":@}}}':
        lambda m: m.context["traits"]["n"],
    b'{"type":"identify","userId":"u","traits":{"n":[@,"@"]}}': lambda m: m.traits["n"][0],
    b'{"type":"group","userId":"u","groupId":"g","traits":{"n":@}}': lambda m: m.traits["n"],
    b'{"type":"page","userId":"u","properties":{"title":@,"path":"/p"}}':
        lambda m: m.properties["title"],
    b'{"type":"screen","userId":"u","properties":{"name":{"n":@}}}':
        lambda m: m.properties["name"]["n"],
    b'{"type":"track","userId":"u","event":"E","integrations":{"n":@}}':
        lambda m: m.integrations["n"],
}
# ... and where a type reads it (ids, names, timestamps) or nothing does (an unknown field)
ELSEWHERE = [
    b'{"type":"track","userId":"u","event":"E","unknown":@}',
    b'{"type":"track","userId":"u","event":"E","writeKey":@}',
    b'{"type":"track","userId":@,"event":"E"}',
    b'{"type":"track","userId":"","anonymousId":@,"event":"E"}',
    b'{"type":"group","userId":"u","groupId":@}',
    b'{"type":"alias","userId":"u","previousId":@}',
    b'{"type":"track","userId":"u","event":@}',
    b'{"type":"page","userId":"u","name":@}',
    b'{"type":"track","userId":"u","event":"E","timestamp":@}',
    b'{"type":"track","userId":"u","event":"E","messageId":@}',
    b'{"type":"track","userId":"u","event":"E","context":@}',
]
# the batch's own fields, and where `decode_batch` holds the number
TOPS: dict[bytes, Callable[[Decoded], Any] | None] = {
    b"": None,
    b',"context":{"n":@}': lambda d: d.context and d.context["n"],
    b',"context":{"groupId":@}': lambda d: d.context and d.context["groupId"],
    b',"integrations":{"n":[@]}': lambda d: d.integrations and d.integrations["n"][0],
    b',"writeKey":"wk_2"': None,
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(number=numbers, place=st.sampled_from([*ANYWHERE, *ELSEWHERE]),
       top=st.sampled_from(list(TOPS)), neighbour=st.booleans())
def test_check_and_every_decode_agree_on_numbers(
    number: str, place: bytes, top: bytes, neighbour: bool
) -> None:
    literal = number.encode()
    message = place.replace(b"@", literal)
    body = b'{"batch":[' + (dumps(TRACK) + b"," if neighbour else b"") + message + b"]"
    body += top.replace(b"@", literal) + b"}"
    same_verdict(body)
    same_as_decode_batch(body)
    stored_body = check_batch(body).body
    same_as_decode_batch(stored_body)
    if place in ANYWHERE:
        # never a reason to reject a message; the value as Segment forwards it
        decoded = decode_batch(body)
        assert decoded.rejected == []
        assert ANYWHERE[place](decoded.messages[-1]) == number_as_js_forwards(number)
    read = TOPS[top]
    if read is not None:
        assert read(decode_batch(body)) == number_as_js_forwards(number)


@pytest.mark.parametrize(
    "body",
    [
        batch_of(*[sized(1000, f"m{i}") for i in range(100)]),  # over 32 KB, each message not
        batch_of(sized(200, "a"), sized(MAX_MESSAGE_BYTES + 1, "over"), sized(200, "b")),
        batch_of(dumps(TRACK), dumps({**TRACK, "writeKey": "wk"}), dumps({"type": "track"})),
        b'{"batch":[' + b",".join([dumps(TRACK)] * (MAX_BATCH + 1)) + b"]}",
        b'{"batch":[' + b",".join([dumps(TRACK)] * MAX_BATCH) + b',{"type":1}]}',
        batch_of(dumps(TRACK), b'{"type":"track","userId":"u","event":"E"'),  # not JSON
        batch_of(dumps(TRACK), writeKey=7),
        batch_of(dumps(TRACK), context="not an object"),
        batch_of(dumps({**TRACK, "context": {"groupId": None}}), context={"groupId": "g"}),
        batch_of(dumps({**TRACK, "context": {"traits": {"a": {"b": 1}}}}),
                 context={"groupId": 5, "traits": {"a": {"c": 2}, "d": 3}}),
        batch_of(dumps({"type": "page", "userId": "u", "properties": {"title": 5, "path": "/p"}})),
        batch_of(dumps({"type": "screen", "userId": "u", "properties": {"name": " ", "path": 1}})),
        batch_of(dumps({"type": "page", "userId": "u", "properties": []})),
        batch_of(dumps({**TRACK, "properties": "text"})),
        batch_of(dumps({**TRACK, "userId": 0, "context": {"groupId": True}})),
    ],
)
def test_decode_stored_agrees_on_the_edges(body: bytes) -> None:
    same_as_decode_batch(body)


def test_decode_stored_keeps_rejects_and_their_reasons() -> None:
    body = batch_of(dumps(TRACK), dumps({"type": "track", "event": "E"}), dumps({"type": "page", "userId": 0}))
    decoded = decode_stored(check_batch(body).body)
    assert [type(m).__name__ for m in decoded.messages] == ["StoredTrack", "StoredPage"]
    assert [(r.index, r.reason) for r in decoded.rejected] == [(1, "userId or anonymousId is required")]
    page = in_full(body, decoded, [1])
    assert page == [Page(userId=0)]


def test_decode_stored_builds_only_what_apply_reads() -> None:
    body = batch_of(
        dumps({**TRACK, "context": {"groupId": "g1", "ip": "1.2.3.4", "library": {"name": "x"}},
               "properties": {"plan": "pro"}}),
        dumps({"type": "page", "userId": "u", "properties": {"path": "/a", "url": "https://a"}}),
        context={"traits": {"plan": "pro"}, "locale": "en"},
    )
    stored = decode_stored(body)
    track, page = stored.messages
    assert track.context == Context(groupId="g1")
    assert getattr(track, "properties", None) is not None  # an object: validated, not built
    assert stored.context == Context(traits={"plan": "pro"})
    assert merged_context(stored.context, track.context) == Context(
        groupId="g1", traits={"plan": "pro"})
    assert getattr(page, "properties", None) is not None
    assert calls(page, page.context)[2] == to_call(
        Page(userId="u", properties={"path": "/a"}), api="v2",
        timestamp=datetime(2026, 12, 1, tzinfo=UTC), context=None, unnamed_pages="path")


def test_the_fast_type_takes_the_common_batch_and_nothing_outside_it() -> None:
    from gateway.segment import _FAST

    assert len(_FAST.decode(batch_of(dumps(TRACK), dumps({**TRACK, "userId": 7}))).batch) == 2
    for other in (ANONYMOUS_ONLY, {**TRACK, "userId": ""}, {**TRACK, "writeKey": "wk"}):
        with pytest.raises(msgspec.ValidationError):
            _FAST.decode(batch_of(dumps(TRACK), dumps(other)))
