"""Run the mock in-process, and talk to any running mock's inspection API.

`MockAccoilServer` serves the app on its own event loop in a background
thread, so it works from sync tests and from async tests alike (it never
touches the caller's loop). `MockAccoilClient` is a small blocking client
for `/_mock/` over urllib; use its `*_async` helpers inside a coroutine so
waiting does not stall the caller's loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from mock_accoil.app import create_app
from mock_accoil.state import MockAccoil

JSONList = list[dict[str, Any]]


class MockAccoilError(Exception):
    """The inspection API refused a request, or a wait timed out."""


class MockAccoilClient:
    """A blocking client for a mock's `/_mock/` inspection and fault API."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, route: str, body: Any = None, /, **query: Any) -> Any:
        params = {k: str(v) for k, v in query.items() if v is not None}
        url = self.url + route + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise MockAccoilError(f"{method} {route}: {exc.code} {exc.read().decode()}") from None

    def calls(
        self,
        *,
        path: str | None = None,
        status: int | None = None,
        api_key: str | None = None,
        since: int | None = None,
    ) -> JSONList:
        """The journal, oldest first: {seq, time, method, path, api_key, body, status, ...}."""
        result: JSONList = self._request(
            "GET", "/_mock/calls", path=path, status=status, api_key=api_key, since=since
        )
        return result

    def users(self, *, api_key: str | None = None, user_id: str | None = None) -> JSONList:
        result: JSONList = self._request("GET", "/_mock/users", api_key=api_key, userId=user_id)
        return result

    def accounts(self, *, api_key: str | None = None, group_id: str | None = None) -> JSONList:
        result: JSONList = self._request(
            "GET", "/_mock/accounts", api_key=api_key, groupId=group_id
        )
        return result

    def counts(
        self,
        *,
        day: str | None = None,
        user_id: str | None = None,
        event: str | None = None,
        api_key: str | None = None,
    ) -> JSONList:
        result: JSONList = self._request(
            "GET", "/_mock/counts", day=day, userId=user_id, event=event, api_key=api_key
        )
        return result

    def count(
        self, user_id: str, event: str, *, day: str | None = None, api_key: str | None = None
    ) -> int:
        """Occurrences of `event` by `user_id`, summed over days and keys unless given."""
        rows = self.counts(day=day, user_id=user_id, event=event, api_key=api_key)
        return sum(int(row["count"]) for row in rows)

    def faults(self) -> JSONList:
        result: JSONList = self._request("GET", "/_mock/faults")
        return result

    def add_fault(
        self,
        status: int | None = None,
        *,
        retry_after: int | None = None,
        count: int | None = None,
        rate: float | None = None,
        path: str | None = None,
        latency: float | None = None,
        drop: bool | None = None,
    ) -> dict[str, Any]:
        """Add a fault (see `mock_accoil.faults.Fault`); returns it with its id."""
        spec = {
            "status": status,
            "retry_after": retry_after,
            "count": count,
            "rate": rate,
            "path": path,
            "latency": latency,
            "drop": drop,
        }
        result: dict[str, Any] = self._request(
            "POST", "/_mock/faults", {k: v for k, v in spec.items() if v is not None}
        )
        return result

    def clear_faults(self) -> None:
        self._request("DELETE", "/_mock/faults")

    def set_capacity(
        self,
        rate: float | None = None,
        *,
        concurrency: int | None = None,
        burst: int | None = None,
        latency: float | None = None,
        retry_after: int | None = None,
    ) -> dict[str, Any]:
        """Replace the capacity (see `mock_accoil.capacity.Capacity`): past `rate` calls a
        second or `concurrency` in flight, calls get 429. Returns the capacity report."""
        spec = {
            "rate": rate,
            "concurrency": concurrency,
            "burst": burst,
            "latency": latency,
            "retry_after": retry_after,
        }
        result: dict[str, Any] = self._request(
            "PUT", "/_mock/capacity", {k: v for k, v in spec.items() if v is not None}
        )
        return result

    def capacity(self) -> dict[str, Any]:
        """{capacity (null when none), in_flight, admitted, refused_rate, refused_concurrency}."""
        result: dict[str, Any] = self._request("GET", "/_mock/capacity")
        return result

    def clear_capacity(self) -> None:
        self._request("DELETE", "/_mock/capacity")

    def reset(self) -> None:
        self._request("POST", "/_mock/reset")

    def wait_calls(
        self,
        n: int,
        *,
        path: str | None = None,
        status: int | None = None,
        within: float = 5.0,
    ) -> JSONList:
        """Block until at least `n` matching calls are journaled (at most `within` s)."""
        deadline = time.monotonic() + within
        while True:
            calls = self.calls(path=path, status=status)
            if len(calls) >= n:
                return calls
            if time.monotonic() > deadline:
                raise MockAccoilError(f"waited {within}s for {n} calls, got {len(calls)}")
            time.sleep(0.01)

    async def wait_calls_async(
        self,
        n: int,
        *,
        path: str | None = None,
        status: int | None = None,
        within: float = 5.0,
    ) -> JSONList:
        """`wait_calls` for coroutines: polls without blocking the running loop."""
        deadline = time.monotonic() + within
        while True:
            calls = await asyncio.to_thread(self.calls, path=path, status=status)
            if len(calls) >= n:
                return calls
            if time.monotonic() > deadline:
                raise MockAccoilError(f"waited {within}s for {n} calls, got {len(calls)}")
            await asyncio.sleep(0.01)


class MockAccoilServer(MockAccoilClient):
    """The mock on its own loop in a daemon thread; `.url` once started, `.state` always.

    Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        state: MockAccoil | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_calls: bool = True,
        timeout: float = 5.0,
    ) -> None:
        super().__init__("", timeout=timeout)
        self.state = state if state is not None else MockAccoil()
        self.host = host
        self.port = port
        self._log_calls = log_calls
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="mock-accoil", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); a thread has nowhere else to put it
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = create_app(self.state, log_calls=self._log_calls)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://{self.host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
