"""Runs the real gateway in-process on a free loopback port, for contract tests.

Its pipeline runs as the default does, in a worker process (`pipeline = "process"`), or in
the test's own process (`"inline"`): `tests/contract/conftest.py` runs each test that builds
its settings here in both modes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from gateway.config import Settings, Source
from tests.net import basic as basic

T = TypeVar("T")

WRITE_KEY = "wk_contract_test_0001"
API_KEY = "ak_contract_test_0001"
ADMIN = "admin_contract_token"


class Mode:
    """The pipeline mode `settings_for` gives, and the Redis its gateways share when the
    store is Redis: set per test by the contract conftest."""

    pipeline = "inline"
    redis_url: str | None = None


def settings_for(
    mock_url: str, data_dir: Path, *, sources: list[Source] | None = None, **overrides: Any
) -> Settings:
    if sources is None:
        sources = [Source(write_key=WRITE_KEY, accoil_api_key=API_KEY, base_url=mock_url,
                          name="main")]
    fields: dict[str, Any] = {
        "sources": sources,
        "port": 0,
        "data_dir": str(data_dir),
        "admin_token": ADMIN,
        "flush_interval": 0.05,
        "actor_idle": 0.5,
        "retry_base": 0.01,
        "retry_max": 0.2,
        "circuit_cooldown": 0.2,
        "shutdown_timeout": 5.0,
        "pipeline": Mode.pipeline,
        # the worker at the tests' own CPU priority, not `pipeline_nice`'s 10: on a busy machine
        # a worker at 10 gets a tenth of a fair share of the CPU (RELIABILITY.md, "Tests that
        # the load broke"), and a test's bound on its progress measured the machine
        "pipeline_nice": 0,
    }
    if Mode.redis_url is not None:
        fields.update(store="redis", redis_url=Mode.redis_url, partitions=8)
    fields.update(overrides)
    return Settings(**fields)


@dataclass
class Running:
    gateway: Gateway
    url: str
    http: aiohttp.ClientSession

    async def post(
        self, path: str, payload: Any = None, *, key: str | None = WRITE_KEY, **kw: Any
    ) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = basic(key)
        async with self.http.post(self.url + path, json=payload, headers=headers, **kw) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = await resp.text()
            return resp.status, body

    async def admin(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def idle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 (a polling bound)
        """Wait until everything accepted was applied and forwarded (or dead-lettered)."""
        gw = self.gateway

        async def settled() -> bool:
            counts = await bounded("store.counts()", gw.store.counts(), CALL)
            busy = (await bounded("pipeline.stats()", gw.pipeline.stats(), CALL))["busy"]
            return counts.inbox == 0 and counts.outbox == 0 and not busy

        await eventually(settled, timeout)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    gw = Gateway(settings)
    runner = await bounded("the gateway's start (runner.setup())", gw.runner(), START)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await bounded("site.start()", site.start(), CALL)
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        # a request to a hung gateway fails after REQUEST seconds, not aiohttp's default 300
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST)) as http:
            yield Running(gw, f"http://127.0.0.1:{port}", http)
    finally:
        await bounded("the gateway's stop (runner.cleanup())", runner.cleanup(),
                      settings.shutdown_timeout + STOP)


# seconds a test waits on one call of the gateway before it fails naming the call: tens of
# seconds (far beyond a loaded 2-core machine's worst), well under pytest-timeout's 600
CALL = 30.0
START = 60.0  # a start: the store, the worker process and its first answer
REQUEST = 120.0  # one HTTP request to the gateway, its body sent and its reply read
STOP = 60.0  # a stop, beyond its drain (`shutdown_timeout`): the worker's exit, the store's


async def bounded(what: str, work: Awaitable[T], within: float) -> T:
    """`work`'s result; AssertionError naming `what` if it has not come within `within`
    seconds. It runs as a task of its own and is waited on with `asyncio.wait`, so the
    bound holds even where the work swallows a cancellation (`gateway.tasks`)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=within)
    if task not in done:
        task.cancel()
        raise AssertionError(f"{what} did not return within {within:g} s: hung")
    return task.result()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02  # noqa: ASYNC109
) -> None:
    """Until `check()` is true; AssertionError after `timeout` seconds, also when a call of
    the check itself hangs (its name in the message)."""
    deadline = time.monotonic() + timeout
    name = getattr(check, "__qualname__", repr(check))
    while True:
        left = max(deadline - time.monotonic(), 0.0)
        # a check that hangs fails at the deadline (with a floor, so a check begun just
        # before it can still answer), naming itself
        if await bounded(f"check {name}", check(), max(left, CALL)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition {name} not met within {timeout} s")
        await asyncio.sleep(interval)
