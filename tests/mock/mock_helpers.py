"""Shared helpers of the mock_accoil tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp

from tests.net import basic, free_port

KEY = "test-key-1"
OTHER_KEY = "test-key-2"


def v2_auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Basic {key}"}


def segment_auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": basic(key)}


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


def request(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Process:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mock_accoil", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                request(self.url + "/_mock/calls")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(signal.SIGKILL)
                    raise RuntimeError("mock-accoil did not start") from None
                time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err
