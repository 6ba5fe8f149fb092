"""Ingest's edges: write-key parsing, body limits and gunzip, trait merging in an actor."""

from __future__ import annotations

import base64
import gzip
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Source
from gateway.ingest.auth import HEADERS, Keys, basic_user, names_key
from gateway.ingest.body import BodyError, read_body


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "user"),
    [
        (None, None),
        ("Basic " + b64("wk_1:"), "wk_1"),
        ("basic " + b64("wk_1:ignored"), "wk_1"),
        ("Basic " + b64("wk_1"), "wk_1"),
        ("Bearer wk_1", ""),
        ("Basic !!!", ""),
        ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), ""),
    ],
)
def test_basic_user(header: str | None, user: str | None) -> None:
    assert basic_user(header) == user


def test_keys_find_only_exact_matches() -> None:
    a = Source(write_key="wk_a", accoil_api_key="k1", name="a")
    b = Source(write_key="wk_b", accoil_api_key="k2", name="b")
    keys = Keys([a, b])
    assert keys.find("wk_a") is a and keys.find("wk_b") is b
    assert keys.find("wk_") is None and keys.find("") is None and keys.find(None) is None
    assert keys.find("wk_a ") is None


def test_keys_remember_only_headers_that_named_a_key() -> None:
    a = Source(write_key="wk_a", accoil_api_key="k1", name="a")
    keys = Keys([a])
    good, other = "Basic " + b64("wk_a:"), "Basic " + b64("wk_x:")
    assert keys.known_header(good) is None and keys.known_header(None) is None
    assert keys.by_header(good) is a and keys.known_header(good) is a
    # an unknown key is checked every time, never remembered (a client cannot fill memory)
    assert keys.by_header(other) is None and keys.known_header(other) is None
    assert keys.by_header("Basic !!!") is None and keys.by_header("Digest x") is None
    for i in range(HEADERS + 5):  # past the bound the memory starts again, still exact
        keys.by_header("Basic " + b64(f"wk_a:{i}"))
    assert len(keys._headers) <= HEADERS
    assert keys.by_header(good) is a


@pytest.mark.parametrize(
    ("header", "names"),
    [("Basic abc", True), ("bearer tok", False), ("  Bearer tok", False), ("Digest x", True)],
)
def test_names_key(header: str, names: bool) -> None:
    assert names_key(header) is names


@pytest.fixture
async def echo() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async def handler(request: web.Request) -> web.Response:
        try:
            body = await read_body(request, limit=1000)
        except BodyError as exc:
            return web.Response(status=exc.status, text=exc.reason)
        return web.Response(body=body)

    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


async def test_plain_body_within_limit(echo: TestClient[web.Request, web.Application]) -> None:
    resp = await echo.post("/", data=b"x" * 1000)
    assert resp.status == 200 and await resp.read() == b"x" * 1000


async def test_plain_body_over_limit(echo: TestClient[web.Request, web.Application]) -> None:
    resp = await echo.post("/", data=b"x" * 1001)
    assert resp.status == 413


async def test_chunked_body_over_limit(echo: TestClient[web.Request, web.Application]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 100

    resp = await echo.post("/", data=chunks())
    assert resp.status == 413


async def test_gzip_inflates(echo: TestClient[web.Request, web.Application]) -> None:
    resp = await echo.post("/", data=gzip.compress(b"z" * 900), headers={"Content-Encoding": "gzip"})
    assert resp.status == 200 and await resp.read() == b"z" * 900


async def test_gzip_bomb_stops_at_the_limit(echo: TestClient[web.Request, web.Application]) -> None:
    resp = await echo.post("/", data=gzip.compress(b"0" * 200_000), headers={"Content-Encoding": "gzip"})
    assert resp.status == 413 and "gunzip" in await resp.text()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [(b"not gzip at all", "not valid gzip"), (gzip.compress(b"abc" * 50)[:-12], "truncated")],
)
async def test_bad_gzip_is_400(
    echo: TestClient[web.Request, web.Application], data: bytes, fragment: str
) -> None:
    resp = await echo.post("/", data=data, headers={"Content-Encoding": "gzip"})
    assert resp.status == 400 and fragment in await resp.text()


async def test_unknown_encoding_is_415(echo: TestClient[web.Request, web.Application]) -> None:
    resp = await echo.post("/", data=b"{}", headers={"Content-Encoding": "br"})
    assert resp.status == 415


