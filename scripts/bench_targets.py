"""The baselines `bench_ingest.py` measures the gateway against, each run as its own process.

    python scripts/bench_targets.py noop --port 9001
    python scripts/bench_targets.py noop_lean --port 9003
    python scripts/bench_targets.py naive --port 9002 --upstream http://127.0.0.1:8089 --api-key ak

- `noop`: reads the body and answers 200, as the aiohttp app anyone would write does: an
  `Application`, one route per path (`add_post`), no middleware. DESIGN.md section 8's
  ceiling, and the baseline the ingest target (0.4 of it) is judged against.
- `noop_lean`: the same handler, reached as the gateway reaches its ingest handlers
  (`Gateway.dispatch`: straight from aiohttp's server, without the router): a stricter
  ceiling, reported beside the first.
- `naive`: the relay a team writes in an afternoon: parse the batch, POST each event to
  Accoil's v2 API one after the other, answer 200 once all went through (502 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from aiohttp import web

OK = b'{"success":true}'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 500 * 1024 + 1


class Busy:
    requests = 0


BUSY = web.AppKey("busy", Busy)


async def healthz(request: web.Request) -> web.Response:
    # a benchmark waits for 0 here between its warm-up and its measured run: a relay keeps
    # working on requests whose client has gone
    return web.json_response({"in_flight": request.app[BUSY].requests})


def counted(busy: Busy, handler: Handler) -> Handler:
    async def counting(request: web.Request) -> web.StreamResponse:
        busy.requests += 1
        try:
            return await handler(request)
        finally:
            busy.requests -= 1

    return counting


async def noop(request: web.Request) -> web.Response:
    # the body as the gateway reads one that came whole (`gateway.ingest.body`)
    await request.content.read()
    return web.Response(body=OK, content_type="application/json")


def v2_call(msg: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    kind = msg.get("type")
    context = msg.get("context") or {}
    base = {"userId": msg.get("userId"), "timestamp": msg.get("timestamp")}
    if kind == "track":
        body = {**base, "event": msg.get("event")}
        if context.get("groupId"):
            body["groupId"] = context["groupId"]
        return "/v2/track", body
    if kind in ("page", "screen"):
        return "/v2/track", {**base, "event": f"{kind.capitalize()} Viewed {msg.get('name')}"}
    if kind == "identify":
        return "/v2/identify", {**base, "traits": msg.get("traits") or {}}
    if kind == "group":
        return "/v2/group", {**base, "groupId": msg.get("groupId"), "traits": msg.get("traits") or {}}
    return None


class Naive:
    def __init__(self, upstream: str, api_key: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.headers = {"Authorization": f"Basic {api_key}"}
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def batch(self, request: web.Request) -> web.Response:
        assert self.session is not None
        payload = await request.json()
        for msg in payload.get("batch", []):
            call = v2_call(msg)
            if call is None:
                continue
            path, body = call
            async with self.session.post(
                self.upstream + path, json=body, headers=self.headers
            ) as resp:
                await resp.read()
                if resp.status != 202:
                    return web.json_response({"success": False}, status=502)
        return web.Response(body=OK, content_type="application/json")


def app_for(args: argparse.Namespace) -> tuple[web.Application, Handler]:
    """The target's app, and its POST /v1/batch handler."""
    app = web.Application(client_max_size=MAX_BODY)
    busy = app[BUSY] = Busy()
    app.router.add_get("/healthz", healthz)
    if args.kind in ("noop", "noop_lean"):
        batch: Handler = noop
    else:
        relay = Naive(args.upstream, args.api_key)
        app.on_startup.append(relay.start)
        app.on_cleanup.append(relay.stop)
        batch = relay.batch
    batch = counted(busy, batch)
    app.router.add_post("/v1/batch", batch)
    return app, batch


async def serve(app: web.Application, batch: Handler, host: str, port: int, *,
                lean: bool) -> None:
    """Serve `app` until SIGTERM or SIGINT. With `lean`, POST /v1/batch goes as the gateway
    serves its ingest routes (`Gateway.dispatch`: straight to the handler, without aiohttp's
    router), so that the ceiling pays for what the gateway pays for, no more and no less."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    handle = runner.server.request_handler

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST" and request.raw_path == "/v1/batch":
            return await batch(cast(web.Request, request))
        return await handle(request)

    if lean:
        runner.server.request_handler = dispatch
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("noop", "noop_lean", "naive"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--upstream", help="naive: mock_accoil's URL")
    p.add_argument("--api-key", default="ak", help="naive: the Accoil API key")
    args = p.parse_args(argv)
    if args.kind == "naive" and not args.upstream:
        p.error("naive needs --upstream")
    asyncio.run(serve(*app_for(args), args.host, args.port, lean=args.kind == "noop_lean"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
