"""Every ingest route, its auth and every validation error, over HTTP."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mock_accoil.server import MockAccoilServer
from tests.mock.mock_helpers import KEY, Ingest, segment_auth, v2_auth

MS = 1_764_324_000_000  # 2025-11-28T10:00:00Z
V1 = {"api_key": KEY, "timestamp": MS}


async def test_v2_routes_accept_and_store(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    ts = "2026-11-28T10:00:00.000Z"
    identify = {"userId": "u1", "traits": {"email": "a@b.c"}, "groupId": "g1", "timestamp": ts}
    group = {"groupId": "g1", "userId": "u2", "traits": {"name": "Acme"}, "timestamp": ts}
    track = {"userId": "u1", "event": "Report_Created", "timestamp": ts, "properties": {"x": 1}}
    for path, body in [("/v2/identify", identify), ("/v2/group", group), ("/v2/track", track)]:
        status, reply, _ = await ingest.v2(path, body)
        assert (status, reply) == (202, {"success": True})
    assert mock_accoil.users() == [{"api_key": KEY, "userId": "u1", "traits": {"email": "a@b.c"}}]
    assert mock_accoil.accounts() == [
        {"api_key": KEY, "groupId": "g1", "traits": {"name": "Acme"}, "members": ["u1", "u2"]}
    ]
    assert mock_accoil.counts() == [
        {"api_key": KEY, "day": "2026-11-28", "userId": "u1", "event": "Report_Created", "count": 1}
    ]
    calls = mock_accoil.calls()
    assert [(c["method"], c["path"], c["status"], c["api_key"]) for c in calls] == [
        ("POST", "/v2/identify", 202, KEY),
        ("POST", "/v2/group", 202, KEY),
        ("POST", "/v2/track", 202, KEY),
    ]
    assert calls[2]["body"] == track  # the journal keeps what was sent, properties included


async def test_segment_route(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    for body in [
        {"type": "identify", "userId": "u", "anonymousId": "a", "traits": {"t": 1}},
        {"type": "group", "groupId": "g", "userId": "u", "traits": {"plan": "x"}},
        {"type": "track", "userId": "u", "event": "E", "timestamp": "2026-11-28T10:00:00Z"},
        {"type": "page", "userId": "u", "name": "Home", "timestamp": "2026-11-28T10:00:00Z"},
        {"type": "screen", "userId": "u", "name": "Main", "timestamp": "2026-11-28T10:00:00Z"},
    ]:
        status, reply, _ = await ingest.segment(body)
        assert (status, reply) == (202, {"success": True}), body
    assert [(c["event"], c["count"]) for c in mock_accoil.counts(day="2026-11-28")] == [
        ("E", 1),
        ("Page Viewed Home", 1),
        ("Screen Viewed Main", 1),
    ]
    assert mock_accoil.calls()[0]["api_key"] == KEY  # decoded from base64(KEY + ":")
    assert mock_accoil.accounts(group_id="g")[0]["members"] == ["u"]


async def test_v1_routes(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    assert (await ingest.post("/v1/users", {**V1, "user_id": "u", "traits": {"a": 1}}))[0] == 202
    assert (await ingest.post("/v1/groups", {**V1, "group_id": "g", "user_id": "u"}))[0] == 202
    assert (await ingest.post("/v1/events", {**V1, "user_id": "u", "event": "E"}))[0] == 202
    assert mock_accoil.count("u", "E", day="2025-11-28", api_key=KEY) == 1
    assert mock_accoil.users(user_id="u")[0]["traits"] == {"a": 1}
    assert mock_accoil.calls(path="/v1/groups")[0]["api_key"] == KEY


# -- auth ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": "Basic "},
        {"Authorization": "Basic"},
        {"Authorization": KEY},
        segment_auth(),  # Segment's form is a bug on v2
    ],
    ids=["missing", "bearer", "empty", "scheme-only", "no-scheme", "base64"],
)
@pytest.mark.parametrize("path", ["/v2/identify", "/v2/group", "/v2/track"])
async def test_v2_auth_errors(
    mock_accoil: MockAccoilServer, ingest: Ingest, path: str, headers: dict[str, str]
) -> None:
    body = {"userId": "u", "groupId": "g", "event": "E"}
    status, reply, _ = await ingest.post(path, body, headers=headers)
    assert status == 401
    assert "error" in reply and KEY not in reply["error"]
    assert mock_accoil.calls()[0]["status"] == 401
    assert mock_accoil.users() == [] and mock_accoil.accounts() == []


async def test_v2_basic_scheme_is_case_insensitive(ingest: Ingest) -> None:
    status, _, _ = await ingest.post(
        "/v2/identify", {"userId": "u"}, headers={"Authorization": f"basic {KEY}"}
    )
    assert status == 202


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        v2_auth(),  # the raw key is v2's form
        {"Authorization": f"Basic {b64(KEY + ':secret')}"},
        {"Authorization": f"Basic {b64(':')}"},
        {"Authorization": f"Basic {b64(KEY)}"},
        {"Authorization": f"Bearer {b64(KEY + ':')}"},
    ],
    ids=["missing", "raw-key", "password", "empty-user", "no-colon", "bearer"],
)
async def test_segment_auth_errors(
    mock_accoil: MockAccoilServer, ingest: Ingest, headers: dict[str, str]
) -> None:
    status, reply, _ = await ingest.post(
        "/segment", {"type": "track", "userId": "u", "event": "E"}, headers=headers
    )
    assert status == 401 and KEY not in reply["error"]
    assert mock_accoil.counts() == []


@pytest.mark.parametrize("api_key", [None, "", 5])
@pytest.mark.parametrize("path", ["/v1/users", "/v1/groups", "/v1/events"])
async def test_v1_auth_errors(
    mock_accoil: MockAccoilServer, ingest: Ingest, path: str, api_key: Any
) -> None:
    body: dict[str, Any] = {"timestamp": MS, "user_id": "u", "group_id": "g", "event": "E"}
    if api_key is not None:
        body["api_key"] = api_key
    # a v2-style header does not stand in for the body key
    status, _, _ = await ingest.post(path, body, headers=v2_auth())
    assert status == 401
    assert mock_accoil.users() == [] and mock_accoil.counts() == []


# -- validation --------------------------------------------------------------------

TS = "2026-11-28T10:00:00.000Z"
BAD_TIMESTAMPS = ["2026-11-28T10:00:00", "2026-11-28", "yesterday", 1764324000, None]


def v2_cases() -> list[tuple[str, dict[str, Any], str]]:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v2/identify", {}, "userId"),
        ("/v2/identify", {"userId": ""}, "userId"),
        ("/v2/identify", {"userId": 5}, "userId"),
        ("/v2/identify", {"userId": None}, "userId"),
        ("/v2/identify", {"userId": "u", "traits": ["a"]}, "traits"),
        ("/v2/identify", {"userId": "u", "traits": None}, "traits"),
        ("/v2/identify", {"userId": "u", "groupId": 7}, "groupId"),
        ("/v2/identify", {"userId": "u", "groupId": None}, "groupId"),
        ("/v2/identify", {"userId": "u", "groupId": ""}, "groupId"),
        ("/v2/group", {}, "groupId"),
        ("/v2/group", {"userId": "u"}, "groupId"),
        ("/v2/group", {"groupId": ""}, "groupId"),
        ("/v2/group", {"groupId": 1}, "groupId"),
        ("/v2/group", {"groupId": "g", "userId": 1}, "userId"),
        ("/v2/group", {"groupId": "g", "traits": "plan"}, "traits"),
        ("/v2/track", {"event": "E"}, "userId"),
        ("/v2/track", {"userId": "", "event": "E"}, "userId"),
        ("/v2/track", {"userId": "u"}, "event"),
        ("/v2/track", {"userId": "u", "event": ""}, "event"),
        ("/v2/track", {"userId": "u", "event": 3}, "event"),
    ]
    ok = {
        "/v2/identify": {"userId": "u"},
        "/v2/group": {"groupId": "g"},
        "/v2/track": {"userId": "u", "event": "E"},
    }
    for path, body in ok.items():
        cases += [(path, {**body, "timestamp": ts}, "timestamp") for ts in BAD_TIMESTAMPS]
    return cases


@pytest.mark.parametrize(("path", "body", "field"), v2_cases())
async def test_v2_validation_names_the_field(
    mock_accoil: MockAccoilServer, ingest: Ingest, path: str, body: dict[str, Any], field: str
) -> None:
    status, reply, _ = await ingest.v2(path, body)
    assert (status, reply["field"]) == (400, field), reply
    assert reply["error"]
    assert mock_accoil.calls()[0]["status"] == 400
    assert mock_accoil.users() == [] and mock_accoil.accounts() == []
    assert mock_accoil.counts() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "type"),
        ({"type": "alias", "userId": "u"}, "type"),
        ({"type": 1, "userId": "u"}, "type"),
        ({"type": "identify"}, "userId"),
        ({"type": "identify", "anonymousId": "a"}, "userId"),
        ({"type": "identify", "userId": "u", "traits": []}, "traits"),
        ({"type": "group", "userId": "u"}, "groupId"),
        ({"type": "group", "groupId": ""}, "groupId"),
        ({"type": "track", "event": "E"}, "userId"),
        ({"type": "track", "userId": "u"}, "event"),
        ({"type": "track", "userId": "u", "event": ""}, "event"),
        ({"type": "page", "userId": "u"}, "name"),
        ({"type": "page", "name": "Home"}, "userId"),
        ({"type": "screen", "userId": "u"}, "name"),
        ({"type": "screen", "userId": "u", "name": ""}, "name"),
        (
            {"type": "track", "userId": "u", "event": "E", "timestamp": "2026-11-28T10:00"},
            "timestamp",
        ),
    ],
)
async def test_segment_validation_names_the_field(
    mock_accoil: MockAccoilServer, ingest: Ingest, body: dict[str, Any], field: str
) -> None:
    status, reply, _ = await ingest.segment(body)
    assert (status, reply["field"]) == (400, field), reply
    assert mock_accoil.counts() == [] and mock_accoil.users() == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/users", {**V1}, "user_id"),
        ("/v1/users", {**V1, "user_id": ""}, "user_id"),
        ("/v1/users", {"api_key": KEY, "user_id": "u"}, "timestamp"),
        ("/v1/users", {**V1, "user_id": "u", "timestamp": 1764324000}, "timestamp"),  # seconds
        ("/v1/users", {**V1, "user_id": "u", "timestamp": TS}, "timestamp"),
        ("/v1/users", {**V1, "user_id": "u", "timestamp": 1.5e12}, "timestamp"),
        ("/v1/users", {**V1, "user_id": "u", "traits": 1}, "traits"),
        ("/v1/users", {**V1, "user_id": "u", "group_id": 1}, "group_id"),
        ("/v1/users", {**V1, "userId": "u"}, "user_id"),  # camelCase is v2's
        ("/v1/groups", {**V1, "user_id": "u"}, "group_id"),
        ("/v1/groups", {**V1, "group_id": "g", "user_id": 5}, "user_id"),
        ("/v1/events", {**V1, "event": "E"}, "user_id"),
        ("/v1/events", {**V1, "user_id": "u"}, "event"),
        ("/v1/events", {**V1, "user_id": "u", "event": ""}, "event"),
    ],
)
async def test_v1_validation_names_the_field(
    mock_accoil: MockAccoilServer, ingest: Ingest, path: str, body: dict[str, Any], field: str
) -> None:
    status, reply, _ = await ingest.post(path, body)
    assert (status, reply["field"]) == (400, field), reply
    assert mock_accoil.counts() == [] and mock_accoil.users() == []


@pytest.mark.parametrize(
    "path",
    ["/v2/identify", "/v2/group", "/v2/track", "/segment", "/v1/users", "/v1/groups", "/v1/events"],
)
@pytest.mark.parametrize("raw", [b"{nope", b"", b"[1, 2]", b'"text"', b"null"])
async def test_body_must_be_a_json_object(
    mock_accoil: MockAccoilServer, ingest: Ingest, path: str, raw: bytes
) -> None:
    headers = segment_auth() if path == "/segment" else v2_auth()
    status, reply, _ = await ingest.post(path, headers=headers, raw=raw)
    assert (status, reply["field"]) == (400, None)
    [call] = mock_accoil.calls()
    assert call["status"] == 400


async def test_journal_keeps_raw_text_of_invalid_json(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    await ingest.post("/v2/track", headers=v2_auth(), raw=b"{nope")
    assert mock_accoil.calls()[0]["body"] == "{nope"


# -- anything else is journaled too ------------------------------------------------


async def test_unknown_path_and_wrong_method_are_journaled(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    status, _, _ = await ingest.post("/v2/page", {"userId": "u"}, headers=v2_auth())
    assert status == 404
    async with ingest.session.get(mock_accoil.url + "/v2/track") as resp:
        assert resp.status == 405
    calls = mock_accoil.calls()
    assert [(c["method"], c["path"], c["status"]) for c in calls] == [
        ("POST", "/v2/page", 404),
        ("GET", "/v2/track", 405),
    ]
    assert calls[0]["body"] == {"userId": "u"}


async def test_oversized_body_is_413_and_journaled(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    big = b'{"userId": "u", "event": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    status, _, _ = await ingest.post("/v2/track", headers=v2_auth(), raw=big)
    assert status == 413
    assert [(c["path"], c["status"]) for c in mock_accoil.calls()] == [("/v2/track", 413)]
    assert mock_accoil.counts() == []
