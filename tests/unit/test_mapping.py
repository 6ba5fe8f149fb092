"""Segment message -> Accoil call (gateway.mapping), both upstream dialects."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from gateway.config import DEFAULT_BASE_URL, Source
from gateway.mapping import (
    MS_THRESHOLD,
    STAGING_BASE_URL,
    Call,
    Skip,
    Upstream,
    call_kind,
    counted,
    dialect,
    iso,
    normalise_traits,
    spoken_at,
    to_call,
    upstream,
    utc_day,
)
from gateway.segment import Alias, Group, Identify, Message, Page, Screen, Track
from tests.net import basic

TS = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
WHEN = "2026-11-28T10:00:00.123Z"


def call(msg: Message, api: str = "v2", context: dict[str, Any] | None = None) -> Call | Skip:
    return to_call(msg, api=api, timestamp=TS, context=context)  # type: ignore[arg-type]


# Every row of DESIGN 3: (message, merged context, path, body, kind, user_id, group_id, event)
V2 = [
    pytest.param(
        Identify(userId="u1", traits={"email": "a@b.c", "role": "admin"}), None,
        "/v2/identify", {"userId": "u1", "traits": {"email": "a@b.c", "role": "admin"},
                         "timestamp": WHEN},
        "identify", "u1", None, None, id="identify",
    ),
    pytest.param(
        Identify(userId=42, context={"ignored": "the merged context is used"}),
        {"traits": {"name": "Ann"}, "groupId": "acct-1"},
        "/v2/identify", {"userId": "42", "traits": {"name": "Ann"}, "groupId": "acct-1",
                         "timestamp": WHEN},
        "identify", "42", "acct-1", None, id="identify-context-traits-and-group",
    ),
    pytest.param(
        Identify(userId="u1", traits={"a": 1}), {"traits": {"b": 2}},
        "/v2/identify", {"userId": "u1", "traits": {"a": 1}, "timestamp": WHEN},
        "identify", "u1", None, None, id="identify-message-traits-win",
    ),
    pytest.param(
        Identify(userId="u1"), None,
        "/v2/identify", {"userId": "u1", "traits": {}, "timestamp": WHEN},
        "identify", "u1", None, None, id="identify-no-traits",
    ),
    pytest.param(
        Group(userId="u1", groupId="acct-1", traits={"name": "Acme", "plan": "pro"}),
        {"groupId": "other"},
        "/v2/group", {"groupId": "acct-1", "userId": "u1", "traits": {"name": "Acme", "plan": "pro"},
                      "timestamp": WHEN},
        "group", "u1", "acct-1", None, id="group",
    ),
    pytest.param(
        Group(anonymousId="a1", groupId=99), None,
        "/v2/group", {"groupId": "99", "traits": {}, "timestamp": WHEN},
        "group", None, "99", None, id="group-without-user",
    ),
    pytest.param(
        Track(userId="u1", event="Signed Up", properties={"plan": "pro"}), None,
        "/v2/track", {"userId": "u1", "event": "Signed Up", "timestamp": WHEN},
        "track", "u1", None, "Signed Up", id="track-properties-dropped",
    ),
    pytest.param(
        Track(userId="u1", event="Report Exported"), {"groupId": "acct-1", "ip": "1.1.1.1"},
        # the account is the actor's (call.group_id); Accoil's /v2/track has no groupId field
        "/v2/track", {"userId": "u1", "event": "Report Exported", "timestamp": WHEN},
        "track", "u1", "acct-1", "Report Exported", id="track-context-group",
    ),
    pytest.param(
        Page(userId="u1", name="Home", category="Marketing", properties={"name": "Other"}), None,
        "/v2/track", {"userId": "u1", "event": "Page Viewed Home", "timestamp": WHEN},
        "track", "u1", None, "Page Viewed Home", id="page",
    ),
    pytest.param(
        Page(userId="u1", properties={"name": "Pricing"}), {"groupId": 7},
        "/v2/track", {"userId": "u1", "event": "Page Viewed Pricing", "timestamp": WHEN},
        "track", "u1", "7", "Page Viewed Pricing", id="page-properties-name",
    ),
    pytest.param(
        Screen(userId="u1", name="Settings"), None,
        "/v2/track", {"userId": "u1", "event": "Screen Viewed Settings", "timestamp": WHEN},
        "track", "u1", None, "Screen Viewed Settings", id="screen",
    ),
    pytest.param(
        Screen(userId="u1", name="", properties={"name": "Profile"}), None,
        "/v2/track", {"userId": "u1", "event": "Screen Viewed Profile", "timestamp": WHEN},
        "track", "u1", None, "Screen Viewed Profile", id="screen-properties-name",
    ),
]

SEGMENT = [
    pytest.param(
        Identify(userId="u1", anonymousId="a1", traits={"email": "a@b.c"}), {"groupId": "acct"},
        "/segment", {"type": "identify", "userId": "u1", "anonymousId": "a1",
                     "timestamp": WHEN, "traits": {"email": "a@b.c"}},
        "identify", "u1", "acct", None, id="identify",
    ),
    pytest.param(
        Identify(userId="u1"), {"traits": {"name": "Ann"}},
        "/segment", {"type": "identify", "userId": "u1", "timestamp": WHEN,
                     "traits": {"name": "Ann"}},
        "identify", "u1", None, None, id="identify-context-traits",
    ),
    pytest.param(
        Group(userId="u1", groupId="acct-1", traits={"plan": "pro"}), None,
        "/segment", {"type": "group", "userId": "u1", "timestamp": WHEN, "groupId": "acct-1",
                     "traits": {"plan": "pro"}},
        "group", "u1", "acct-1", None, id="group",
    ),
    pytest.param(
        Group(anonymousId=5, groupId="acct-1"), None,
        "/segment", {"type": "group", "anonymousId": "5", "timestamp": WHEN, "groupId": "acct-1",
                     "traits": {}},
        "group", None, "acct-1", None, id="group-without-user",
    ),
    pytest.param(
        Track(userId="u1", event="Signed Up", properties={"x": 1}), {"groupId": "acct-1"},
        "/segment", {"type": "track", "userId": "u1", "timestamp": WHEN, "event": "Signed Up"},
        "track", "u1", "acct-1", "Signed Up", id="track",
    ),
    pytest.param(
        Page(userId="u1", name="Home"), None,
        "/segment", {"type": "page", "userId": "u1", "timestamp": WHEN, "name": "Home"},
        "track", "u1", None, "Page Viewed Home", id="page",
    ),
    pytest.param(
        Page(userId="u1", properties={"name": "Pricing"}), None,
        "/segment", {"type": "page", "userId": "u1", "timestamp": WHEN, "name": "Pricing"},
        "track", "u1", None, "Page Viewed Pricing", id="page-properties-name",
    ),
    pytest.param(
        Screen(userId="u1", anonymousId="a1", name="Settings"), None,
        "/segment", {"type": "screen", "userId": "u1", "anonymousId": "a1", "timestamp": WHEN,
                     "name": "Settings"},
        "track", "u1", None, "Screen Viewed Settings", id="screen",
    ),
]

ROW = "msg, context, path, body, kind, user, group, event"


def check_row(
    api: str, msg: Message, context: dict[str, Any] | None, path: str, body: dict[str, Any],
    kind: str, user: str | None, group: str | None, event: str | None,
) -> None:
    before = copy.deepcopy((msg, context))
    result = call(msg, api, context)
    assert isinstance(result, Call)
    assert result.path == path
    assert result.body == body
    assert result.kind == kind
    assert result.user_id == user
    assert result.group_id == group
    assert result.event == event
    if kind == "track":
        assert result.traits is None
    else:
        assert result.traits == body["traits"]
    assert (msg, context) == before  # mapping is pure


@pytest.mark.parametrize(ROW, V2)
def test_v2(msg: Message, context: dict[str, Any] | None, path: str, body: dict[str, Any],
            kind: str, user: str | None, group: str | None, event: str | None) -> None:
    check_row("v2", msg, context, path, body, kind, user, group, event)


@pytest.mark.parametrize(ROW, SEGMENT)
def test_segment(msg: Message, context: dict[str, Any] | None, path: str, body: dict[str, Any],
                 kind: str, user: str | None, group: str | None, event: str | None) -> None:
    check_row("segment", msg, context, path, body, kind, user, group, event)


# --- the dialect objects: what the forwarder and a replay read back from a queued call ---


@pytest.mark.parametrize(
    ("api", "rows"), [("v2", V2), ("segment", SEGMENT)], ids=["v2", "segment"]
)
def test_queued_calls_read_back_in_their_dialect(api: Any, rows: list[Any]) -> None:
    for row in rows:
        msg, context = row.values[0], row.values[1]
        result = call(msg, api, context)
        assert isinstance(result, Call)
        spoken = spoken_at(result.path)
        assert spoken is dialect(api) and spoken.api == api
        assert result.path == dialect(api).path(result.kind)
        # a replayed dead letter is requeued as the kind it was: from its path and body
        assert call_kind(result.path, msgspec.json.encode(result.body)) == result.kind
        label = "segment" if api == "segment" else result.path.removeprefix("/v2/")
        assert spoken.label(result.path) == label


def test_a_call_without_a_path_counts_as_track() -> None:
    assert call_kind(None, b"") == "track"


SKIPS = [
    pytest.param(Track(anonymousId="a", event="E"), "userId is required to forward a track call",
                 id="track-no-user"),
    pytest.param(Track(userId="", anonymousId="a", event="E"),
                 "userId is required to forward a track call", id="track-empty-user"),
    pytest.param(Identify(anonymousId="a", traits={"x": 1}),
                 "userId is required to forward an identify call", id="identify-no-user"),
    pytest.param(Page(anonymousId="a", name="Home"), "userId is required to forward a page call",
                 id="page-no-user"),
    pytest.param(Screen(anonymousId="a", name="Home"),
                 "userId is required to forward a screen call", id="screen-no-user"),
    # constructed directly, past the decoder's checks
    pytest.param(Group(userId="u", groupId=""), "groupId is required to forward a group call",
                 id="group-empty-group"),
    pytest.param(Track(userId="u", event=""), "event is required to forward a track call",
                 id="track-empty-event"),
]


@pytest.mark.parametrize("api", ["v2", "segment"])
@pytest.mark.parametrize(("msg", "reason"), SKIPS)
def test_skip(api: str, msg: Message, reason: str) -> None:
    result = call(msg, api)
    assert isinstance(result, Skip)
    assert result.reason.startswith(reason)
    assert not result.unsupported


UNNAMED = [
    pytest.param(Page(userId="u"), id="page-no-name"),
    pytest.param(Page(userId="u", name="  ", properties={"name": 3}), id="page-blank-name"),
    pytest.param(Screen(userId="u", properties={}), id="screen-no-name"),
    pytest.param(Page(userId="u", properties={"title": "Home", "path": "/"}), id="page-title"),
]


@pytest.mark.parametrize("api", ["v2", "segment"])
@pytest.mark.parametrize("msg", UNNAMED)
def test_unnamed_pages_are_counted_not_dead_letters_by_default(api: str, msg: Message) -> None:
    result = call(msg, api)
    assert isinstance(result, Skip)
    assert result.counted == "unnamed" and not result.unsupported
    assert result.reason.endswith("call without a name")


@pytest.mark.parametrize(
    ("unnamed", "props", "event"),
    [
        ("title", {"title": "Pricing - Acme", "path": "/pricing"}, "Page Viewed Pricing - Acme"),
        ("path", {"title": "Pricing - Acme", "path": "/pricing"}, "Page Viewed /pricing"),
        # a name, when there is one, always wins
        ("path", {"name": "Pricing", "path": "/pricing"}, "Page Viewed Pricing"),
    ],
)
def test_unnamed_pages_named_from_properties(unnamed: Any, props: dict[str, Any], event: str) -> None:
    result = to_call(Page(userId="u", properties=props), api="v2", timestamp=TS, context=None,
                     unnamed_pages=unnamed)
    assert isinstance(result, Call) and result.event == event
    assert result.body == {"userId": "u", "event": event, "timestamp": "2026-11-28T10:00:00.123Z"}


@pytest.mark.parametrize("unnamed", ["title", "path"])
def test_unnamed_pages_without_the_property_are_still_counted(unnamed: Any) -> None:
    result = to_call(Screen(userId="u", properties={"title": "", "path": 3}), api="segment",
                     timestamp=TS, context=None, unnamed_pages=unnamed)
    assert isinstance(result, Skip) and result.counted == "unnamed"


@pytest.mark.parametrize("api", ["v2", "segment"])
def test_alias_is_unsupported(api: str) -> None:
    result = call(Alias(userId="u", previousId="anon"), api)
    assert isinstance(result, Skip)
    assert result.unsupported
    assert "alias" in result.reason


# --- traits ----------------------------------------------------------------------------

CREATED_AT = [
    ("2024-01-15T10:00:00Z", "2024-01-15T10:00:00.000Z"),
    ("2024-01-15T12:00:00.5+02:00", "2024-01-15T10:00:00.500Z"),
    ("2024-01-15T10:00:00.123456789Z", "2024-01-15T10:00:00.123Z"),
    ("2024-01-15T10:00:00", "2024-01-15T10:00:00.000Z"),  # naive: UTC
    ("2024-01-15", "2024-01-15T00:00:00.000Z"),
    (1705312800, "2024-01-15T10:00:00.000Z"),  # seconds
    (1705312800.25, "2024-01-15T10:00:00.250Z"),
    (1705312800123, "2024-01-15T10:00:00.123Z"),  # milliseconds
    ("1705312800", "2024-01-15T10:00:00.000Z"),  # numeric strings
    (" 1705312800123 ", "2024-01-15T10:00:00.123Z"),
    ("1705312800.5", "2024-01-15T10:00:00.500Z"),
    (0, "1970-01-01T00:00:00.000Z"),
    (-86400, "1969-12-31T00:00:00.000Z"),
    # the seconds/milliseconds threshold
    (int(MS_THRESHOLD) - 1, "5138-11-16T09:46:39.000Z"),
    (int(MS_THRESHOLD), "1973-03-03T09:46:40.000Z"),
    # unreadable: unchanged
    ("garbage", "garbage"),
    ("", ""),
    ("1e10", "1e10"),
    # outside the calendar once in UTC: unchanged
    ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+01:00"),
    ("9999-12-31T23:30:00-01:00", "9999-12-31T23:30:00-01:00"),
    ("NaN", "NaN"),
    (float("inf"), float("inf")),
    (10**30, 10**30),
    (True, True),
    (None, None),
    ({"at": 1}, {"at": 1}),
]


@pytest.mark.parametrize("kind", ["identify", "group"])
@pytest.mark.parametrize(("value", "expected"), CREATED_AT)
@pytest.mark.parametrize("name", ["createdAt", "created_at"])
def test_created_at(kind: Any, value: Any, expected: Any, name: str) -> None:
    traits = {name: value, "email": "a@b.c"}
    out = normalise_traits(kind, traits)
    assert out == {name: expected, "email": "a@b.c"}
    assert traits[name] is value  # input untouched


MRR = [
    ("100", 100),
    ("99.50", 99.5),
    ("100.0", 100),
    (" 42 ", 42),
    ("-3", -3),
    ("12345678901234567890", 12345678901234567890),
    (99.5, 99.5),
    (100, 100),
    ("$100", "$100"),
    ("1,000", "1,000"),
    ("1e3", "1e3"),
    ("NaN", "NaN"),
    ("", ""),
    (None, None),
]


@pytest.mark.parametrize(("value", "expected"), MRR)
def test_group_mrr(value: Any, expected: Any) -> None:
    out = normalise_traits("group", {"mrr": value})
    assert out["mrr"] == expected
    assert type(out["mrr"]) is type(expected)


def test_mrr_on_a_user_is_untouched() -> None:
    assert normalise_traits("identify", {"mrr": "100"}) == {"mrr": "100"}


def test_other_traits_pass_through() -> None:
    traits = {"name": "Acme", "status": "active", "plan": "pro", "CreatedAt": 1705312800,
              "nested": {"createdAt": 1705312800}, "seats": "10"}
    assert normalise_traits("group", traits) == traits


@pytest.mark.parametrize("api", ["v2", "segment"])
def test_traits_normalised_in_calls(api: str) -> None:
    user = call(Identify(userId="u", traits={"createdAt": "1705312800",
                                             "created_at": 1705312800123}), api)
    group = call(Group(userId="u", groupId="g", traits={"createdAt": 1705312800123, "mrr": "5"}),
                 api)
    assert isinstance(user, Call) and isinstance(group, Call)
    assert user.body["traits"] == {"createdAt": "2024-01-15T10:00:00.000Z",
                                   "created_at": "2024-01-15T10:00:00.123Z"}
    assert group.body["traits"] == {"createdAt": "2024-01-15T10:00:00.123Z", "mrr": 5}
    assert group.traits == group.body["traits"]


@pytest.mark.parametrize(
    ("dt", "expected"),
    [
        (datetime(2026, 11, 28, 10, 0, 0, 123999, tzinfo=UTC), "2026-11-28T10:00:00.123Z"),
        (datetime(2026, 11, 28, 10, 0), "2026-11-28T10:00:00.000Z"),  # naive: UTC
        (datetime(2026, 11, 28, 1, 0, tzinfo=timezone(timedelta(hours=-9))),
         "2026-11-28T10:00:00.000Z"),
        (datetime(999, 1, 2, tzinfo=UTC), "0999-01-02T00:00:00.000Z"),
    ],
)
def test_iso(dt: datetime, expected: str) -> None:
    assert iso(dt) == expected
    assert utc_day(dt) == expected[:10]


COUNTED = [
    Track(userId="u", event="Clicked"),
    Track(userId=7, anonymousId="a", event="Clicked"),
    Track(anonymousId="a", event="Clicked"),
    Track(userId="u", event=""),
    Page(userId="u", name="Home"),
    Page(userId="u", properties={"title": "Pricing"}),
    Page(userId="u"),
    Screen(userId="u", properties={"name": "Feed"}),
    Screen(anonymousId="a", name="Feed"),
]


@pytest.mark.parametrize("api", ["v2", "segment"])
@pytest.mark.parametrize("unnamed", ["skip", "title"])
@pytest.mark.parametrize("msg", COUNTED)
def test_counted_decides_as_to_call_does(api: Any, unnamed: Any, msg: Track | Page | Screen) -> None:
    # an actor counts a message with `counted` and builds its call later, once per key
    hit = counted(msg, unnamed)
    result = to_call(msg, api=api, timestamp=TS, context=None, unnamed_pages=unnamed)
    if isinstance(result, Skip):
        assert hit == result
    else:
        assert hit == (result.user_id, result.event)


# --- upstream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "key", "base_url", "expected_url", "expected_auth"),
    [
        ("v2", "key123", DEFAULT_BASE_URL, DEFAULT_BASE_URL, "Basic key123"),
        ("v2", "key123", "http://127.0.0.1:8089/", "http://127.0.0.1:8089", "Basic key123"),
        # staging keys are a segment-dialect convention; v2 sends the key as given
        ("v2", "stg_key123", DEFAULT_BASE_URL, DEFAULT_BASE_URL, "Basic stg_key123"),
        ("segment", "key123", DEFAULT_BASE_URL, DEFAULT_BASE_URL, basic("key123")),
        ("segment", "stg_key123", DEFAULT_BASE_URL, STAGING_BASE_URL, basic("key123")),
        ("segment", "STG_key123", DEFAULT_BASE_URL, STAGING_BASE_URL, basic("key123")),
        ("segment", "Stg_key123", DEFAULT_BASE_URL + "/", STAGING_BASE_URL, basic("key123")),
        ("segment", "stg_key123", "http://127.0.0.1:8089", "http://127.0.0.1:8089",
         basic("stg_key123")),
        ("segment", "stgkey123", DEFAULT_BASE_URL, DEFAULT_BASE_URL, basic("stgkey123")),
    ],
)
def test_upstream(api: Any, key: str, base_url: str, expected_url: str, expected_auth: str) -> None:
    source = Source(write_key="wk", accoil_api_key=key, api=api, base_url=base_url)
    assert upstream(source) == Upstream(
        base_url=expected_url, authorization=expected_auth, api_key=key
    )


def test_upstream_never_renders_the_key() -> None:
    up = upstream(Source(write_key="wk", accoil_api_key="secret-key-1", api="v2"))
    assert up.authorization == "Basic secret-key-1"
    for text in (repr(up), str(up), f"{up}", f"{up!r}", repr([up]), repr(up.__rich_repr__())):
        assert "secret-key-1" not in text
        assert DEFAULT_BASE_URL in text
