"""Running the gateway until SIGTERM or SIGINT, then draining it."""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
import socket

import structlog
from aiohttp import web

from gateway.app import Gateway, StartupError
from gateway.compiled import built
from gateway.config import Settings

log = structlog.get_logger("gateway.server")

async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    # before anything starts (the data directory's lock, the worker): a busy port is the
    # commonest first-run mistake, and should fail at once
    _check_port(settings.host, settings.port)
    gateway = Gateway(settings)
    runner = await gateway.runner(
        access_log=None, handle_signals=False,
        # aiohttp's own default is an hour; it also bounds how long headers may trickle in
        keepalive_timeout=settings.read_timeout,
    )
    site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(_cannot_listen(settings.host, settings.port, exc)) from None
        # Requests allocate many short-lived objects (decoded messages); collect the young
        # generation less often, and leave what start-up built out of every collection
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        have = built()
        log.info("listening", url=f"http://{settings.host}:{_port(runner, settings.port)}",
                 compiled=[name for name, ok in have.items() if ok],
                 pure=[name for name, ok in have.items() if not ok])
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


def _check_port(host: str, port: int) -> None:
    """Bind and release each address `host:port` resolves to, as the server will bind it."""
    if port == 0:
        return  # any free port: nothing to be busy
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise StartupError(_cannot_listen(host, port, exc)) from None


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    hint = ""
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve {host!r} ({reason})"
    elif exc.errno == errno.EADDRINUSE:
        hint = "; another program (another gateway?) uses it: stop it, or choose --port / GATEWAY_PORT"
    return f"cannot listen on {host}:{port}: {reason}{hint}"
