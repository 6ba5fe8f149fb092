"""Operator routes: health, readiness, metrics, and the token-guarded admin API."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

import msgspec
import structlog
from aiohttp import web

from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.disk import Disk
from gateway.observability.logging import Redactor
from gateway.observability.metrics import CONTENT_TYPE, Metrics
from gateway.store import Store
from gateway.worker import WorkerError, WorkerUnavailable

log = structlog.get_logger("gateway.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 1000
# seconds a client is told to wait when the pipeline worker could not answer: a restart
# takes a second or two, and a worker frozen for a while has no better estimate
RETRY_AFTER = 5


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(payload), content_type="application/json"
    )


class PipelineStats(Protocol):
    async def stats(self) -> dict[str, Any]: ...


class Operated(Protocol):
    """What the operator routes look at: the gateway (`gateway.app`), seen from here, so
    that this module does not import the app that serves it."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    @property
    def backlog(self) -> Backlog: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def pipeline(self) -> PipelineStats: ...

    @property
    def disk(self) -> Disk: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def store_down(self) -> str | None: ...

    async def render_metrics(self) -> bytes: ...

    async def replay(self, ids: list[int] | None, source: str | None) -> int: ...


class Admin:
    def __init__(self, gateway: Operated) -> None:
        self.gw = gateway
        token = gateway.settings.admin_token
        self._token = token.encode() if token else None
        self._openapi: bytes | None = None
        self._redactor = Redactor.from_settings(gateway.settings)

    def routes(self) -> list[web.RouteDef]:
        defs = [
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", _asks_worker(self.metrics)),
            web.get("/openapi.json", self.openapi),
        ]
        if self._token is not None:
            defs += [
                web.get("/admin/stats", self._guard(_asks_worker(self.stats))),
                web.get("/admin/dead-letters", self._guard(self.dead_letters)),
                web.post("/admin/dead-letters/replay", self._guard(_asks_worker(self.replay))),
                web.get("/admin/ledger", self._guard(self.ledger)),
            ]
        return defs

    def _guard(self, handler: Handler) -> Handler:
        token = self._token
        assert token is not None

        async def guarded(request: web.Request) -> web.StreamResponse:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return _json({"error": "admin routes need Authorization: Bearer <admin token>"}, 401)
            return await handler(request)

        return guarded

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of the ingest and operator routes (packaged with the gateway)."""
        if self._openapi is None:
            self._openapi = resources.files("gateway").joinpath("ingest/openapi.json").read_bytes()
        return web.Response(body=self._openapi, content_type="application/json")

    async def readyz(self, request: web.Request) -> web.Response:
        gw = self.gw
        if not gw.accepting:
            return _json({"ready": False, "reason": "starting or draining"}, 503)
        if gw.backlog.full:
            return _json({"ready": False, "reason": "backlog full"}, 503)
        if gw.disk.full:
            return _json({"ready": False, "reason": "data folder full"}, 503)
        if (down := gw.store_down) is not None:
            return _json({"ready": False, "reason": down}, 503)
        return _json({"ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        gw = self.gw
        gw.metrics.backlog.set(gw.backlog.total)
        gw.metrics.inbox.set(gw.backlog.inbox)
        gw.metrics.ready.set(int(gw.accepting))
        resp = web.Response(body=await gw.render_metrics())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        gw = self.gw
        counts = await gw.store.counts()
        pipeline = await gw.pipeline.stats()
        circuits = pipeline["circuits"]
        # a worker from before an upgrade may not report it
        forwarding = pipeline.get("forwarding", {})
        return _json(
            {
                "accepting": gw.accepting,
                "backlog": {"total": gw.backlog.total, "limit": gw.backlog.limit},
                "data_folder_full": gw.disk.full,
                "inbox_messages": counts.inbox,
                "outbox_calls": counts.outbox,
                "dead_letters": counts.dead_letters,
                "ledger": {"rows": counts.ledger_rows, "events": counts.ledger_events},
                "active_actors": pipeline["active_actors"],
                "sources": [
                    {
                        "id": s.id,
                        "api": s.api,
                        "base_url": s.base_url,
                        "track_mode": s.track_mode,
                        "circuit": circuits.get(s.id),
                        "forwarding": forwarding.get(s.id),
                    }
                    for s in gw.settings.sources
                ],
            }
        )

    async def dead_letters(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            after = int(q.get("after", "0"))
            limit = min(int(q.get("limit", "100")), MAX_PAGE)
        except ValueError:
            return _json({"error": "after and limit must be integers"}, 400)
        if not 0 <= after < 2**63 or limit < 1:
            # limit 0 would page forever (and index an empty page), a negative one means all,
            # and SQLite integers stop at 2**63
            return _json({"error": "after must be in [0, 2**63) and limit at least 1"}, 400)
        letters = await self.gw.store.dead_letters(
            q.get("source"), after, limit, q.get("replayed") in ("1", "true")
        )
        items = []
        for d in letters:
            try:
                payload: Any = msgspec.json.decode(d.payload)
            except msgspec.DecodeError:
                payload = d.payload.decode("utf-8", "replace")
            items.append(
                {
                    "id": d.id, "source": d.source, "account": d.account, "stage": d.stage,
                    "reason": d.reason, "status": d.status, "path": d.path, "repeat": d.repeat,
                    "created_at": d.created_at, "last_at": d.last_at,
                    "replayed_at": d.replayed_at, "payload": payload,
                }
            )
        nxt = letters[-1].id if len(letters) == limit else None
        return self._masked({"dead_letters": items, "next": nxt})

    async def replay(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
            spec = msgspec.json.decode(body, type=ReplaySpec) if body.strip() else ReplaySpec()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _json({"error": f"replay body: {exc}"}, 400)
        n = await self.gw.replay(spec.ids, spec.source)
        return _json({"replayed": n})

    async def ledger(self, request: web.Request) -> web.Response:
        rows = await self.gw.store.ledger(request.query.get("source"), request.query.get("day"))
        return self._masked({"ledger": rows})

    def _masked(self, payload: Any) -> web.Response:
        """`_json`, with every configured secret masked: dead letters and ledger rows hold
        what clients sent, which may include a write key (a message's own `writeKey`) or any
        other key pasted into a trait. (A secret with a character that JSON escapes, such as
        a quote or a backslash, would not be matched in the encoded text.)"""
        text = self._redactor.mask(msgspec.json.encode(payload).decode())
        return web.Response(body=text.encode(), content_type="application/json")


def _asks_worker(handler: Handler) -> Handler:
    """`handler`, for a route that asks the pipeline worker (process mode): when the worker
    cannot answer, a 503 with Retry-After that says so and names the route, instead of a
    bare 500; when it failed at the request, a 500 that says where to look. Neither
    carries the worker's own error text (it could quote a Redis URL): that is in its log."""

    async def asking(request: web.Request) -> web.StreamResponse:
        route = request.path
        try:
            return await handler(request)
        except WorkerUnavailable as exc:
            if exc.within is not None:
                why = f"the pipeline worker did not answer {route} within {exc.within:g} s"
            else:
                why = (f"the pipeline worker is not running (its process exited; another is "
                       f"being started), so {route} could not be answered")
            log.warning("an operator route found the pipeline worker unavailable", route=route,
                        error=str(exc))
            resp = _json({"error": f"{why}; try again in {RETRY_AFTER} s"}, 503)
            resp.headers["Retry-After"] = str(RETRY_AFTER)
            return resp
        except WorkerError:
            return _json({"error": f"the pipeline worker failed at {route}: see its log"}, 500)

    return asking


class ReplaySpec(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[int] | None = None  # none: every dead letter not replayed yet
    source: str | None = None
