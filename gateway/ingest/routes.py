"""Segment's HTTP Tracking API: the batch routes and the single-message routes (DESIGN 2).

Every client Segment ships posts to one of them: server SDKs to `/v1/batch` or `/v1/import`
(analytics-java with a trailing slash), analytics.js to `/v1/t|i|p|g|a|s` one call at a
time or to `/b` in batching mode, the mobile SDKs to `/b`. Every route also answers with a
trailing slash and to OPTIONS (a browser's preflight).

The request path does no per-event Python in the common case: one msgspec decode in C,
one group-committed insert of the body, and the reply. Mapping, dedupe and the ledger
happen in the pipeline (router and actors), after the reply, by default in a process of
its own. A request's invalid messages are stored with it: the router keeps them as dead
letters.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from gateway.config import Settings, Source
from gateway.disk import out_of_space
from gateway.ingest.auth import Keys, names_key, same_key
from gateway.ingest.body import BodyError, read_body
from gateway.segment import (
    Checked,
    Decoded,
    InvalidBody,
    check_batch,
    decode_batch,
    decode_single,
)
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.backlog import Backlog
    from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.ingest")

SINGLE = ("track", "identify", "group", "page", "screen", "alias")
# analytics.js's short names for the single-message routes
SHORT = {"t": "track", "i": "identify", "g": "group", "p": "page", "s": "screen", "a": "alias"}
BATCH = ("/v1/batch", "/v1/import", "/v1/b", "/b")
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    # analytics.js sends Authorization (and, retrying, X-Retry-Count): both preflight
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, Content-Encoding, X-Retry-Count"
    ),
    "Access-Control-Max-Age": "86400",
}
# Segment's `code` for each error status, beside our own fields: SDKs read `code` and
# `message`, and analytics-python fails (and retries) when they are missing
CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_encoding",
    417: "expectation_failed",
    503: "service_unavailable",
}
_OK = msgspec.json.encode({"success": True})
_JSON = {"Content-Type": "application/json; charset=utf-8"}
_encode = msgspec.json.encode


class Ingest:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        backlog: Backlog,
        metrics: Metrics,
        accepting: Callable[[], bool],
        disk_full: Callable[[], bool],
        committed: Callable[[int, Decoded], None] | None = None,
    ) -> None:
        """`committed(row_id, decoded)` hears of each inbox row ingest commits (the router,
        when it runs in this process)."""
        self.settings = settings
        self.keys = Keys(settings.sources)
        self.store = store
        self._committed = committed
        # with no router here to hand the messages to, validating them is enough
        self._read_batch: Callable[[bytes], Decoded | Checked] = (
            decode_batch if committed is not None else check_batch
        )
        self.backlog = backlog
        self.metrics = metrics
        self._accepting = accepting
        self._disk_full = disk_full

    def routes(self) -> list[web.RouteDef]:
        defs: list[web.RouteDef] = []
        for path, handler in self.posts().items():
            defs += [web.post(path, handler), web.options(path, preflight)]
        return defs

    def posts(self) -> dict[str, Callable[[web.Request], Awaitable[web.Response]]]:
        """Each ingest path (with and without its trailing slash) and its POST handler."""
        handlers: dict[str, Callable[[web.Request], Awaitable[web.Response]]] = dict.fromkeys(
            BATCH, self.batch
        )
        for kind in SINGLE:
            handlers[f"/v1/{kind}"] = self._single(kind)
        for short, kind in SHORT.items():
            handlers[f"/v1/{short}"] = self._single(kind)
        return {each: h for path, h in handlers.items() for each in (path, path + "/")}

    async def batch(self, request: web.Request) -> web.Response:
        return await self._ingest(request, None)

    def _single(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return await self._ingest(request, kind)

        return handler

    async def _ingest(self, request: web.Request, kind: str | None) -> web.Response:
        self.backlog.requests += 1
        try:
            resp = await self._take(request, kind)
        finally:
            self.backlog.requests -= 1
        if "Origin" in request.headers:
            # a browser (analytics.js): let it read the reply; other clients never look
            resp.headers.update(CORS)
        return resp

    async def _take(self, request: web.Request, kind: str | None) -> web.Response:
        received_at = time.time()
        if not self._accepting():
            return self._busy("shutting down")
        header = request.headers.get("Authorization")
        source = self.keys.known_header(header)
        # a Bearer header (an SDK in OAuth mode) names no write key: the body's writeKey does
        if source is None and header is not None and names_key(header):
            source = self.keys.by_header(header)
            if source is None:
                return self._unauthorized()
        if self.backlog.full:
            return self._busy("backlog full", source)
        if self._disk_full():
            # the reserve's space is for finishing work taken, not for taking more
            return self._busy("data folder full", source)
        try:
            body = await read_body(request, within=self.settings.read_timeout)
            decoded = self._read_batch(body) if kind is None else decode_single(body, kind)
        except BodyError as exc:
            if source is not None:
                self.metrics.rejected.labels(source.id, _reason(exc.status)).inc()
            return _error(exc.status, exc.reason)
        except InvalidBody as exc:
            if source is not None:
                self.metrics.rejected.labels(source.id, "invalid").inc()
            return _error(400, exc.reason)
        if source is None:
            source = self.keys.find(decoded.write_key)
            if source is None:
                return self._unauthorized()
        elif decoded.write_key and not same_key(decoded.write_key, source.write_key):
            # two keys that disagree: either could name the wrong Accoil account
            self.metrics.rejected.labels(source.id, "unauthorized").inc()
            return _error(
                401, "the Authorization header and the body's writeKey name different write keys"
            )
        return await self._accept(source, decoded, received_at, single=kind is not None)

    async def _accept(
        self, source: Source, decoded: Decoded | Checked, received_at: float, *, single: bool
    ) -> web.Response:
        src = source.id
        count = decoded.count
        self.metrics.child(self.metrics.received, src).inc(count)
        if count:
            try:
                row_id = await self.store.accept(src, received_at, decoded.body, count)
            except InvalidBody as exc:
                # the store's own read of the body (Redis mode's split by partition) failed
                # where ingest's did not: the client's body, not the store, is at fault
                self.metrics.rejected.labels(src, "invalid").inc()
                return _error(400, exc.reason)
            except Exception as exc:
                if not out_of_space(exc):  # a full disk is reported once, not per request
                    log.exception("commit failed", source_id=src)
                return self._busy("store unavailable", source)
            self.backlog.accepted(count)
            if self._committed is not None and isinstance(decoded, Decoded):
                self._committed(row_id, decoded)
        self.metrics.child(self.metrics.accepted, src).inc(decoded.valid)
        if not decoded.rejected:
            return web.Response(body=_OK, headers=_JSON)
        self.metrics.rejected.labels(src, "invalid").inc(len(decoded.rejected))
        rejected = [
            {"index": r.index, "messageId": r.messageId, "reason": r.reason}
            for r in decoded.rejected
        ]
        if single:
            # one message and it was invalid: say so as an error, as Segment does
            return _error(400, decoded.rejected[0].reason, rejected=rejected)
        return web.Response(
            body=_encode({"success": True, "rejected": rejected}),
            headers=_JSON,
        )

    def _unauthorized(self) -> web.Response:
        # never echo the key that was tried
        return _error(401, "unknown or missing write key", extra={"WWW-Authenticate": "Basic"})

    def _busy(self, why: str, source: Source | None = None) -> web.Response:
        if source is not None:
            self.metrics.rejected.labels(source.id, "overloaded").inc()
        retry = str(self.settings.retry_after)
        return _error(503, f"{why}: retry later", extra={"Retry-After": retry})


UNROUTED = (404, 405)  # aiohttp's own replies for a path or method no route serves


def routing_error(status: int, reason: str, allow: str | None) -> web.Response:
    """aiohttp's 404 or 405 in the shape of every other error reply."""
    extra = {"Allow": allow} if allow is not None else None
    return _error(status, reason.lower(), extra=extra)


def unmet_expectation(request: web.BaseRequest) -> web.Response | None:
    """A 417 for an `Expect` header other than `100-continue` (RFC 9110 10.1.1), in the shape
    of every other error reply; None for a request that expects nothing else."""
    expect = request.headers.get("Expect")
    if expect is None or expect.strip().lower() == "100-continue":
        return None
    return _error(417, "the Expect header may only ask for 100-continue")


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS)


def _reason(status: int) -> str:
    return "too_large" if status == 413 else "invalid"


def _error(
    status: int,
    message: str,
    *,
    extra: dict[str, str] | None = None,
    rejected: list[dict[str, Any]] | None = None,
) -> web.Response:
    payload: dict[str, Any] = {
        "success": False,
        "code": CODES.get(status, "error"),
        "message": message,
        "error": message,
    }
    if rejected is not None:
        payload["rejected"] = rejected
    return web.Response(
        status=status,
        body=_encode(payload),
        headers={**_JSON, **(extra or {})},
    )
