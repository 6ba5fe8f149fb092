"""The Segment side of a benchmark: posting batches to a gateway, and reading its admin
stats and the mock's inspection API, with aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from benchkit.stack import basic
from benchkit.traffic import Batch, Tally, Traffic


class Reply(msgspec.Struct):
    success: bool = False
    rejected: list[dict[str, Any]] = []


_reply = msgspec.json.Decoder(Reply)


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (connection error, timeout)
    latency: float  # seconds
    rejected: list[int] = field(default_factory=list)  # indexes a 200 reply listed as rejected
    retry_after: float | None = None


class Poster:
    """POSTs `/v1/batch` bodies with the write key, gzipped if asked."""

    def __init__(self, session: aiohttp.ClientSession, url: str, write_key: str, *,
                 use_gzip: bool = False) -> None:
        self.session = session
        self.url = url.rstrip("/") + "/v1/batch"
        self.use_gzip = use_gzip
        self.headers = {"Authorization": basic(write_key), "Content-Type": "application/json"}
        if use_gzip:
            self.headers["Content-Encoding"] = "gzip"

    def encode(self, body: bytes) -> bytes:
        return gzip.compress(body, compresslevel=6) if self.use_gzip else body

    async def post(self, data: bytes, started: float | None = None) -> Outcome:
        """`data` as `encode` made it; latency counts from `started` (default: now)."""
        t0 = time.perf_counter() if started is None else started
        try:
            async with self.session.post(self.url, data=data, headers=self.headers) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return Outcome(None, time.perf_counter() - t0)
        latency = time.perf_counter() - t0
        rejected: list[int] = []
        if status == 200:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, ValueError):
                rejected = [int(r.get("index", -1)) for r in _reply.decode(raw).rejected]
        after = None
        if retry_after is not None:
            try:
                after = float(retry_after)
            except ValueError:
                after = None
        return Outcome(status, latency, rejected, after)


@dataclass
class PushResult:
    requests: int = 0
    events: int = 0  # messages in batches answered 200
    retried: int = 0  # batches sent again after a 503 or an error
    seconds: float = 0.0
    status: Counter[str] = field(default_factory=Counter)


async def push(
    url: str,
    write_key: str,
    traffic: Traffic,
    tally: Tally,
    *,
    events: int,
    batch_size: int = 100,
    connections: int = 8,
    on_progress: Callable[[PushResult], None] | None = None,
) -> PushResult:
    """Send `events` messages as fast as the gateway takes them; a 503 or an error is retried
    (after Retry-After, capped at 1 s), as a Segment SDK would. Every batch ends up accepted."""
    result = PushResult()
    batches = (events + batch_size - 1) // batch_size
    left = iter(range(batches))
    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        poster = Poster(session, url, write_key)

        async def worker() -> None:
            for i in left:
                size = min(batch_size, events - i * batch_size)
                batch: Batch = traffic.batch(size)
                data = poster.encode(batch.body)
                while True:
                    out = await poster.post(data)
                    result.requests += 1
                    result.status[str(out.status or "error")] += 1
                    if out.status == 200:
                        tally.accept(batch.seqs, out.rejected)
                        result.events += size
                        break
                    if out.status is not None and out.status not in (429, 503) and out.status < 500:
                        raise RuntimeError(f"gateway answered {out.status} to a valid batch")
                    result.retried += 1
                    await asyncio.sleep(min(out.retry_after or 0.2, 1.0))
                if on_progress is not None:
                    on_progress(result)

        await asyncio.gather(*(worker() for _ in range(connections)))
    result.seconds = time.perf_counter() - t0
    return result


class Inspect:
    """The gateway's admin stats and the mock's `/_mock/` API, over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, gateway: str | None, admin_token: str | None,
                 mock: str | None, api_key: str | None) -> None:
        self.session = session
        self.gateway = gateway.rstrip("/") if gateway else None
        self.token = admin_token
        self.mock = mock.rstrip("/") if mock else None
        self.api_key = api_key
        self.journal_seq = 0  # the last journal entry read
        self.calls_by_path: Counter[str] = Counter()
        self.calls_by_status: Counter[str] = Counter()
        self.calls_seen = 0
        self._start_known = True

    async def _get(self, url: str, **query: str) -> Any:
        headers = {}
        if self.gateway and url.startswith(self.gateway) and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        async with self.session.get(url, params=query or None, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {url}: {resp.status} {raw[:200]!r}")
            return msgspec.json.decode(raw)

    async def stats(self) -> dict[str, Any] | None:
        if self.gateway is None or self.token is None:
            return None
        stats: dict[str, Any] = await self._get(self.gateway + "/admin/stats")
        return stats

    async def counts(self) -> dict[str, int]:
        """Occurrences the mock counted, by event name (for our API key if known)."""
        if self.mock is None:
            return {}
        query = {"api_key": self.api_key} if self.api_key else {}
        rows = await self._get(self.mock + "/_mock/counts", **query)
        out: dict[str, int] = {}
        for row in rows:
            out[row["event"]] = out.get(row["event"], 0) + int(row["count"])
        return out

    async def journal(self) -> int:
        """Read journal entries past the last one read; returns how many calls were new.

        `seq` numbers every call the mock ever got, so calls that fell out of its bounded
        journal between two reads still count (their path and status are then unknown).
        The journal is not filtered by API key: run against a mock nobody else uses."""
        if self.mock is None:
            return 0
        calls = await self._get(self.mock + "/_mock/calls", since=str(self.journal_seq))
        if not calls:
            return 0
        last = int(calls[-1]["seq"])
        # an empty journal at the start may follow a reset, which keeps `seq` counting
        missed = max(0, (last - self.journal_seq) - len(calls)) if self._start_known else 0
        self._start_known = True
        for call in calls:
            self.calls_by_path[str(call["path"])] += 1
            self.calls_by_status[str(call["status"])] += 1
        if missed:
            self.calls_by_path["(fell out of the journal)"] += missed
            self.calls_by_status["(fell out of the journal)"] += missed
        self.calls_seen += len(calls) + missed
        self.journal_seq = last
        return len(calls) + missed

    async def journal_start(self, *, fresh: bool = False) -> None:
        """Skip what the mock got before this run (`fresh`: a mock this run started)."""
        if self.mock is None or fresh:
            return
        calls = await self._get(self.mock + "/_mock/calls")
        self.journal_seq = int(calls[-1]["seq"]) if calls else 0
        self._start_known = bool(calls)
