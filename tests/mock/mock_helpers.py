"""Shared helpers of the mock_accoil tests (a unique module name: tests/ has no packages)."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

KEY = "test-key-1"
OTHER_KEY = "test-key-2"


def v2_auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Basic {key}"}


def segment_auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


class Ingest:
    """Posts to a running mock and returns (status, json body, headers)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def post(
        self,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else aiohttp.JsonPayload(body)
        async with self.session.post(self.url + path, data=data, headers=headers) as resp:
            payload = await resp.json(content_type=None)
            return resp.status, payload, dict(resp.headers)

    async def v2(self, path: str, body: Any, key: str = KEY) -> tuple[int, Any, dict[str, str]]:
        return await self.post(path, body, headers=v2_auth(key))

    async def segment(self, body: Any, key: str = KEY) -> tuple[int, Any, dict[str, str]]:
        return await self.post("/segment", body, headers=segment_auth(key))
