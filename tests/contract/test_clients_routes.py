"""The routes, auth and replies every Segment client needs (DESIGN 2), in-process.

The request shapes are those of the real SDKs: analytics.js (`/v1/t|i|p|g|a|s` with
`text/plain` and the write key in the body; `/b` in batching mode), the mobile SDKs
(`/b` with a Basic header), analytics-java (`/v1/import/`, trailing slash) and SDKs in
OAuth mode (a Bearer token beside `writeKey` in the body). The subprocess variant is in
tests/contract/test_process.py; the real SDKs themselves run in tests/browser.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from mock_accoil.server import MockAccoilServer
from tests.contract.harness import WRITE_KEY, running, settings_for

TS = "2026-11-20T10:00:00.000Z"
PLAIN = {"Content-Type": "text/plain;charset=UTF-8"}


def msg(type: str, mid: str, **fields: Any) -> dict[str, Any]:
    return {"type": type, "messageId": mid, "userId": "u1", "timestamp": TS, **fields}


async def test_analytics_js_single_routes_with_text_plain_and_body_key(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    calls = {
        "/v1/i": msg("identify", "j1", traits={"email": "a@acme.io"}),
        "/v1/g": msg("group", "j2", groupId="acme", traits={"name": "Acme"}),
        "/v1/t": msg("track", "j3", event="Clicked"),
        "/v1/p": msg("page", "j4", name="Home"),
        "/v1/s": msg("screen", "j5", name="Settings"),
        "/v1/a": msg("alias", "j6", previousId="anon"),
        # the trailing slash works on every route
        "/v1/t/": msg("track", "j7", event="Clicked"),
    }
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        for path, body in calls.items():
            status, reply = await gw.post(
                path, key=None, data=json.dumps({**body, "writeKey": WRITE_KEY}), headers=PLAIN
            )
            assert (status, reply) == (200, {"success": True}), path
        await gw.idle()
    assert mock_accoil.count("u1", "Clicked") == 2
    assert mock_accoil.count("u1", "Page Viewed Home") == 1
    assert mock_accoil.count("u1", "Screen Viewed Settings") == 1
    assert mock_accoil.users()[0]["traits"] == {"email": "a@acme.io"}
    assert mock_accoil.accounts()[0]["members"] == ["u1"]


@pytest.mark.parametrize("path", ["/v1/b", "/b", "/v1/b/", "/b/", "/v1/import/", "/v1/batch/"])
async def test_batch_routes_as_mobile_and_java_sdks_send_them(
    mock_accoil: MockAccoilServer, tmp_path: Path, path: str
) -> None:
    # analytics-swift/kotlin: Basic header, {"batch": [...], "sentAt": ...}, messages carrying
    # originalTimestamp; analytics-java: the same to /v1/import/ (gzip aside)
    body = {
        "batch": [
            {"type": "track", "messageId": "b1", "userId": "u1", "event": "Opened",
             "originalTimestamp": TS, "context": {"library": {"name": "analytics-kotlin"}}},
            {"type": "screen", "messageId": "b2", "userId": "u1", "name": "Home",
             "originalTimestamp": TS},
        ],
        "sentAt": TS,
    }
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert await gw.post(path, body) == (200, {"success": True})
        await gw.idle()
    assert mock_accoil.count("u1", "Opened") == 1
    assert mock_accoil.count("u1", "Screen Viewed Home") == 1


async def test_analytics_java_gzipped_import_with_a_trailing_slash(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # analytics-java: gzip, Basic auth, a batch with its library context and a sequence number
    body = {
        "batch": [{"type": "identify", "messageId": "jv1", "userId": "u1", "timestamp": TS,
                   "traits": {"created_at": "2024-01-15T10:00:00Z"}},
                  {"type": "track", "messageId": "jv2", "userId": "u1", "event": "Synced",
                   "timestamp": TS}],
        "sentAt": TS,
        "context": {"library": {"name": "analytics-java", "version": "3.5.1"}},
        "sequence": 1,
    }
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json; charset=utf-8",
               "User-Agent": "analytics-java/3.5.1"}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        status, reply = await gw.post("/v1/import/", data=gzip.compress(json.dumps(body).encode()),
                                      headers=headers)
        assert (status, reply) == (200, {"success": True})
        await gw.idle()
    assert mock_accoil.count("u1", "Synced") == 1
    assert mock_accoil.users()[0]["traits"] == {"created_at": "2024-01-15T10:00:00.000Z"}


async def test_batching_mode_of_analytics_js(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # analytics.js batching: text/plain, writeKey at the top and in each message
    body = {"batch": [{**msg("track", "x1", event="Clicked"), "writeKey": WRITE_KEY}],
            "sentAt": TS, "writeKey": WRITE_KEY}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        status, reply = await gw.post("/b", key=None, data=json.dumps(body), headers=PLAIN)
        assert (status, reply) == (200, {"success": True})
        await gw.idle()
    assert mock_accoil.count("u1", "Clicked") == 1


async def test_preflight_and_cors_on_every_route(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-retry-count",
    }
    paths = ["/v1/batch", "/v1/import/", "/v1/b", "/b/", "/v1/t", "/v1/p/", "/v1/track/"]
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        for path in paths:
            async with gw.http.options(gw.url + path, headers=preflight) as resp:
                assert resp.status == 204, path
                allowed = resp.headers["Access-Control-Allow-Headers"].lower()
                for header in ("authorization", "content-type", "content-encoding", "x-retry-count"):
                    assert header in allowed
                assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_oauth_mode_bearer_beside_body_key(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    bearer = {"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.oauth.token"}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        body = {"batch": [msg("track", "o1", event="Clicked")], "writeKey": WRITE_KEY}
        assert await gw.post("/v1/batch", body, key=None, headers=bearer) == (200, {"success": True})
        single = {**msg("track", "o2", event="Clicked"), "writeKey": WRITE_KEY}
        assert await gw.post("/v1/t", single, key=None, headers=bearer) == (200, {"success": True})
        # the Bearer token is not a write key: without writeKey in the body it is refused
        status, reply = await gw.post("/v1/batch", {"batch": [msg("track", "o3", event="Clicked")]},
                                      key=None, headers={"Authorization": "Bearer " + WRITE_KEY})
        assert status == 401 and reply["code"] == "unauthorized" and WRITE_KEY not in str(reply)
        await gw.idle()
    assert mock_accoil.count("u1", "Clicked") == 2


async def test_basic_header_and_body_key_must_agree(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        same = {"batch": [msg("track", "k1", event="Clicked")], "writeKey": WRITE_KEY}
        assert await gw.post("/v1/batch", same) == (200, {"success": True})
        other = {"batch": [msg("track", "k2", event="Clicked")], "writeKey": "wk_someone_else"}
        status, reply = await gw.post("/v1/batch", other)
        assert status == 401 and reply["code"] == "unauthorized"
        assert "different write keys" in reply["message"]
        assert "wk_someone_else" not in str(reply) and WRITE_KEY not in str(reply)
        single = {**msg("track", "k3", event="Clicked"), "writeKey": "wk_someone_else"}
        assert (await gw.post("/v1/t", single))[0] == 401
        await gw.idle()
    assert mock_accoil.count("u1", "Clicked") == 1


async def test_every_error_reply_has_segments_code_and_message(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        cases = [
            (await gw.post("/v1/batch", {"batch": []}, key="wk_unknown"), 401, "unauthorized"),
            (await gw.post("/v1/batch", data=b"{nope"), 400, "invalid_request"),
            (await gw.post("/v1/t", {"userId": "u1"}), 400, "invalid_request"),
            (await gw.post("/b", {"batch": [msg("track", "p", event="E",
                                                 properties={"pad": "x" * 600_000})]}),
             413, "payload_too_large"),
            (await gw.post("/v1/batch", data=b"{}", headers={"Content-Encoding": "br"}),
             415, "unsupported_encoding"),
        ]
        for (status, reply), want_status, want_code in cases:
            assert status == want_status, reply
            assert reply["code"] == want_code and reply["message"] == reply["error"] != ""
            assert reply["success"] is False



async def test_wrong_paths_and_methods_get_json_errors(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        async with gw.http.get(gw.url + "/v1/batch") as resp:
            assert resp.status == 405 and "POST" in resp.headers["Allow"]
            reply = await resp.json()
            assert (reply["code"], reply["message"]) == ("method_not_allowed", "method not allowed")
        status, reply = await gw.post("/v2/batch", {"batch": []})
        assert status == 404 and reply["code"] == "not_found" and reply["success"] is False


async def test_an_expectation_other_than_100_continue_gets_a_json_417(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # aiohttp's router would answer a bare text 417 that no client could read as an error
    good = {"batch": [msg("track", "x1", event="Expected")]}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        for path in ("/v1/batch", "/v1/t", "/v1/batch?via=router"):
            status, reply = await gw.post(path, good, headers={"Expect": "WH6"})
            assert status == 417, reply
            assert reply["code"] == "expectation_failed" and reply["success"] is False
            assert "100-continue" in reply["message"]
        async with gw.http.get(gw.url + "/healthz", headers={"Expect": "x"}) as resp:
            assert resp.status == 417 and (await resp.json())["code"] == "expectation_failed"
        # what was refused was not stored; the same batch with a real expectation is
        assert await gw.post("/v1/batch", good, headers={"Expect": "100-Continue"}) == (
            200, {"success": True})
        await gw.idle()
    assert mock_accoil.count("u1", "Expected") == 1


async def test_the_direct_ingest_path_and_the_router_answer_alike(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # ingest's POSTs skip aiohttp's router (`Gateway.dispatch`); a query string, an escaped
    # path or `Expect: 100-continue` go through it: the same replies, CORS and counts
    good = {"batch": [msg("track", "d1", event="Direct")]}
    bad = {"batch": [msg("track", "d2", event="")]}
    cors = {"Origin": "https://app.example"}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        replies = []
        for path, extra in [("/v1/batch", {}), ("/v1/batch?via=router", {}),
                            ("/v1/%62atch", {}), ("/v1/batch", {"Expect": "100-continue"})]:
            for body in (good, bad):
                status, reply = await gw.post(path, body, headers={**cors, **extra})
                replies.append((status, reply))
            async with gw.http.post(gw.url + path, json=good, headers={**cors, **extra}) as resp:
                assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "*"
                assert (await resp.json())["code"] == "unauthorized"
        assert replies[0] == (200, {"success": True})
        assert replies[1][0] == 200 and replies[1][1]["rejected"][0]["messageId"] == "d2"
        assert replies == replies[:2] * 4
        async with gw.http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
        await gw.idle()
    counted = sorted(line for line in text.splitlines()
                     if line.startswith('accoil_gateway_http_requests_total{route="/v1/batch"'))
    assert counted == ['accoil_gateway_http_requests_total{route="/v1/batch",status="200"} 8.0',
                       'accoil_gateway_http_requests_total{route="/v1/batch",status="401"} 4.0']
    assert mock_accoil.count("u1", "Direct") == 1  # one messageId, sent four times
