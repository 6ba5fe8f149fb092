"""The HTTP client to Accoil: one keep-alive session per source, one POST per call.

`AccoilClient.post` never raises for anything the network or the upstream does;
it classifies the result into an `Outcome` and leaves retrying, throttling and
the circuit to its caller.
"""

from __future__ import annotations

import email.utils
import math
import time
from datetime import UTC
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec

from gateway.config import Source
from gateway.mapping.dialects import Upstream, dialect
from gateway.observability.redaction import Redactor

from .limiter import CEILING
from .outcome import Delivered, Outcome, Reject, Retry, reject_body

USER_AGENT = "accoil-gateway/0.1"
# Bytes of an error reply read for its dead letter; more than `BODY_LIMIT` so
# that redaction sees whole secrets before the text is clipped.
READ_LIMIT = 64 * 1024
# Idle upstream connections are kept this long for reuse.
KEEPALIVE = 30.0


class AccoilClient:
    """POSTs JSON bodies to one upstream; use it as `async with` or call `close()`.

    The aiohttp session is created on the first `post`, inside the running
    loop, and its connector holds up to `max_concurrency` keep-alive
    connections: the most calls the source's limiter lets fly at once, so no
    call waits for a socket and each reuses one a finished call left idle.
    """

    def __init__(
        self, upstream: Upstream, *, timeout: float = 10.0, max_concurrency: int = 8
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._base_url = upstream.base_url.rstrip("/")
        self._headers = {
            "Authorization": upstream.authorization,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._redactor = Redactor([upstream.api_key])
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_concurrency = max_concurrency
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def for_source(cls, source: Source) -> AccoilClient:
        """A client for `source`: its dialect says where its calls go and how they
        authenticate (`gateway.mapping.dialects`)."""
        pool = source.max_concurrency or CEILING
        return cls(dialect(source.api).upstream(source), timeout=source.timeout, max_concurrency=pool)

    def __repr__(self) -> str:
        # The default repr would be harmless, but a client is easy to log by accident.
        return f"AccoilClient(base_url={self._base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_concurrency,
                limit_per_host=self._max_concurrency,
                keepalive_timeout=KEEPALIVE,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    async def post(self, path: str, body: dict[str, Any]) -> Outcome:
        """POST `body` as JSON to `base_url + path` and classify the answer."""
        started = time.perf_counter()
        if self._closed:
            # A shutdown race, not a delivery failure: the call stays queued.
            return Retry("closed", None, None, 0.0)
        data = msgspec.json.encode(body)
        try:
            async with self._get_session().post(
                self._base_url + path,
                data=data,
                headers=self._headers,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    # Drain the (small) reply so the connection goes back to the pool.
                    await _read(resp, READ_LIMIT)
                    return Delivered(status, time.perf_counter() - started)
                if status == 429 or status == 408 or status >= 500:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    latency = time.perf_counter() - started
                    return Retry(_retry_reason(status), status, retry_after, latency)
                raw, complete = await _read(resp, READ_LIMIT)
                body_text = reject_body(raw, self._redactor, complete=complete)
                return Reject(status, body_text, time.perf_counter() - started)
        except TimeoutError:
            return Retry("timeout", None, None, time.perf_counter() - started)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
            return Retry("disconnected", None, None, time.perf_counter() - started)
        except (aiohttp.ClientConnectionError, OSError):
            return Retry("connection", None, None, time.perf_counter() - started)
        except aiohttp.ClientError:
            return Retry("client_error", None, None, time.perf_counter() - started)


def _retry_reason(status: int) -> str:
    if status == 429:
        return "rate_limited"
    # 408 is the server timing out the request: a timeout like ours, so retried.
    return "timeout" if status == 408 else "server_error"


async def _read(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it.

    A body cut off mid-way yields what arrived: the status line already decided
    the outcome, the body is only there to explain it.
    """
    buf = bytearray()
    try:
        while len(buf) < limit:
            chunk = await resp.content.read(limit - len(buf))
            if not chunk:
                return bytes(buf), True
            buf += chunk
        return bytes(buf), resp.content.at_eof()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return bytes(buf), False


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date.

    None when absent or unreadable; 0 for a date already past. Not capped here:
    `backoff.delay` caps it.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
