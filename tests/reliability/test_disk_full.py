"""A full disk (issue 12): the data folder on a small tmpfs, filled while Accoil is down.

`python -m gateway serve` (two processes, the default) keeps its data folder on a tmpfs that
also holds a ballast file. Accoil answers 503 while a client sends uniquely identified track
events until the disk is full; then Accoil comes back while the disk stays full (the
gateway must drain what it can with its reserve, and must not send a call twice because
recording its outcome failed); then the ballast is deleted. The client behaves like a
Segment SDK: a batch refused with 503 is sent again, unchanged, until it gets a 200.

Checked: every acknowledged event is counted by Accoil exactly once; no reply is a 500 and
every 503 carries Retry-After; `/readyz` says `data folder full` while full and is ready
again after; `accoil_gateway_disk_full` follows; one warning per change in the log, not a
line per refused write; no traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.disk import NAME, Disk
from gateway.forward.circuit import MAX_COOLDOWN
from mock_accoil.server import MockAccoilServer
from tests.reliability.reliability_support import (
    WRITE_KEY,
    GatewayProcess,
    basic,
    fill,
    gateway_env,
    http,
    record,
    small_disk,
)

MB = 1024 * 1024
TS = "2026-11-30T12:00:00.000Z"


@dataclass
class Plan:
    disk_mb: int
    ballast_mb: int
    reserve_mb: int
    batch: int = 50
    pad: int = 600  # bytes of properties a message carries (the inbox keeps them)
    users: int = 20
    events: int = 500  # event names: ledger rows that stand for several calls
    pace: float = 0.07  # seconds between batches: the actors fill the outbox meanwhile
    squeeze: bool = False  # once full, take every byte left too (no room for any write)
    restart: bool = False  # SIGKILL the gateway while full, and start it again on the full disk
    outage_grace: float = 3.0  # seconds of 503s in a row that mean "full"
    full_phase: float = 6.0  # seconds Accoil is back while the disk stays full


@dataclass
class Client:
    url: str
    plan: Plan
    sent: int = 0
    acked: Counter[tuple[str, str]] = field(default_factory=Counter)
    acked_events: int = 0
    refused: list[list[dict[str, Any]]] = field(default_factory=list)  # to send again
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    no_retry_after: int = 0

    def batch(self) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.plan.batch):
            i = self.sent
            self.sent += 1
            out.append({
                "type": "track", "messageId": f"full-{i}", "userId": f"u{i % self.plan.users}",
                "event": f"Filled {i % self.plan.events}", "timestamp": TS,
                "properties": {"pad": "x" * self.plan.pad},
            })
        return out

    def post(self, batch: list[dict[str, Any]]) -> int:
        status, headers, body = http(
            "POST", self.url + "/v1/batch", json.dumps({"batch": batch}).encode(),
            {"Content-Type": "application/json", "Authorization": basic(WRITE_KEY)},
        )
        self.statuses[status] += 1
        if status == 200:
            for msg in batch:
                self.acked[(msg["userId"], msg["event"])] += 1
            self.acked_events += len(batch)
        elif status == 503:
            self.reasons[json.loads(body).get("error", "")] += 1
            if "Retry-After" not in headers:
                self.no_retry_after += 1
        return status


def _ready(url: str) -> tuple[int, dict[str, Any]]:
    status, _, body = http("GET", url + "/readyz")
    return status, json.loads(body)


def _gauge(url: str, name: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _counted(mock: MockAccoilServer) -> Counter[tuple[str, str]]:
    got: Counter[tuple[str, str]] = Counter()
    for row in mock.counts():
        got[(row["userId"], row["event"])] += int(row["count"])
    return got


def _fill_up(client: Client, plan: Plan, started: float) -> None:
    """Send until ingest has refused everything for `outage_grace` seconds."""
    last_ok = time.monotonic()
    while time.monotonic() - last_ok < plan.outage_grace:
        # like an SDK's queue: a refused batch is sent again before anything newer
        batch = client.refused.pop(0) if client.refused else client.batch()
        if client.post(batch) == 200:
            last_ok = time.monotonic()
            time.sleep(plan.pace)
        else:
            client.refused.insert(0, batch)
            time.sleep(0.05)
        assert time.monotonic() - started < 240, "the disk never filled"


def _run(plan: Plan, mock: MockAccoilServer, tmp_path: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"disk_mb": plan.disk_mb, "ballast_mb": plan.ballast_mb,
                               "reserve_mb": plan.reserve_mb}
    with small_disk(tmp_path / "disk", plan.disk_mb) as mnt:
        ballast = mnt / "ballast"
        ballast.write_bytes(bytes(plan.ballast_mb * MB))
        env = gateway_env(
            base_url=mock.url, ACCOIL_RATE_PER_SECOND="2000", ACCOIL_MAX_CONCURRENCY="8",
            GATEWAY_DISK_RESERVE=str(plan.reserve_mb * MB), GATEWAY_RETRY_MAX="1",
            GATEWAY_CIRCUIT_COOLDOWN="0.5",
        )
        gw = GatewayProcess(mnt / "data", env, flush_interval=0.2)
        gw.log_path = tmp_path / "gateway.log"  # not on the disk being filled
        mock.add_fault(503)
        gw.start()
        try:
            client = Client(gw.url, plan)
            started = time.monotonic()
            # 1. Accoil down: send until the disk is full (503s for a while, readiness false)
            _fill_up(client, plan, started)
            figures["fill_s"] = round(time.monotonic() - started - plan.outage_grace, 1)
            figures["acked_while_filling"] = client.acked_events
            ready, why = _ready(gw.url)
            assert (ready, why) == (503, {"ready": False, "reason": "data folder full"})
            assert _gauge(gw.url, "accoil_gateway_disk_full") == 1.0
            assert client.reasons["data folder full: retry later"] > 0, client.reasons

            # 2. Accoil back, the disk still full: what is queued drains with the reserve
            stats = gw.stats()
            assert stats["data_folder_full"] is True
            figures["outbox_when_full"] = stats["outbox_calls"]
            filler = mnt / "filler"
            if plan.squeeze:
                figures["squeezed_bytes"] = fill(filler)
            mock.clear_faults()
            before = sum(_counted(mock).values())
            back = time.monotonic()
            # the circuit, open since the outage, probes Accoil at growing intervals: wait for
            # the drain to start, then let it run a while, the disk full all along. Without a
            # reserve nothing need drain: once one outcome cannot be written (the probe's 503,
            # say, if it came before Accoil was back), forwarding waits for space, by design
            deadline = None if plan.reserve_mb else back + plan.full_phase
            figures["refilled"] = 0
            while deadline is None or time.monotonic() < deadline:
                if deadline is None and sum(_counted(mock).values()) > before:
                    deadline = time.monotonic() + plan.full_phase
                # after a long outage the circuit's next probe may be a whole cooldown away
                # (it doubles up to MAX_COOLDOWN; a slow fill makes the outage long)
                assert time.monotonic() - back < MAX_COOLDOWN + 30, (
                    "nothing drained on the full disk")
                ready, why = _ready(gw.url)
                if ready == 200 and figures["refilled"] < 3:
                    # the gateway made room by itself: the inbox segment that filled up was
                    # applied (just before the actors held) and reaped. Fill it up again
                    figures["refilled"] += 1
                    _fill_up(client, plan, time.monotonic())
                    continue
                assert ready == 503 and why["reason"] == "data folder full", why
                # the SDK retries a refused batch; a full folder still refuses it
                assert client.post(client.refused[0]) == 503
                time.sleep(0.2)
            counted_full = _counted(mock)
            figures["counted_while_full"] = sum(counted_full.values()) - before
            over = {k: n for k, n in counted_full.items() if n > client.acked[k]}
            assert not over, f"counted more than acknowledged while full: {over}"
            if plan.restart:
                # a crash on the full disk, and a start on it: it must come up, say why it
                # is not ready, and lose nothing (calls on the wire at the kill may go twice)
                gw.kill()
                figures["squeezed_at_restart"] = fill(filler)
                gw.start()
                ready, why = _ready(gw.url)
                assert (ready, why) == (503, {"ready": False, "reason": "data folder full"})
                assert client.post(client.refused[0]) == 503

            # 3. space returns: ready again, the refused batches go through, all drains
            freed_at = time.monotonic()
            ballast.unlink()
            filler.unlink(missing_ok=True)
            while _ready(gw.url)[0] != 200:
                assert time.monotonic() - freed_at < 30, "not ready after the space returned"
                time.sleep(0.05)
            figures["ready_after_free_s"] = round(time.monotonic() - freed_at, 2)
            assert _gauge(gw.url, "accoil_gateway_disk_full") == 0.0
            while client.refused:
                batch = client.refused[0]
                if client.post(batch) == 200:
                    client.refused.pop(0)
                else:
                    time.sleep(0.1)
                assert time.monotonic() - freed_at < 120, "refused batches still refused"
            figures["drain_s"] = round(gw.wait_drained(60), 1)
            exit_code = gw.terminate()
        finally:
            gw.close()
    counted = _counted(mock)
    log = gw.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    events = Counter(str(line.get("event")) for line in lines)
    figures.update(
        events_sent=client.sent, events_acked=client.acked_events,
        events_counted=sum(counted.values()),
        lost=sum(max(0, n - counted[k]) for k, n in client.acked.items()),
        duplicated=sum(max(0, counted[k] - n) for k, n in client.acked.items()),
        replies=dict(sorted(client.statuses.items())),
        refusals=dict(client.reasons), exit_code=exit_code,
        full_warnings=events["data folder full: space reserve released for outcomes and"
                             " deletions; ingest answers 503 until space returns"],
        restored=events["data folder has space again: reserve restored, ingest resumes"],
        outcome_holds=events[
            "recording call outcomes failed; forwarding paused until the store takes them"],
        log_lines=len(lines),
    )
    assert client.sent == client.acked_events, "every event sent was acknowledged in the end"
    # duplicates only from calls on the wire at a kill: at most max_concurrency (8)
    assert figures["lost"] == 0 and figures["duplicated"] <= (8 if plan.restart else 0), (
        f"lost {figures['lost']}, duplicated {figures['duplicated']}"
    )
    assert set(counted) == set(client.acked)
    assert 500 not in client.statuses and client.no_retry_after == 0, client.statuses
    # one warning per change, however many writes were refused: each "full" is answered by
    # one "space again". The folder may fill and free itself several times at the margin
    # (the drain after the space returned, a slow machine reaping late: 11 times seen on a
    # loaded CI run), while a line per refused write would be thousands
    assert figures["restored"] == figures["full_warnings"] >= 1, figures
    assert figures["full_warnings"] <= 25, figures
    assert events["forwarding failed"] == 0 and events["flush failed"] == 0, events.most_common(5)
    assert events["commit failed"] == 0 and events["store write failed"] == 0
    assert "Traceback" not in log
    assert exit_code == 0
    return figures


def test_full_disk(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    plan = Plan(disk_mb=16, ballast_mb=6, reserve_mb=1, pad=1500, full_phase=4.0)
    record("disk_full", _run(plan, mock_accoil, tmp_path))


def test_full_disk_without_a_reserve(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # not a byte left once full (no reserve, and the rest taken): whatever the store refuses
    # is held and written once the space returns, never sent twice (the issue's +4.4%)
    plan = Plan(disk_mb=16, ballast_mb=6, reserve_mb=0, pad=1500, full_phase=4.0, squeeze=True)
    record("disk_full_no_reserve", _run(plan, mock_accoil, tmp_path))


def test_restart_on_a_full_disk(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    plan = Plan(disk_mb=16, ballast_mb=6, reserve_mb=1, pad=1500, full_phase=2.0, squeeze=True,
                restart=True)
    record("disk_full_restart", _run(plan, mock_accoil, tmp_path))


@pytest.mark.slow
def test_full_disk_long(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    plan = Plan(disk_mb=24, ballast_mb=8, reserve_mb=2, pad=400, full_phase=10.0, pace=0.02)
    record("disk_full_long", _run(plan, mock_accoil, tmp_path))


async def test_a_full_filesystem_keeps_the_folder_full_until_space_returns(tmp_path: Path) -> None:
    # `gateway.disk` alone, on a real full filesystem: no room for the reserve at start
    with small_disk(tmp_path / "mnt", 8) as mnt:
        data = mnt / "data"
        ballast = mnt / "ballast"
        ballast.write_bytes(bytes(4 * MB))
        fill(mnt / "filler")
        disk = Disk(data, 1 * MB, owner=True)
        disk.start()  # no room for the reserve: full from the start
        assert disk.full and not (data / NAME).exists()
        assert not list(data.glob("*.tmp")), "a reserve that did not fit is not left behind"
        task = asyncio.create_task(disk.run())
        try:
            await asyncio.sleep(0.3)
            assert disk.full  # still no room
            ballast.unlink()  # 4 MB free: room for the reserve twice over and the slack
            for _ in range(100):
                if not disk.full:
                    break
                await asyncio.sleep(0.05)
            assert not disk.full
            assert (data / NAME).stat().st_size == 1 * MB
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
