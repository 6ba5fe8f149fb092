"""The gateway assembled: ingest -> store -> pipeline (router -> actors -> outbox -> forwarders).

This process serves HTTP: ingest and the operator routes. The pipeline runs beside it
(`pipeline = "inline"`) or in a worker process (`"process"`, see `gateway.worker`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import structlog
from aiohttp import web

from gateway.actors.dispatcher import Dispatcher
from gateway.admin import Admin
from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.disk import Disk
from gateway.forward.forwarder import Forwarder
from gateway.ingest.body import MAX_BODY
from gateway.ingest.routes import UNROUTED, Ingest, routing_error, unmet_expectation
from gateway.observability.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store import SqliteStore, Store
from gateway.store.redis.metrics import RedisMetrics
from gateway.store.redis.store import RedisStore
from gateway.worker import RemotePipeline

log = structlog.get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]  # aiohttp's server's handler
LOCK_WAIT = 30.0  # seconds a start waits for an earlier gateway to leave the data directory


class StartupError(Exception):
    """The gateway cannot start for a reason the operator can fix (a busy port, a data
    directory it cannot create or that another gateway holds): one line says which."""


class Gateway:
    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.sources = {s.id: s for s in settings.sources}
        data = Path(settings.data_dir)
        _make_dir(data)  # the backlog file below lives in it, on a first run too
        remote = settings.pipeline == "process" and store is None
        self.metrics = Metrics(self.sources)
        self.store: Store = store or _store(settings, self.metrics, apply=not remote)
        self.disk = Disk(data, settings.disk_reserve, owner=True, on_change=self.metrics.disk_full.set)
        self._data = data
        self._lock_fd: int | None = None
        self._disk_task: asyncio.Task[None] | None = None
        self.pipeline: Pipeline | RemotePipeline
        if remote:
            self.backlog = Backlog(settings.max_backlog, data / "backlog")
            self.pipeline = RemotePipeline(settings, self._lock)
        else:
            self.backlog = Backlog(settings.max_backlog)
            self.pipeline = Pipeline(settings, self.store, self.metrics, self.backlog, self.disk)
        self.ingest = Ingest(
            settings, self.store, self.backlog, self.metrics, lambda: self.accepting,
            lambda: self.disk.full,
            # a Redis inbox has no row ids to hand over: the pipeline reads the streams
            None if isinstance(self.store, RedisStore) else self.pipeline.committed,
        )
        self.accepting = False

    @property
    def store_down(self) -> str | None:
        """Why the store cannot take requests now, if it cannot (Redis unreachable)."""
        if isinstance(self.store, RedisStore) and not self.store.reachable:
            return "Redis unreachable"
        return None

    def _lock(self) -> int:
        assert self._lock_fd is not None
        return self._lock_fd

    @property
    def actors(self) -> Dispatcher:
        assert isinstance(self.pipeline, Pipeline), "the pipeline runs in a worker process"
        return self.pipeline.actors

    @property
    def forwarders(self) -> dict[str, Forwarder]:
        assert isinstance(self.pipeline, Pipeline), "the pipeline runs in a worker process"
        return self.pipeline.forwarders

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

    async def runner(self, **kwargs: Any) -> web.AppRunner:
        """An `AppRunner` for `app()`, set up, serving ingest's POSTs through `dispatch`."""
        runner = web.AppRunner(self.app(), **kwargs)
        await runner.setup()
        server = runner.server
        assert server is not None
        # each connection reads its handler from the server's `request_handler`, which aiohttp
        # does not document: an aiohttp without it serves ingest through its router (slower,
        # the same replies), said once here; tests/contract/test_dispatch.py fails on it
        if callable(getattr(server, "request_handler", None)):
            server.request_handler = self.dispatch(server.request_handler)
        else:
            log.warning("aiohttp's server has no request_handler: ingest goes through its router")
        return runner

    def dispatch(self, handle: Serve) -> Serve:
        """`handle` (the Application's, given to aiohttp's server) with the ingest POSTs
        served directly: a dict lookup instead of the router, the match info and the
        middleware chain, which cost about a tenth of an ingest request. The same
        handlers, replies and counts; anything else, a path with a query string or
        escapes, or an `Expect: 100-continue` header (the router's), goes to `handle`; any
        other `Expect` gets a JSON 417 on every route."""
        posts = self.ingest.posts()
        metrics = self.metrics

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            path = request.raw_path
            handler = posts.get(path) if request.method == "POST" else None
            if handler is None or "Expect" in request.headers:
                # aiohttp's router answers any other expectation a bare text 417, on every route
                return unmet_expectation(request) or await handle(request)
            # the runner's request factory makes `web.Request`s (the app's)
            resp = await handler(cast(web.Request, request))
            metrics.child(metrics.requests, path, str(resp.status)).inc()
            return resp

        return dispatch

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            self.metrics.child(self.metrics.requests, name, str(exc.status)).inc()
            if exc.status in UNROUTED:
                # a client on a wrong path or method reads a JSON error like every other one
                return routing_error(exc.status, exc.reason, exc.headers.get("Allow"))
            raise
        self.metrics.child(self.metrics.requests, name, str(resp.status)).inc()
        return resp

    async def start(self) -> None:
        self._lock_fd = await _lock_dir(self._data / "lock")
        self.disk.start()
        if isinstance(self.store, SqliteStore):
            self.store.on_refused = self.disk.refused
        self._disk_task = asyncio.create_task(self.disk.run(), name="disk")
        await self.store.open()
        counts = await self.pipeline.start()
        self.accepting = True
        log.info(
            "gateway started", sources=list(self.sources), inbox=counts.inbox,
            outbox=counts.outbox, dead_letters=counts.dead_letters,
            pipeline=self.settings.pipeline if isinstance(self.pipeline, RemotePipeline)
            else "inline",
        )

    async def _stop_accepting(self) -> None:
        self.accepting = False

    async def stop(self) -> None:
        """Drain: route the inbox, flush actors, forward what the timeout allows, keep the rest."""
        self.accepting = False
        await self.pipeline.stop(self.settings.shutdown_timeout)
        if self._disk_task is not None:
            self._disk_task.cancel()
            self._disk_task = None
        try:
            counts = await self.store.counts()
        except Exception as exc:
            # Redis down at the stop: what it holds stays there; the stop goes on all the
            # same (the store closed, the lock released), or a restart would wait for it
            log.warning("stop: the store's counts could not be read", error=str(exc))
            counts = None
        await self.store.close()
        self.backlog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None
        log.info("gateway stopped", **({} if counts is None else {
            "inbox": counts.inbox, "outbox": counts.outbox,
            "dead_letters": counts.dead_letters}))

    async def replay(self, ids: list[int] | None, source: str | None) -> int:
        """Give dead letters another go: messages back into the inbox (here: ingest owns it),
        calls back to the outbox (the pipeline). A crash in between replays the messages
        again at the next replay; dedupe drops what was applied."""
        handled: list[int] = []
        messages: dict[str, list[bytes]] = {}
        for letter in await self.store.replayable(ids, source):
            if letter.stage != "forward":
                try:
                    # JSON's syntax only: a number out of range (1e400) is still JSON
                    msgspec.json.decode(letter.payload, type=msgspec.Raw)
                except msgspec.DecodeError:
                    continue  # not JSON: nothing a replay could make of it
                messages.setdefault(letter.source, []).append(letter.payload)
            handled.append(letter.id)
        for src, payloads in messages.items():
            body = b'{"batch":[' + b",".join(payloads) + b"]}"
            await self.store.accept(src, time.time(), body, len(payloads))
            self.backlog.accepted(len(payloads))
        return await self.pipeline.requeue(handled)

    async def render_metrics(self) -> bytes:
        return self.metrics.render_ingest() + await self.pipeline.metrics_text()


def _store(settings: Settings, metrics: Metrics, *, apply: bool) -> Store:
    """The store of `settings`; `apply`: this process runs the pipeline too."""
    if settings.store == "redis":
        return RedisStore(
            settings, apply=apply,
            metrics=RedisMetrics(metrics.pipeline_registry) if apply else None,
        )
    return SqliteStore(Path(settings.data_dir) / "gateway.db", fsync=settings.fsync)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the data directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"cannot write to the data directory {path}")


async def _lock_dir(path: Path) -> int:
    """An exclusive lock on the data directory, held while this gateway (and its worker)
    lives; waits for an earlier one to go (a worker outlives its front by a moment). The
    holder writes its pid into the lock file, so that a waiting start can say whom it
    waits for."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(fd)
            if time.monotonic() > deadline:
                os.close(fd)
                raise StartupError(
                    f"the data directory {path.parent} is in use by another gateway "
                    f"({holder}) after waiting {LOCK_WAIT:.0f} s; stop it, or give this one "
                    "another --data-dir"
                ) from None
            if not told:
                log.warning(
                    "waiting for the data directory: another gateway holds it",
                    data_dir=str(path.parent), holder=holder, within_s=LOCK_WAIT,
                )
                told = True
            await asyncio.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if told:
        log.info("data directory free: starting", data_dir=str(path.parent))
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: the pid of the gateway that took it."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
