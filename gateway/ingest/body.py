"""Reading a request body within Segment's limits, gunzipping as it streams."""

from __future__ import annotations

import zlib

from aiohttp import web

MAX_BODY = 500 * 1024  # Segment's limit on a request, after gunzip
CHUNK = 64 * 1024


class BodyError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The body, gunzipped; 413 past `limit` without holding more than `limit` bytes of it."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise BodyError(415, f"unsupported Content-Encoding {encoding[:40]!r}: use gzip or none")
    length = request.content_length
    if length is not None and length > limit:
        raise BodyError(413, f"request body over {limit} bytes")
    if encoding in ("", "identity"):
        if length is not None:
            return await request.read()
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
    if len(out) > limit:
        raise BodyError(413, f"request body over {limit} bytes after gunzip")
    return bytes(out)
