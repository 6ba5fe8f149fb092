"""The load generators on pre-built bodies: every event of every request has its own
messageId, through wrk's Lua script as through the aiohttp generators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from benchkit.stack import basic
from benchkit.traffic import Traffic
from benchkit.wrk import Bodies, closed_loop, have_wrk, open_loop, run_wrk

AUTH = basic("wk_test")


class Capture:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.requests = 0
        self.auth: set[str | None] = set()

    async def batch(self, request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        self.requests += 1
        self.auth.add(request.headers.get("Authorization"))
        self.ids += [m["messageId"] for m in body["batch"]]
        return web.json_response({"success": True})


@pytest.fixture
async def capture() -> AsyncIterator[tuple[Capture, str]]:
    cap = Capture()
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/v1/batch", cap.batch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield cap, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
def bodies(tmp_path: Path) -> Bodies:
    return Bodies(Traffic(accounts=10, users=100, seed=3), tmp_path / "bodies", count=4, size=20)


def test_templates_become_valid_batches_with_distinct_ids(bodies: Bodies) -> None:
    a = msgspec.json.decode(bodies.body(0, "tokA"))["batch"]
    b = msgspec.json.decode(bodies.body(0, "tokB"))["batch"]
    assert len(a) == 20
    ids = [m["messageId"] for m in a + b]
    assert len(set(ids)) == 40
    assert all(i.endswith("-tokA") for i in ids[:20])
    assert 1500 < bodies.mean_bytes < 6000  # ~200 bytes an event


@pytest.mark.skipif(not have_wrk(), reason="wrk is not installed (scripts/ensure_wrk.sh)")
async def test_wrk_script_gives_every_event_its_own_message_id(
    capture: tuple[Capture, str], bodies: Bodies, tmp_path: Path
) -> None:
    cap, url = capture
    script = tmp_path / "batch.lua"
    script.write_text(bodies.lua(AUTH))
    run = await asyncio.to_thread(run_wrk, url, script, seconds=1, connections=4, threads=2,
                                  nonce="n1", events_per_request=20)
    assert run.generator == "wrk" and run.requests > 10 and run.ok == run.requests
    assert cap.requests >= run.requests  # wrk leaves the last replies of a run uncounted
    assert len(cap.ids) == 20 * cap.requests
    assert len(set(cap.ids)) == len(cap.ids)
    assert cap.auth == {AUTH}
    assert run.events_per_s == pytest.approx(run.ok * 20 / run.seconds)


async def test_aiohttp_closed_loop_gives_every_event_its_own_message_id(
    capture: tuple[Capture, str], bodies: Bodies
) -> None:
    cap, url = capture
    run = await closed_loop(url, bodies, AUTH, seconds=0.5, connections=4, nonce="c")
    assert run.generator == "aiohttp" and run.ok == run.requests == cap.requests > 10
    assert len(set(cap.ids)) == len(cap.ids) == 20 * cap.requests
    assert cap.auth == {AUTH}


async def test_open_loop_sends_every_request_it_schedules(
    capture: tuple[Capture, str], bodies: Bodies
) -> None:
    cap, url = capture
    run = await open_loop(url, bodies, AUTH, rate=100, seconds=1.0, nonce="o")
    assert run.requests == cap.requests == 100
    assert len(set(cap.ids)) == len(cap.ids) == 2000
    assert run.extra["target_rps"] == 100 and set(run.latency) == {"p50", "p95", "p99", "max"}
