"""One redactor for every way out: a secret echoed by Accoil into a dead letter is masked
exactly as the same text is in a log line (and an admin reply, which masks with the log's
`Redactor.from_settings`). Fails if the two paths diverge."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest
import structlog
from aiohttp import web

from gateway.config import Settings, Source
from gateway.forward import AccoilClient, Reject
from gateway.mapping import dialect
from gateway.observability.logging import configure_logging
from gateway.observability.redaction import MASK, Redactor
from tests.net import free_port

V2_KEY = "ak_V2_redact_0123456789"
SEG_KEY = "stg_Seg/redact+9876543210"  # staging: sent without its prefix; "/" and "+" quote


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def forms(source: Source) -> list[str]:
    """Every form of the source's API key that may come back in an error reply."""
    key = source.accoil_api_key
    bare = key[4:] if key.lower().startswith("stg_") else key
    found = {key, key.upper(), key.lower(), bare, bare.swapcase(), quote(key, safe=""),
             quote(bare, safe=""), b64(key), b64(f"{key}:"), b64(bare), b64(f"{bare}:"),
             dialect(source.api).upstream(source).authorization}
    return sorted(found)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """An upstream that refuses every call with 400, its body the request's `echo` field."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=400, text=(await request.json())["echo"])

    app = web.Application()
    app.router.add_post("/{path:.*}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def logged(redactor: Redactor, text: str) -> str:
    buf = io.StringIO()
    configure_logging("json", "info", redactor=redactor, stream=buf)
    structlog.get_logger().info("echo", reply=text)
    (line,) = [json.loads(raw) for raw in buf.getvalue().splitlines()]
    reply: str = line["reply"]
    return reply


@pytest.mark.usefixtures("logging_reset")
async def test_dead_letters_and_logs_mask_every_form_alike(echo: str) -> None:
    sources = [
        Source(write_key="wk_redact_v2_1", accoil_api_key=V2_KEY, api="v2", base_url=echo),
        Source(write_key="wk_redact_seg_2", accoil_api_key=SEG_KEY, api="segment", base_url=echo),
    ]
    log_redactor = Redactor.from_settings(Settings(sources=sources))
    checked = 0
    for source in sources:
        async with AccoilClient.for_source(source) as client:
            for form in forms(source):
                text = f"invalid key <{form}> in request"
                out = await client.post(dialect(source.api).path("track"), {"echo": text})
                assert isinstance(out, Reject)
                in_log = logged(log_redactor, text)
                assert out.body == in_log, f"dead letter and log differ for a form of {source.api}"
                assert MASK in out.body
                for secret in forms(source):
                    assert secret.lower() not in out.body.lower()
                checked += 1
    assert checked == sum(len(forms(s)) for s in sources)
