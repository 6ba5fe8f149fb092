"""Ingest's POSTs skip aiohttp's router (`Gateway.dispatch`); everything else goes through it.

The direct path hangs on `web.Server.request_handler`, which aiohttp does not document: this
test fails if an aiohttp release drops it, rather than ingest slowing down unnoticed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mock_accoil.server import MockAccoilServer
from tests.contract.harness import running, settings_for

TS = "2026-11-20T10:00:00.000Z"


async def test_ingest_posts_skip_the_router_and_the_rest_use_it(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    resolve = web.UrlDispatcher.resolve
    here = threading.get_ident()  # the mock Accoil resolves its own routes on its own thread

    async def counting(self: web.UrlDispatcher, request: web.Request) -> Any:
        if threading.get_ident() == here:
            resolved.append(request.path)
        return await resolve(self, request)

    monkeypatch.setattr(web.UrlDispatcher, "resolve", counting)
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        batch = {"batch": [{"type": "track", "messageId": "d1", "userId": "u1",
                            "event": "Clicked", "timestamp": TS}]}
        for path in ("/v1/batch", "/v1/t", "/b"):
            status, _ = await gw.post(path, batch if path != "/v1/t" else batch["batch"][0])
            assert status == 200, path
        # a query string, and a route that is not ingest's, go through the router
        assert (await gw.post("/v1/batch?x=1", batch))[0] == 200
        assert (await gw.post("/v1/nope", batch))[0] == 404
        await gw.idle()
    assert resolved == ["/v1/batch", "/v1/nope"]
    assert mock_accoil.count("u1", "Clicked") == 1
