"""Reading a request body within Segment's limits, gunzipping as it streams."""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

MAX_BODY = 500 * 1024  # Segment's limit on a request, after gunzip
CHUNK = 64 * 1024


class BodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(
    request: web.Request, limit: int = MAX_BODY, within: float | None = None
) -> bytes:
    """The body, gunzipped; 413 past `limit` without holding more than `limit` bytes of it,
    408 when it takes longer than `within` seconds to arrive."""
    if request.content.is_eof():
        # all of it arrived with the headers (the common case): no deadline to keep
        return await _read_body(request, limit)
    try:
        async with asyncio.timeout(within):
            return await _read_body(request, limit)
    except TimeoutError:
        raise BodyError(408, f"request body not received within {within:g} s") from None
    except ConnectionResetError:
        # the client went away mid-body: nobody reads the reply, but it must not log as a crash
        raise BodyError(400, "connection lost while reading the body") from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise BodyError(415, f"unsupported Content-Encoding {encoding[:40]!r}: use gzip or none")
    length = request.content_length
    if length is not None and length > limit:
        raise BodyError(413, f"request body over {limit} bytes")
    if encoding in ("", "identity"):
        if length is not None:
            # the stream's own read: the body as it arrived (one chunk: no copy), where
            # `request.read()` copies it through a bytearray; the length is checked above
            return await request.content.read()
        return await _read_capped(request, limit)
    return await _gunzip(request, limit)


async def _read_capped(request: web.Request, limit: int) -> bytes:
    out = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        out += chunk
        if len(out) > limit:
            raise BodyError(413, f"request body over {limit} bytes")
    return bytes(out)


async def _gunzip(request: web.Request, limit: int) -> bytes:
    inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    out = bytearray()
    received = 0
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > limit:
                raise BodyError(413, f"request body over {limit} bytes")
            # never inflate more than one byte past the limit: a gzip bomb stops here
            out += inflate.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit or inflate.unconsumed_tail:
                raise BodyError(413, f"request body over {limit} bytes after gunzip")
            if inflate.eof:
                break
        out += inflate.flush()
    except zlib.error as exc:
        raise BodyError(400, f"body is not valid gzip: {exc}") from None
    if not inflate.eof:
        raise BodyError(400, "gzip body is truncated")
    if inflate.unused_data or await request.content.read(1):
        # a second gzip member or trailing bytes: refuse rather than silently drop them
        raise BodyError(400, "data after the end of the gzip stream")
    if len(out) > limit:
        raise BodyError(413, f"request body over {limit} bytes after gunzip")
    return bytes(out)
