"""The gateway assembled: ingest -> store -> router -> actors -> outbox -> forwarders."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from gateway.actors.registry import Actors
from gateway.actors.router import Router
from gateway.admin import Admin
from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.forward.client import AccoilClient
from gateway.forward.forwarder import Forwarder
from gateway.ingest.body import MAX_BODY
from gateway.ingest.routes import Ingest
from gateway.mapping import upstream
from gateway.observability.metrics import Metrics
from gateway.store import SqliteStore, Store

log = structlog.get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HOUSEKEEPING = 30.0  # seconds between prunings of old message ids and ledger rows


class Gateway:
    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.sources = {s.id: s for s in settings.sources}
        self.store: Store = store or SqliteStore(
            Path(settings.data_dir) / "gateway.db", fsync=settings.fsync
        )
        self.metrics = Metrics(self.sources)
        self.backlog = Backlog(settings.max_backlog)
        self.forwarders: dict[str, Forwarder] = {}
        self.actors = Actors(self.store, settings, self.metrics, self.backlog, self._calls_queued)
        self.router = Router(self.store, self.actors, self.sources, self.metrics, self.backlog)
        self.ingest = Ingest(
            settings, self.store, self.router, self.backlog, self.metrics, lambda: self.accepting
        )
        self.accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        self._router_task: asyncio.Task[None] | None = None

    def _calls_queued(self, source_id: str) -> None:
        fwd = self.forwarders.get(source_id)
        if fwd is not None:
            fwd.wake()

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY + 1,
            middlewares=[self._count],
            # ingest gunzips itself, stopping at the size limit (a gzip bomb never inflates)
            handler_args={"auto_decompress": False},
        )
        app.add_routes(self.ingest.routes())
        app.add_routes(Admin(self).routes())
        app.on_startup.append(lambda _: self.start())
        app.on_shutdown.append(lambda _: self._stop_accepting())
        app.on_cleanup.append(lambda _: self.stop())
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            self.metrics.requests.labels(name, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(name, str(resp.status)).inc()
        return resp

    async def start(self) -> None:
        await self.store.open()
        # every inbox row counts as wholly unapplied again: the router replays it from the start
        await self.store.restart_inbox()
        counts = await self.store.counts()
        self.backlog.inbox, self.backlog.outbox = counts.inbox, counts.outbox
        for source in self.settings.sources:
            client = AccoilClient.for_source(source, upstream(source))
            fwd = Forwarder(source, self.store, client, self.settings, self.metrics, self.backlog)
            self.forwarders[source.id] = fwd
            self._tasks.append(asyncio.create_task(fwd.run(), name=f"forward:{source.id}"))
        self._router_task = asyncio.create_task(self.router.run(), name="router")
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self.accepting = True
        log.info(
            "gateway started", sources=list(self.sources), inbox=counts.inbox,
            outbox=counts.outbox, dead_letters=counts.dead_letters,
        )

    async def _stop_accepting(self) -> None:
        self.accepting = False

    async def stop(self) -> None:
        """Drain: route the inbox, flush actors, forward what the timeout allows, keep the rest."""
        self.accepting = False
        deadline = time.monotonic() + self.settings.shutdown_timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self._router_task is not None:
            self.router.stop()
            try:
                async with asyncio.timeout(left()):
                    await self._router_task
            except TimeoutError:
                log.warning("shutdown: inbox not fully routed; the rest waits in the store")
            self._router_task = None
        flushed = await self.actors.stop(max(left(), 1.0))
        if not flushed:
            log.warning("shutdown: some actors did not flush; their messages stay in the inbox")
        for fwd in self.forwarders.values():
            await fwd.drain(left())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for fwd in self.forwarders.values():
            await fwd.stop()
        counts = await self.store.counts()
        await self.store.close()
        log.info(
            "gateway stopped", inbox=counts.inbox, outbox=counts.outbox,
            dead_letters=counts.dead_letters,
        )

    async def replay(self, ids: list[int] | None, source: str | None) -> int:
        n = await self.store.replay(ids, source, time.time())
        counts = await self.store.counts()
        self.backlog.inbox, self.backlog.outbox = counts.inbox, counts.outbox
        self.router.wake()
        for fwd in self.forwarders.values():
            fwd.wake()
        return n

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            try:
                await self.store.prune(time.time() - self.settings.dedupe_window)
            except Exception:
                log.exception("housekeeping failed")


def create_app(settings: Settings) -> web.Application:
    return Gateway(settings).app()
