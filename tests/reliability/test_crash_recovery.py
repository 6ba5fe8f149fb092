"""Crash recovery: SIGKILL the gateway at random points while traffic flows, restart it on
the same data directory, and check that Accoil counted every acknowledged event exactly once.

The client behaves like a Segment SDK: a batch that fails (connection error, 5xx) is sent
again, unchanged, with the same messageIds, until it gets a 200. The only duplicates the
design allows are calls that were on the wire to Accoil when the process died (delivery is
at-least-once), so they must not exceed `max_concurrency` per kill; no event may be lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mock_accoil.server import MockAccoilServer
from tests.reliability.reliability_support import (
    API_KEY,
    WRITE_KEY,
    GatewayProcess,
    basic,
    gateway_env,
    record,
)


@dataclass
class Plan:
    kills: int
    events: int
    send_seconds: float  # the events are spread over this long
    batch: int = 20
    senders: int = 4
    users: int = 12
    accounts: int = 4
    max_concurrency: int = 4
    rate_per_second: float = 250.0
    upstream_latency: float = 0.005  # keeps calls on the wire when a kill lands
    gap: tuple[float, float] = (0.8, 2.2)  # seconds between a restart and the next kill


def _messages(plan: Plan, seed: int) -> list[dict[str, Any]]:
    """Track and page events with unique messageIds; half have an event name of their own."""
    now = datetime.now(UTC).isoformat()
    out = []
    for i in range(plan.events):
        msg: dict[str, Any] = {
            "messageId": f"crash-{seed}-{i}",
            "userId": f"user-{i % plan.users}",
            "timestamp": now,
            "context": {"groupId": f"acct-{(i // plan.users) % plan.accounts}"},
        }
        if i % 10 == 9:
            msg |= {"type": "page", "name": f"Screen {i % 3}"}
        elif i % 2:
            msg |= {"type": "track", "event": f"Unique {seed}-{i}"}
        else:
            msg |= {"type": "track", "event": f"Shared {i % 5}"}
        out.append(msg)
    return out


def _counted_as(msg: dict[str, Any]) -> tuple[str, str]:
    event = msg["event"] if msg["type"] == "track" else f"Page Viewed {msg['name']}"
    return msg["userId"], event


@dataclass
class ClientStats:
    requests: int = 0
    ok: int = 0
    accepted_events: int = 0
    connection_errors: int = 0
    retried_batches: int = 0
    retried_events: int = 0
    server_errors: int = 0


async def _send_all(
    gw: GatewayProcess, batches: list[list[dict[str, Any]]], plan: Plan, stats: ClientStats
) -> None:
    queue: asyncio.Queue[tuple[int, list[dict[str, Any]]]] = asyncio.Queue()
    for item in enumerate(batches):
        queue.put_nowait(item)
    started = time.monotonic()
    spacing = plan.send_seconds / len(batches)
    headers = {"Authorization": basic(WRITE_KEY), "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=15)

    async def sender(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index, batch = queue.get_nowait()
            await asyncio.sleep(max(0.0, started + index * spacing - time.monotonic()))
            body = json.dumps({"batch": batch, "sentAt": datetime.now(UTC).isoformat()})
            attempts = 0
            while True:
                attempts += 1
                stats.requests += 1
                try:
                    async with session.post(
                        gw.url + "/v1/batch", data=body, headers=headers, timeout=timeout
                    ) as resp:
                        reply = await resp.json(content_type=None)
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    # the gateway died under this request, or is not back yet: as an SDK
                    # does, send the same batch again
                    stats.connection_errors += 1
                    await asyncio.sleep(0.05)
                    continue
                if status == 200:
                    assert not reply.get("rejected"), reply
                    stats.ok += 1
                    stats.accepted_events += len(batch)
                    if attempts > 1:
                        stats.retried_batches += 1
                        stats.retried_events += len(batch)
                    break
                assert status >= 500 or status == 429, (status, reply)
                stats.server_errors += 1
                await asyncio.sleep(0.1)

    # one connection per sender, fresh after each failure, like the SDKs' pools
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=plan.senders)) as s:
        await asyncio.gather(*(sender(s) for _ in range(plan.senders)))


async def _kill_loop(
    gw: GatewayProcess, plan: Plan, rng: random.Random, kill_times: list[float]
) -> None:
    for _ in range(plan.kills):
        await asyncio.sleep(rng.uniform(*plan.gap))
        kill_times.append(time.time())
        await asyncio.to_thread(gw.kill)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        await asyncio.to_thread(gw.start)


def _journal_seconds(call: dict[str, Any]) -> float:
    return datetime.fromisoformat(call["time"].replace("Z", "+00:00")).timestamp()


async def run_crash_scenario(
    mock: MockAccoilServer, tmp_path: Path, plan: Plan, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    messages = _messages(plan, seed)
    batches = [messages[i : i + plan.batch] for i in range(0, len(messages), plan.batch)]
    mock.add_fault(latency=plan.upstream_latency)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = gateway_env(
        base_url=mock.url,
        ACCOIL_RATE_PER_SECOND=str(plan.rate_per_second),
        ACCOIL_MAX_CONCURRENCY=str(plan.max_concurrency),
        GATEWAY_RETRY_BASE="0.05",
        GATEWAY_RETRY_MAX="0.5",
        GATEWAY_CIRCUIT_COOLDOWN="0.2",
        GATEWAY_ACTOR_IDLE="2",
    )
    gw = GatewayProcess(data_dir, env, flush_interval=0.1)
    stats = ClientStats()
    kill_times: list[float] = []
    try:
        await asyncio.to_thread(gw.start)
        t0 = time.monotonic()
        await asyncio.gather(_send_all(gw, batches, plan, stats), _kill_loop(gw, plan, rng, kill_times))
        sent_seconds = time.monotonic() - t0
        drain = await asyncio.to_thread(gw.wait_drained, 120.0)
        dead = await asyncio.to_thread(gw.stats)
        exit_code = await asyncio.to_thread(gw.terminate)
        log = gw.log()
    finally:
        gw.close()

    expected = Counter(_counted_as(m) for m in messages)
    observed: Counter[tuple[str, str]] = Counter()
    for row in await asyncio.to_thread(mock.counts, api_key=API_KEY):
        observed[(row["userId"], row["event"])] += int(row["count"])
    lost = sum(max(0, n - observed[k]) for k, n in expected.items())
    duplicated = sum(max(0, n - expected[k]) for k, n in observed.items())
    unexpected = sorted(k for k in observed if k not in expected)
    doubled = sorted(k[1] for k, n in observed.items() if k[1].startswith("Unique") and n > 1)

    calls = await asyncio.to_thread(mock.calls)
    delivered = [c for c in calls if c["status"] == 202]
    # a call is possibly on the wire at a kill when the mock got it within the injected
    # latency (plus scheduling slack) before the kill
    window = plan.upstream_latency + 0.02
    times = [_journal_seconds(c) for c in delivered]
    near_kills = sum(1 for k in kill_times for t in times if k - window <= t <= k)

    figures = {
        "seed": seed,
        "kills": len(kill_times),
        "gateway_starts": gw.starts,
        "events_sent": len(messages),
        "events_accepted": stats.accepted_events,
        "requests": stats.requests,
        "connection_failures": stats.connection_errors,
        "batches_resent_after_failure": stats.retried_batches,
        "events_resent_after_failure": stats.retried_events,
        "server_errors": stats.server_errors,
        "upstream_calls": len(calls),
        "upstream_calls_delivered": len(delivered),
        "events_counted_by_accoil": sum(observed.values()),
        "lost": lost,
        "duplicated": duplicated,
        "duplicate_bound": plan.kills * plan.max_concurrency,
        "calls_near_kills": near_kills,
        "send_seconds": round(sent_seconds, 2),
        "drain_seconds_after_last_send": round(drain, 2),
        "dead_letters": dead["dead_letters"],
        "sigterm_exit_code": exit_code,
    }
    assert stats.accepted_events == len(messages), figures
    assert "Traceback" not in log, log[-4000:]
    assert not unexpected, unexpected[:10]
    assert lost == 0, figures
    assert duplicated <= plan.kills * plan.max_concurrency, (figures, doubled[:20])
    assert dead["dead_letters"] == 0, figures
    assert len(kill_times) == plan.kills
    assert exit_code == 0, log[-3000:]
    return figures


def _seed() -> int:
    return int(os.environ.get("RELIABILITY_SEED", random.randrange(1 << 30)))


async def test_kill_restart_loses_nothing(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    plan = Plan(kills=5, events=2400, send_seconds=9.0)
    record("crash_recovery_short", await run_crash_scenario(mock_accoil, tmp_path, plan, _seed()))


@pytest.mark.slow
async def test_kill_restart_many_times(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    plan = Plan(kills=25, events=16000, send_seconds=45.0, gap=(0.3, 2.5), users=40, accounts=10)
    record("crash_recovery_long", await run_crash_scenario(mock_accoil, tmp_path, plan, _seed()))
