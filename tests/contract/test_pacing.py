"""Forwarding finds the pace of a rate-limited Accoil it is not told about.

mock_accoil's capacity fault takes N calls a second, each answered after a latency, and
answers 429 with Retry-After past it. The gateway, with default settings (no caps), must
settle its limit inside a band around what that capacity takes in flight (Little's law:
calls a second x round trip), keep 429s rare and deliver every event once. The band is
asserted, not a time: the machine may be busy.

The test holds only if the gateway can offer more than the capacity: a limit that Accoil
never refuses has nothing to find. On a busy machine (CI's two cores, or two busy loops
beside the suite) the worker at its default priority (`pipeline_nice` 10) gets a tenth of a
core's share: about 40 calls a second at load 4 and 15 at load 8 were measured, below the
150 this test once asked for, so the limit was never cut and the test failed for the
machine's sake. Here the worker runs at the test's priority (as in every test's gateway
since), and the capacity is 60 calls a
second with a 0.1 s latency: the same calls in flight (about 6), a third of the rate, and a
round trip in which a busy process's own delay weighs less.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path
from statistics import median

import pytest

from mock_accoil.server import MockAccoilServer
from tests.contract.harness import running, settings_for
from tests.contract.test_process import ADMIN, admin_get, gateway_process, post_batch

RATE = 60.0
LATENCY = 0.1
# 500 track occurrences: one call each in exact mode, a user's calls one at a time, so
# that at most USERS calls are in flight: well above what the capacity takes
USERS, PER_USER = 20, 25


def batches(tag: str) -> list[list[dict[str, object]]]:
    events: list[dict[str, object]] = [
        {"type": "track", "messageId": f"{tag}-{u}-{i}", "userId": f"{tag}-u{u}",
         "event": "Paced"}
        for u in range(USERS) for i in range(PER_USER)
    ]
    return [events[i:i + 100] for i in range(0, len(events), 100)]


def check(
    mock: MockAccoilServer, tag: str, samples: list[tuple[float, float, float | None]]
) -> None:
    """`samples`: (seconds since the start, the limit, the limiter's baseline round trip)."""
    settled = [limit for t, limit, _ in samples if t > 3.0]
    assert len(settled) >= 10, samples
    # what the capacity takes in flight (Little's law) at the round trip the gateway sees:
    # the mock's latency and the machine's delay, which a busy machine makes no longer small
    rtt = median(r for t, _, r in samples if t > 3.0 and r is not None)
    assert rtt >= LATENCY, samples
    needed = RATE * rtt
    assert 0.5 * needed <= min(settled) and max(settled) <= 2.5 * needed, (needed, samples)
    assert 0.7 * needed <= median(settled) <= 1.6 * needed, (needed, samples)
    calls = mock.calls(path="/v2/track")
    refused = sum(1 for c in calls if c["status"] == 429)
    assert refused <= 0.05 * len(calls), (refused, len(calls))
    # every occurrence counted once: none lost to a 429, none sent twice
    for u in range(USERS):
        assert mock.count(f"{tag}-u{u}", "Paced") == PER_USER


@pytest.mark.inline  # reads the limiter in the test's process
async def test_inline_limit_settles_near_the_capacity(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    mock_accoil.set_capacity(RATE, latency=LATENCY)
    settings = settings_for(mock_accoil.url, tmp_path)
    async with running(settings) as gw:
        for batch in batches("in"):
            status, _ = await gw.post("/v1/batch", {"batch": batch})
            assert status == 200
        limiter = gw.gateway.forwarders["main"].limiter
        samples: list[tuple[float, float, float | None]] = []
        t0 = time.monotonic()
        while sum(r["count"] for r in await asyncio.to_thread(mock_accoil.counts)) < (
            USERS * PER_USER
        ):
            assert time.monotonic() - t0 < 60, "not drained in a minute"
            samples.append((time.monotonic() - t0, limiter.limit.limit, limiter.limit.long_rtt))
            await asyncio.sleep(0.1)
        await gw.idle(timeout=30)
    check(mock_accoil, "in", samples)


def test_process_limit_settles_near_the_capacity(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    mock_accoil.set_capacity(RATE, latency=LATENCY)
    # the worker at the priority of the test's own processes (`gateway_process`, see above)
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN}
    with gateway_process(mock_accoil.url, tmp_path, env_extra=env) as (_, url):
        for batch in batches("pr"):
            assert post_batch(url, batch) == 200
        samples: list[tuple[float, float, float | None]] = []
        t0 = time.monotonic()
        while True:
            stats = json.loads(admin_get(url, "/admin/stats"))
            pace = stats["sources"][0]["forwarding"]
            assert pace["max_concurrency"] is None and pace["rate_per_second"] is None
            baseline = pace["rtt_baseline_ms"]
            samples.append((time.monotonic() - t0, float(pace["limit"]),
                            None if baseline is None else baseline / 1000))
            if stats["outbox_calls"] == 0 and stats["inbox_messages"] == 0 and samples[-1][0] > 1:
                break
            assert time.monotonic() - t0 < 60, "not drained in a minute"
            time.sleep(0.1)
        assert pace["answered_429"] == sum(
            1 for c in mock_accoil.calls(path="/v2/track") if c["status"] == 429)
        # the worker's series reach the front's /metrics: the limit, calls in flight, cuts
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        limit = re.search(r'^accoil_gateway_forward_limit\{source="(src_\w+)"\} (\S+)$', text, re.M)
        assert limit is not None and float(limit[2]) == pytest.approx(pace["limit"], abs=0.01)
        assert f'accoil_gateway_forward_in_flight{{source="{limit[1]}"}} 0.0' in text
        cuts = sum(pace["cuts"].values())
        assert cuts >= 1  # the capacity was found by running into it
        assert sum(float(v) for v in re.findall(
            r'^accoil_gateway_forward_limit_cuts_total\{[^}]*\} (\S+)$', text, re.M)) == cuts
    check(mock_accoil, "pr", samples)
