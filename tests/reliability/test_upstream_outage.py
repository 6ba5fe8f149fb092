"""Upstream outage: Accoil fails for a while (503, then dropped connections) while clients
keep sending. Ingest takes events up to the backlog bound, then answers 503 with
Retry-After (never accepting and dropping); once Accoil is back the backlog drains
completely, no faster than the source's rate cap. A 429's Retry-After is honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.config import Source
from gateway.forward.limiter import BURST
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import API_KEY, WRITE_KEY, Running, running, settings_for
from tests.reliability.reliability_support import basic, record


def _seconds(call: dict[str, Any]) -> float:
    return datetime.fromisoformat(call["time"].replace("Z", "+00:00")).timestamp()


def _batch(start: int, n: int, tag: str) -> dict[str, Any]:
    return {
        "batch": [
            {"type": "track", "messageId": f"{tag}-{i}", "userId": f"user-{i % 7}",
             "event": f"Outage {i % 3}"}
            for i in range(start, start + n)
        ]
    }


def _source(mock: MockAccoilServer, rate: float, concurrency: int) -> Source:
    return Source(write_key=WRITE_KEY, accoil_api_key=API_KEY, base_url=mock.url,
                  rate_per_second=rate, max_concurrency=concurrency, name="main")


MAX_STALL = 0.3  # seconds the gateway's event loop may go without running a task


class LoopLag:
    """Measures the longest stall of the running event loop (the in-process gateway's)."""

    def __init__(self, tick: float = 0.02) -> None:
        self.tick = tick
        self.max = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.tick)
            self.max = max(self.max, time.monotonic() - before - self.tick)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _max_in_window(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _send_until_accepted(
    gw: Running, body: dict[str, Any], refusals: list[float], stop_at: float
) -> None:
    """What a Segment SDK does with a 503: wait Retry-After, send the same batch again."""
    while True:
        status, reply = await gw.post("/v1/batch", body)
        if status == 200:
            assert reply == {"success": True}, reply
            return
        assert status == 503, (status, reply)
        refusals.append(time.monotonic())
        assert time.monotonic() < stop_at, "ingest never took the batch back"
        await asyncio.sleep(0.2)


async def test_outage_bounds_backlog_then_drains_at_rate_cap(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    rate, concurrency, bound, batch, total = 50.0, 4, 150, 25, 300
    settings = settings_for(
        mock_accoil.url, tmp_path, sources=[_source(mock_accoil, rate, concurrency)],
        max_backlog=bound, retry_after=1, circuit_cooldown=0.2, retry_base=0.05, retry_max=0.3,
    )
    mock_accoil.add_fault(503)
    async with running(settings) as gw, LoopLag() as lag:
        # 1. Accoil answers 503: ingest keeps taking events until the backlog is full
        accepted = 0
        while True:
            status, reply = await gw.post("/v1/batch", _batch(accepted, batch, "o"))
            if status != 200:
                break
            accepted += batch
            assert accepted <= bound + batch, "ingest went past its backlog bound"
        assert status == 503, reply
        assert accepted >= bound, f"refused at {accepted} events, bound is {bound}"
        async with gw.http.post(
            gw.url + "/v1/batch", json=_batch(accepted, batch, "o"),
            headers={"Authorization": basic(WRITE_KEY)},
        ) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
        async with gw.http.get(gw.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "backlog full"
        await mock_accoil.wait_calls_async(1, status=503, within=5)

        # 2. the rest of the traffic keeps coming, as SDKs retry; Accoil now drops connections
        refusals: list[float] = []
        outage_end = time.monotonic() + 60
        senders = [
            asyncio.create_task(_send_until_accepted(gw, _batch(i, batch, "o"), refusals, outage_end))
            for i in range(accepted, total, batch)
        ]
        mock_accoil.clear_faults()
        mock_accoil.add_fault(drop=True)
        # the circuit is open by now and probes at a growing interval: wait for a probe
        deadline = time.monotonic() + 15
        while True:
            await asyncio.sleep(0.2)
            journal = await asyncio.to_thread(mock_accoil.calls)
            dropped = sum(1 for c in journal if c["status"] is None)
            if dropped:
                break
            assert time.monotonic() < deadline, "the gateway stopped trying during the outage"
        assert not any(t.done() for t in senders), "ingest accepted past the bound"
        assert len(await asyncio.to_thread(mock_accoil.counts)) == 0

        # 3. Accoil is back: everything drains, at no more than the rate cap
        seq_before = journal[-1]["seq"] if journal else 0
        mock_accoil.clear_faults()
        back = time.monotonic()
        await asyncio.gather(*senders)
        await gw.idle(timeout=60)
        drain_seconds = time.monotonic() - back

    after = [c for c in await asyncio.to_thread(mock_accoil.calls, since=seq_before)]
    delivered = sorted(_seconds(c) for c in after if c["status"] == 202)
    counted: Counter[str] = Counter()
    for row in await asyncio.to_thread(mock_accoil.counts, api_key=API_KEY):
        counted[row["event"]] += row["count"]
    span = delivered[-1] - delivered[0]
    mean_rate = (len(delivered) - 1) / span
    burst = max(1, int(rate * BURST))
    busiest_second = _max_in_window(delivered, 1.0)
    figures = {
        "rate_per_second": rate,
        "max_backlog": bound,
        "events_sent": total,
        "accepted_before_full": accepted,
        "accepted_total": sum(counted.values()),
        "refused_503_while_full": len(refusals) + 1,
        "upstream_503": len([c for c in journal if c["status"] == 503]),
        "upstream_dropped": dropped,
        "forwarded_after_recovery": len(delivered),
        "drain_seconds": round(drain_seconds, 2),
        "drain_rate_mean": round(mean_rate, 1),
        "drain_rate_busiest_1s": busiest_second,
        "lost": total - sum(counted.values()),
        "max_event_loop_stall_seconds": round(lag.max, 3),
    }
    record("upstream_outage", figures)
    assert sum(counted.values()) == total, figures  # every event, once
    assert len(delivered) == total, figures
    assert mean_rate <= rate * 1.05, figures
    assert busiest_second <= rate + burst + concurrency, figures
    assert lag.max < MAX_STALL, f"event loop stalled {lag.max:.3f}s while Accoil was down"


async def test_429_retry_after_is_honoured(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # One ledger row of many occurrences, a modest rate and a slow 429: when the 429 comes
    # back, calls are waiting for the rate cap behind it, and they must wait out Retry-After too.
    rate, concurrency, events, retry_after, latency = 5.0, 4, 12, 1, 0.3
    settings = settings_for(
        mock_accoil.url, tmp_path, sources=[_source(mock_accoil, rate, concurrency)],
        retry_base=0.01, retry_max=0.05,
    )
    body = {"batch": [{"type": "track", "messageId": f"r-{i}", "userId": "u", "event": "Limited"}
                      for i in range(events)]}
    async with running(settings) as gw, LoopLag() as lag:
        mock_accoil.add_fault(429, retry_after=retry_after, count=1, latency=latency)
        status, _ = await gw.post("/v1/batch", body)
        assert status == 200
        await gw.idle(timeout=30)

    calls = await asyncio.to_thread(mock_accoil.calls)
    limited = [c for c in calls if c["status"] == 429]
    assert len(limited) == 1
    # the gateway reads the 429 `latency` after the mock journals it
    answered = _seconds(limited[0]) + latency
    after = [_seconds(c) - answered for c in calls if c["seq"] > limited[0]["seq"]]
    on_the_wire = [d for d in after if d < 0.03]
    too_early = [round(d, 3) for d in after if 0.03 <= d < retry_after - 0.005]
    first_after = min((d for d in after if d >= 0.03), default=None)
    counted = sum(r["count"] for r in await asyncio.to_thread(mock_accoil.counts, api_key=API_KEY))
    record("retry_after_429", {
        "retry_after": retry_after,
        "calls_in_flight_with_the_429": len(on_the_wire),
        "calls_before_retry_after": len(too_early),
        "first_call_after_429_seconds": None if first_after is None else round(first_after, 3),
        "events": events,
        "counted": counted,
        "max_event_loop_stall_seconds": round(lag.max, 3),
    })
    assert len(on_the_wire) < concurrency
    assert not too_early, f"calls {too_early} s after a 429 with Retry-After: {retry_after}"
    assert counted == events
    # the pause is a wait, not a spin: ingest and health checks go on meanwhile
    assert lag.max < MAX_STALL, f"event loop stalled {lag.max:.3f}s"
