from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aioresponses import aioresponses
from yarl import URL

from gateway.config import Source
from gateway.forward import AccoilClient, Delivered, Reject, Retry, parse_retry_after
from gateway.forward.outcome import BODY_LIMIT, TRUNCATED
from gateway.mapping import Upstream
from gateway.observability.redaction import MASK
from tests.net import basic, free_port

BASE = "https://in.accoil.test"
KEY = "live_Secret123key"
AUTH = f"Basic {KEY}"
URL_TRACK = f"{BASE}/v2/track"
BODY = {"userId": "u1", "event": "Signed Up", "timestamp": "2024-05-01T00:00:00Z"}


def up(base_url: str, authorization: str, api_key: str = KEY) -> Upstream:
    return Upstream(base_url=base_url, authorization=authorization, api_key=api_key)


@pytest.fixture
async def client() -> AsyncIterator[AccoilClient]:
    async with AccoilClient(up(BASE, AUTH), timeout=5.0, max_concurrency=4) as c:
        yield c


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 does not pass the `stream_writer` that aiohttp 3.14's
    ClientResponse requires (pnuckowski/aioresponses#289); give it a finished one."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


def reply(m: aioresponses, url: str, **kwargs: Any) -> None:
    m.post(url, response_class=_Response, **kwargs)


def sent(m: aioresponses, url: str = URL_TRACK) -> list[Any]:
    return list(m.requests[("POST", URL(url))])


async def test_202_is_delivered_with_auth_and_json(client: AccoilClient) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=202, body="")
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Delivered)
    assert out.status == 202
    assert out.latency >= 0
    [call] = sent(m)
    assert call.kwargs["headers"]["Authorization"] == AUTH
    assert call.kwargs["headers"]["Content-Type"] == "application/json"
    assert msgspec.json.decode(call.kwargs["data"]) == BODY
    assert call.kwargs["allow_redirects"] is False


async def test_body_encoding_unicode_and_nesting(client: AccoilClient) -> None:
    body = {"userId": "ü-ß-日本", "traits": {"n": 1.5, "ok": True, "none": None, "l": [1, "a"]}}
    with aioresponses() as m:
        reply(m, f"{BASE}/v2/identify", status=202)
        out = await client.post("/v2/identify", body)
    assert isinstance(out, Delivered)
    data = sent(m, f"{BASE}/v2/identify")[0].kwargs["data"]
    assert isinstance(data, bytes)
    assert "ü-ß-日本".encode() in data  # UTF-8, not \u escapes
    assert msgspec.json.decode(data) == body


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_delivered(client: AccoilClient, status: int) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=status)
        out = await client.post("/v2/track", BODY)
    assert out == Delivered(status, out.latency)


async def test_429_with_retry_after_seconds(client: AccoilClient) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=429, headers={"Retry-After": "7"})
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Retry)
    assert (out.reason, out.status, out.retry_after) == ("rate_limited", 429, 7.0)


async def test_429_with_retry_after_http_date(client: AccoilClient) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    with aioresponses() as m:
        reply(m, URL_TRACK, status=429, headers={"Retry-After": when})
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Retry)
    assert out.retry_after is not None
    assert 110 <= out.retry_after <= 121


async def test_429_without_retry_after(client: AccoilClient) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=429)
        out = await client.post("/v2/track", BODY)
    assert out == Retry("rate_limited", 429, None, out.latency)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_retry(client: AccoilClient, status: int) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=status, headers={"Retry-After": "3"}, body="oops")
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Retry)
    assert (out.reason, out.status, out.retry_after) == ("server_error", status, 3.0)


async def test_408_is_retry(client: AccoilClient) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=408)
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Retry)
    assert (out.reason, out.status) == ("timeout", 408)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_other_4xx_is_reject_with_body(client: AccoilClient, status: int) -> None:
    text = '{"error": "userId is required"}'
    with aioresponses() as m:
        reply(m, URL_TRACK, status=status, body=text)
        out = await client.post("/v2/track", BODY)
    assert out == Reject(status, text, out.latency)


async def test_redirect_is_not_followed_but_rejected(client: AccoilClient) -> None:
    with aioresponses() as m:
        reply(m, URL_TRACK, status=301, headers={"Location": "https://elsewhere.test/"})
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Reject)
    assert out.status == 301
    assert len(sent(m)) == 1


async def test_reject_body_redacts_echoed_key(client: AccoilClient) -> None:
    text = (
        f'{{"error": "bad key", "headers": {{"authorization": "{AUTH}"}}, "key": "{KEY.upper()}"}}'
    )
    with aioresponses() as m:
        reply(m, URL_TRACK, status=401, body=text)
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Reject)
    assert KEY.lower() not in out.body.lower()
    assert out.body.count(MASK) == 2
    assert '"error": "bad key"' in out.body


async def test_reject_body_redacts_segment_dialect_key() -> None:
    key = "seg_Key0987654321"
    auth = basic(key)
    async with AccoilClient(up(BASE, auth, key)) as c:
        with aioresponses() as m:
            reply(m, f"{BASE}/segment", status=400, body=f"invalid api key {key} ({auth})")
            out = await c.post("/segment", BODY)
        assert sent(m, f"{BASE}/segment")[0].kwargs["headers"]["Authorization"] == auth
    assert isinstance(out, Reject)
    assert key not in out.body
    assert auth.split()[1] not in out.body
    assert out.body.startswith("invalid api key " + MASK)


async def test_reject_body_truncated(client: AccoilClient) -> None:
    # A key sitting right across the clip point must not leak in part either.
    text = "x" * (BODY_LIMIT - 5) + KEY + "y" * 20_000
    with aioresponses() as m:
        reply(m, URL_TRACK, status=413, body=text)
        out = await client.post("/v2/track", BODY)
    assert isinstance(out, Reject)
    assert out.body == ("x" * (BODY_LIMIT - 5) + MASK + "y" * 20_000)[:BODY_LIMIT] + TRUNCATED


async def test_timeout_is_retry(client: AccoilClient) -> None:
    with aioresponses() as m:
        m.post(URL_TRACK, exception=TimeoutError())
        out = await client.post("/v2/track", BODY)
    assert out == Retry("timeout", None, None, out.latency)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (aiohttp.ClientConnectionError("refused"), "connection"),
        (aiohttp.ClientOSError(104, "reset"), "connection"),
        (ConnectionResetError(), "connection"),
        (aiohttp.ServerDisconnectedError(), "disconnected"),
        (aiohttp.ClientPayloadError("cut"), "disconnected"),
        (aiohttp.ServerTimeoutError("slow"), "timeout"),
        (aiohttp.ClientResponseError(None, (), status=0), "client_error"),  # type: ignore[arg-type]
    ],
)
async def test_network_errors_are_retry(client: AccoilClient, exc: Exception, reason: str) -> None:
    with aioresponses() as m:
        m.post(URL_TRACK, exception=exc)
        out = await client.post("/v2/track", BODY)
    assert out == Retry(reason, None, None, out.latency)


async def test_base_url_trailing_slash_and_session_reuse() -> None:
    async with AccoilClient(up(BASE + "/", AUTH)) as c:
        with aioresponses() as m:
            reply(m, URL_TRACK, status=202, repeat=True)
            assert isinstance(await c.post("/v2/track", BODY), Delivered)
            first = c._session
            assert isinstance(await c.post("/v2/track", BODY), Delivered)
            assert c._session is first
        assert len(sent(m)) == 2
        session = c._session
    assert session is not None and session.closed


async def test_post_after_close_is_retry_not_a_new_session() -> None:
    c = AccoilClient(up(BASE, AUTH))
    await c.close()
    out = await c.post("/v2/track", BODY)
    assert isinstance(out, Retry) and out.reason == "closed"
    assert c._session is None


def test_for_source_and_repr_hide_key() -> None:
    src = Source(write_key="wk", accoil_api_key=KEY, timeout=3.0, max_concurrency=2)
    c = AccoilClient.for_source(src)
    assert c._timeout.total == 3.0
    assert c._max_concurrency == 2
    assert c._headers["Authorization"] == AUTH  # the v2 dialect's header
    assert KEY not in repr(c)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", 60.0),
        ("Wed, 21 Oct 2015 07:20:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:27:00 GMT").timestamp()
    assert parse_retry_after(value, now=now) == expected


# --- real sockets --------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def ok(request: web.Request) -> web.Response:
        assert request.transport is not None
        seen.append(
            {
                "auth": request.headers["Authorization"],
                "type": request.content_type,
                "body": msgspec.json.decode(await request.read()),
                "peer": request.transport.get_extra_info("peername"),
            }
        )
        return web.json_response({"ok": True}, status=202)

    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "9"}, text="busy")

    async def bad(request: web.Request) -> web.Response:
        return web.Response(status=400, text=f"bad request from {request.headers['Authorization']}")

    async def drop(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response(status=202)

    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=413, text="e" * 300_000)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/v2/track", ok)
    app.router.add_post("/busy", busy)
    app.router.add_post("/bad", bad)
    app.router.add_post("/drop", drop)
    app.router.add_post("/slow", slow)
    app.router.add_post("/huge", huge)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", seen
    finally:
        await runner.cleanup()


async def test_real_server_classification(server: tuple[str, list[dict[str, Any]]]) -> None:
    base, seen = server
    async with AccoilClient(up(base, AUTH), timeout=0.3, max_concurrency=2) as c:
        assert isinstance(await c.post("/v2/track", BODY), Delivered)
        assert isinstance(await c.post("/v2/track", BODY), Delivered)
        busy = await c.post("/busy", BODY)
        bad = await c.post("/bad", BODY)
        dropped = await c.post("/drop", BODY)
        slow = await c.post("/slow", BODY)
        missing = await c.post("/nope", BODY)
        huge = await c.post("/huge", BODY)
        after = await c.post("/v2/track", BODY)

    first, second, third = seen
    assert first["auth"] == AUTH
    assert first["type"] == "application/json"
    assert first["body"] == BODY
    assert first["peer"] == second["peer"]  # keep-alive: the second call reused the connection
    assert third["body"] == BODY
    assert busy == Retry("server_error", 503, 9.0, busy.latency)
    assert bad == Reject(400, f"bad request from Basic {MASK}", bad.latency)  # the echoed header
    assert isinstance(dropped, Retry) and dropped.status is None
    assert dropped.reason in {"disconnected", "connection"}
    assert slow == Retry("timeout", None, None, slow.latency)
    assert 0.25 <= slow.latency < 1.5
    assert isinstance(missing, Reject) and missing.status == 404
    assert huge == Reject(413, "e" * BODY_LIMIT + TRUNCATED, huge.latency)
    assert isinstance(after, Delivered)  # a dropped connection leaves the client usable


async def test_real_connection_refused() -> None:
    port = free_port()  # bound, then closed: nothing listens on it
    async with AccoilClient(up(f"http://127.0.0.1:{port}", AUTH), timeout=2.0) as c:
        out = await c.post("/v2/track", BODY)
    assert out == Retry("connection", None, None, out.latency)
