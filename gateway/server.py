"""Running the gateway until SIGTERM or SIGINT, then draining it."""

from __future__ import annotations

import asyncio
import gc
import signal

import structlog
from aiohttp import web

from gateway.app import Gateway
from gateway.config import Settings

log = structlog.get_logger("gateway.server")


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    gateway = Gateway(settings)
    runner = web.AppRunner(
        gateway.app(), access_log=None, handle_signals=False,
        # aiohttp's own default is an hour; it also bounds how long headers may trickle in
        keepalive_timeout=settings.read_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await site.start()
        # Requests allocate many short-lived objects (decoded messages); collect the young
        # generation less often, and leave what start-up built out of every collection
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        log.info("listening", url=f"http://{settings.host}:{_port(runner, settings.port)}")
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping: no longer accepting, draining")
        gateway.accepting = False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def _port(runner: web.AppRunner, default: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return default
