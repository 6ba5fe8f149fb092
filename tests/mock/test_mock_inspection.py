"""The /_mock/ inspection API and the OpenAPI document."""

from __future__ import annotations

import json

from aiohttp import web

from mock_accoil.app import create_app, openapi_document
from mock_accoil.server import MockAccoilServer
from tests.mock.mock_helpers import KEY, OTHER_KEY, Ingest


async def seed(ingest: Ingest) -> None:
    await ingest.v2("/v2/identify", {"userId": "u1", "traits": {"a": 1}, "groupId": "g1"})
    await ingest.v2("/v2/identify", {"userId": "u2"}, key=OTHER_KEY)
    await ingest.v2("/v2/group", {"groupId": "g2", "traits": {"plan": "x"}}, key=OTHER_KEY)
    await ingest.v2(
        "/v2/track", {"userId": "u1", "event": "A", "timestamp": "2026-11-27T10:00:00Z"}
    )
    await ingest.v2(
        "/v2/track", {"userId": "u1", "event": "A", "timestamp": "2026-11-28T10:00:00Z"}
    )
    await ingest.v2(
        "/v2/track", {"userId": "u1", "event": "B", "timestamp": "2026-11-28T11:00:00Z"}
    )
    await ingest.v2(
        "/v2/track", {"userId": "u2", "event": "A", "timestamp": "2026-11-28T11:00:00Z"}
    )
    await ingest.v2("/v2/track", {"userId": "u2"})  # 400


async def test_calls_filters(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    await seed(ingest)
    calls = mock_accoil.calls()
    assert [c["seq"] for c in calls] == list(range(1, 9))
    assert set(calls[0]) >= {"seq", "time", "method", "path", "api_key", "body", "status"}
    assert calls[0]["time"].endswith("Z")
    assert len(mock_accoil.calls(path="/v2/track")) == 5
    assert [c["seq"] for c in mock_accoil.calls(status=400)] == [8]
    assert [c["seq"] for c in mock_accoil.calls(api_key=OTHER_KEY)] == [2, 3]
    assert [c["seq"] for c in mock_accoil.calls(since=6)] == [7, 8]
    assert [c["seq"] for c in mock_accoil.calls(path="/v2/track", status=202, since=5)] == [6, 7]


async def test_users_accounts_counts_filters(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    await seed(ingest)
    assert [u["userId"] for u in mock_accoil.users()] == ["u1", "u2"]
    assert mock_accoil.users(api_key=OTHER_KEY) == [
        {"api_key": OTHER_KEY, "userId": "u2", "traits": {}}
    ]
    assert mock_accoil.users(user_id="u1")[0]["traits"] == {"a": 1}
    assert [a["groupId"] for a in mock_accoil.accounts()] == ["g1", "g2"]
    assert mock_accoil.accounts(api_key=KEY)[0]["members"] == ["u1"]
    assert mock_accoil.accounts(group_id="g2")[0]["traits"] == {"plan": "x"}
    assert len(mock_accoil.counts()) == 4
    assert mock_accoil.counts(day="2026-11-28", user_id="u1", event="A") == [
        {"api_key": KEY, "day": "2026-11-28", "userId": "u1", "event": "A", "count": 1}
    ]
    assert [c["userId"] for c in mock_accoil.counts(event="A", day="2026-11-28")] == ["u1", "u2"]
    assert mock_accoil.counts(api_key=OTHER_KEY) == []
    assert mock_accoil.count("u1", "A") == 2


async def test_integer_filters_must_be_integers(ingest: Ingest) -> None:
    for query in ("status=abc", "since=1.5"):
        async with ingest.session.get(f"{ingest.url}/_mock/calls?{query}") as resp:
            body = await resp.json()
            assert resp.status == 400 and body["field"] == query.split("=")[0]


async def test_reset_over_http(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    await seed(ingest)
    mock_accoil.add_fault(503)
    status, reply, _ = await ingest.post("/_mock/reset")
    assert (status, reply) == (200, {"success": True})
    assert mock_accoil.calls() == [] and mock_accoil.users() == []
    assert mock_accoil.accounts() == [] and mock_accoil.counts() == []
    assert mock_accoil.faults() == []
    assert (await ingest.v2("/v2/track", {"userId": "u", "event": "E"}))[0] == 202


async def test_unknown_mock_path_is_404_json_and_not_journaled(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    async with ingest.session.get(ingest.url + "/_mock/nope") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    assert mock_accoil.calls() == []


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        assert path, route
        if route.method != "HEAD":  # aiohttp adds HEAD to every GET
            routes.add((route.method, path))
    return routes


def test_openapi_documents_exactly_the_served_routes() -> None:
    doc = json.loads(openapi_document())
    assert doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert documented == app_routes(create_app(log_calls=False))


def test_openapi_references_resolve() -> None:
    doc = json.loads(openapi_document())
    text = json.dumps(doc)
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs == set(doc["components"]["schemas"])  # every ref resolves, no schema unused


async def test_openapi_is_served(ingest: Ingest) -> None:
    async with ingest.session.get(ingest.url + "/_mock/openapi.json") as resp:
        assert resp.status == 200
        assert await resp.json() == json.loads(openapi_document())


async def test_journal_lists_the_undocumented_fields_of_each_dialect(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    ts = "2026-11-28T10:00:00Z"
    await ingest.v2("/v2/track", {"userId": "u1", "event": "A", "timestamp": ts})
    await ingest.v2(
        "/v2/track", {"userId": "u1", "event": "A", "groupId": "g1", "properties": {"x": 1}}
    )
    await ingest.v2("/v2/identify", {"userId": "u1", "groupId": "g1", "context": {}})
    await ingest.v2("/v2/group", {"groupId": "g1", "userId": "u1", "event": "E"})
    await ingest.segment({"type": "page", "userId": "u1", "name": "Home", "event": "x"})
    await ingest.segment({"type": "identify", "userId": "u1", "traits": {}, "anonymousId": "a"})
    await ingest.post(
        "/v1/events",
        {"api_key": KEY, "user_id": "u1", "event": "E", "timestamp": 1764324000000, "ip": "1"},
    )
    await ingest.v2("/v2/track", {"event": "E", "groupId": "g1"})  # 400, still listed
    listed = [(c["path"], c["status"], c["unknown_fields"]) for c in mock_accoil.calls()]
    assert listed == [
        ("/v2/track", 202, []),
        ("/v2/track", 202, ["groupId", "properties"]),
        ("/v2/identify", 202, ["context"]),
        ("/v2/group", 202, ["event"]),
        ("/segment", 202, ["event"]),
        ("/segment", 202, []),
        ("/v1/events", 202, ["ip"]),
        ("/v2/track", 400, ["groupId"]),
    ]
    # the in-process state reports the same
    assert [c.unknown_fields for c in mock_accoil.state.calls(path="/v1/events")] == [["ip"]]
