"""The aiohttp face of the mock: ingest routes, `/_mock/` inspection, one log line per call.

All decisions (auth, validation, faults, state) are the state engine's; the
handlers only read requests, sleep for injected latency, and reply or drop.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from structlog.typing import FilteringBoundLogger

from mock_accoil.capacity import Capacity
from mock_accoil.faults import INGEST_PATHS, Fault
from mock_accoil.state import MockAccoil
from mock_accoil.wire import bad_request, error_field, journal_body

STATE = web.AppKey("mock_accoil.state", MockAccoil)
_LOG: web.AppKey[FilteringBoundLogger | None] = web.AppKey("mock_accoil.log")
_OPENAPI = web.AppKey("mock_accoil.openapi", bytes)

_BODY_HEADERS = frozenset({"content-type", "content-length"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def key_fingerprint(api_key: str | None) -> str | None:
    """A short, stable, secret-free name for an API key, for logs."""
    if api_key is None:
        return None
    return "key_" + hashlib.sha256(api_key.encode()).hexdigest()[:10]


def openapi_document() -> bytes:
    return resources.files("mock_accoil").joinpath("openapi.json").read_bytes()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _log_call(request: web.Request, status: int | None, api_key: str | None, **extra: Any) -> None:
    log = request.app[_LOG]
    if log is not None:
        log.info(
            "call",
            method=request.method,
            path=request.path,
            status="dropped" if status is None else status,
            key=key_fingerprint(api_key),
            **extra,
        )


# -- ingest --------------------------------------------------------------------


async def ingest(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    raw = await request.read()
    reply = state.receive(
        request.path,
        authorization=request.headers.get("Authorization"),
        body=raw,
        method=request.method,
    )
    try:
        if reply.latency:
            await asyncio.sleep(reply.latency)
    finally:
        # answered (or the client went away): the capacity slot is free
        if reply.held:
            state.release()
    extra: dict[str, Any] = {}
    if reply.call.fault is not None:
        extra["fault"] = reply.call.fault
    if reply.latency:
        extra["latency_ms"] = round(reply.latency * 1000)
    _log_call(request, reply.status, reply.call.api_key, **extra)
    if reply.drop or reply.status is None:
        transport = request.transport
        if transport is not None:
            transport.close()
        # never sent: writing to the closed transport ends the request quietly
        return web.Response(status=500)
    return _json(reply.body, status=reply.status, headers=reply.headers)


@web.middleware
async def journal_unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405, 413) in JSON; journal them off `/_mock/`."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        reply = {"error": exc.text}
        if not request.path.startswith("/_mock/"):
            body: Any = None
            if exc.status != 413:
                try:
                    body = journal_body(await request.read())
                except web.HTTPException:
                    body = None
            request.app[STATE].note(
                request.method, request.path, status=exc.status, body=body, reply=reply
            )
            _log_call(request, exc.status, None)
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return _json(reply, status=exc.status, headers=headers)


# -- inspection ----------------------------------------------------------------


def _param(request: web.Request, name: str) -> str | None:
    return request.query.get(name)


def _bad(error: str, field: str | None) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=msgspec.json.encode(bad_request(error, field)).decode(),
        content_type="application/json",
    )


def _int_param(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad(f"{name} must be an integer", name) from None


async def get_calls(request: web.Request) -> web.Response:
    state = request.app[STATE]
    calls = state.calls(
        path=_param(request, "path"),
        status=_int_param(request, "status"),
        api_key=_param(request, "api_key"),
        since=_int_param(request, "since"),
    )
    return _json(calls)


async def get_users(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return _json(state.users(api_key=_param(request, "api_key"), user_id=_param(request, "userId")))


async def get_accounts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    accounts = state.accounts(
        api_key=_param(request, "api_key"), group_id=_param(request, "groupId")
    )
    return _json(accounts)


async def get_counts(request: web.Request) -> web.Response:
    state = request.app[STATE]
    counts = state.counts(
        day=_param(request, "day"),
        user_id=_param(request, "userId"),
        event=_param(request, "event"),
        api_key=_param(request, "api_key"),
    )
    return _json(counts)


async def post_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return _json({"success": True})


async def _body(request: web.Request, typ: type[T]) -> T:
    """The JSON body as `typ`; a 400 naming the field (raised) when it is not one."""
    try:
        return msgspec.json.decode(await request.read(), type=typ)
    except msgspec.ValidationError as exc:
        raise _bad(str(exc), error_field(exc)) from None
    except msgspec.DecodeError:
        raise _bad("body is not valid JSON", None) from None


async def post_fault(request: web.Request) -> web.Response:
    fault = await _body(request, Fault)
    return _json(request.app[STATE].add_fault(fault), status=201)


async def get_faults(request: web.Request) -> web.Response:
    return _json(request.app[STATE].faults())


async def delete_faults(request: web.Request) -> web.Response:
    request.app[STATE].clear_faults()
    return _json({"success": True})


async def get_capacity(request: web.Request) -> web.Response:
    return _json(request.app[STATE].capacity())


async def put_capacity(request: web.Request) -> web.Response:
    capacity = await _body(request, Capacity)
    return _json(request.app[STATE].set_capacity(capacity))


async def delete_capacity(request: web.Request) -> web.Response:
    return _json(request.app[STATE].set_capacity(None))


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_OPENAPI], content_type="application/json")


def create_app(state: MockAccoil | None = None, *, log_calls: bool = True) -> web.Application:
    """The mock as an aiohttp application; pass `state` to share it with the caller."""
    app = web.Application(middlewares=[journal_unrouted])
    app[STATE] = state if state is not None else MockAccoil()
    log: FilteringBoundLogger | None = structlog.get_logger("mock_accoil") if log_calls else None
    app[_LOG] = log
    app[_OPENAPI] = openapi_document()
    for path in INGEST_PATHS:
        app.router.add_post(path, ingest)
    app.router.add_get("/_mock/calls", get_calls)
    app.router.add_get("/_mock/users", get_users)
    app.router.add_get("/_mock/accounts", get_accounts)
    app.router.add_get("/_mock/counts", get_counts)
    app.router.add_post("/_mock/reset", post_reset)
    app.router.add_post("/_mock/faults", post_fault)
    app.router.add_get("/_mock/faults", get_faults)
    app.router.add_delete("/_mock/faults", delete_faults)
    app.router.add_get("/_mock/capacity", get_capacity)
    app.router.add_put("/_mock/capacity", put_capacity)
    app.router.add_delete("/_mock/capacity", delete_capacity)
    app.router.add_get("/_mock/openapi.json", get_openapi)
    return app
