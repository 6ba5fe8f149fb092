"""What a route that asks the pipeline worker answers when the worker cannot: each kind of
`WorkerError` gives its status, header and message, and none quotes the worker's own error
(the process-mode test, `tests/contract/test_worker_rpc.py`, freezes and kills a real one)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import _asks_worker
from gateway.worker import WorkerError, WorkerUnavailable

SECRET = "redis://:hunter2-secret@10.0.0.1:6379/0"


async def answer(exc: Exception | None) -> tuple[int, str | None, object]:
    async def handler(request: web.Request) -> web.StreamResponse:
        if exc is not None:
            raise exc
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/admin/stats", _asks_worker(handler))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/admin/stats")
        text = await resp.text()
        assert SECRET not in text and "Traceback" not in text
        return resp.status, resp.headers.get("Retry-After"), await resp.json()


async def test_a_worker_that_did_not_answer_in_time() -> None:
    exc = WorkerUnavailable(f"the pipeline worker did not answer Stats within 20 s {SECRET}", 20.0)
    assert await answer(exc) == (503, "5", {
        "error": "the pipeline worker did not answer /admin/stats within 20 s; try again in 5 s"})


async def test_a_worker_that_is_gone() -> None:
    assert await answer(WorkerUnavailable(f"the pipeline worker is gone {SECRET}")) == (
        503, "5", {"error": "the pipeline worker is not running (its process exited; another "
                            "is being started), so /admin/stats could not be answered; try "
                            "again in 5 s"})


async def test_a_worker_that_failed_at_the_request_is_a_500_without_its_error() -> None:
    assert await answer(WorkerError(f"ConnectionError('{SECRET}')")) == (
        500, None, {"error": "the pipeline worker failed at /admin/stats: see its log"})


async def test_an_answer_passes_through() -> None:
    assert await answer(None) == (200, None, {"ok": True})
