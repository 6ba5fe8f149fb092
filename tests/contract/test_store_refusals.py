"""When the store refuses writes (issue 12): outcomes held, never re-sent; a full data folder
refuses ingest and says why, and resumes by itself (in-process gateway)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway import disk
from gateway.store import OutboxItem, SqliteStore
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import WRITE_KEY, basic, running, settings_for

TS = "2026-11-20T10:00:00.000Z"


# both look inside the gateway's process: the store, the forwarder, the disk monitor
pytestmark = pytest.mark.inline


def _track(i: int) -> dict[str, Any]:
    # a few event names shared by many messages: ledger rows that stand for several calls
    return {"type": "track", "messageId": f"oc-{i}", "userId": f"u{i % 3}",
            "event": f"Event {i % 4}", "timestamp": TS}


async def test_refused_outcome_writes_are_kept_not_resent(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    settings = settings_for(mock_accoil.url, tmp_path, retry_base=0.01)
    async with running(settings) as gw:
        store = gw.gateway.store
        real = store.delivered
        refused = 0
        refusing = asyncio.Event()
        refusing.set()

        async def delivered(item: OutboxItem) -> None:
            nonlocal refused
            if refusing.is_set():
                refused += 1
                raise sqlite3.OperationalError("database or disk is full")
            await real(item)

        store.delivered = delivered  # type: ignore[method-assign]
        status, _ = await gw.post("/v1/batch", {"batch": [_track(i) for i in range(40)]})
        assert status == 200
        fwd = gw.gateway.forwarders["main"]
        while refused < 10:  # noqa: ASYNC110 (counted by a patched store method)
            await asyncio.sleep(0.01)
        # while the store refuses, the forwarder holds the outcomes and sends nothing new
        assert fwd.recorder.blocked
        sent = len(mock_accoil.calls())
        await asyncio.sleep(0.5)
        assert len(mock_accoil.calls()) == sent
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
        assert f'accoil_gateway_outcomes_waiting{{source="main"}} {float(fwd.recorder.waiting)}' in metrics
        assert fwd.recorder.waiting >= 1
        refusing.clear()
        await gw.idle()
        assert not fwd.recorder.blocked
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
    assert 'accoil_gateway_outcomes_waiting{source="main"} 0.0' in metrics
    calls = mock_accoil.calls()
    assert len(calls) == 40, f"{len(calls)} calls for 40 events: a refused outcome was resent"
    for u in range(3):
        for e in range(4):
            expected = sum(1 for i in range(40) if i % 3 == u and i % 4 == e)
            assert mock_accoil.count(f"u{u}", f"Event {e}") == expected


async def test_inline_full_data_folder_refuses_ingest_and_says_why(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the disk monitor looks for room every 0.1 s, and this disk has room: until the checks of
    # the full state are done it is shown none, or on a loaded machine it can make the reserve
    # again between two of them
    room = False
    real_free_bytes = disk.free_bytes
    monkeypatch.setattr(disk, "free_bytes", lambda d: real_free_bytes(d) if room else 0)
    settings = settings_for(mock_accoil.url, tmp_path, disk_reserve=1 << 20)
    async with running(settings) as gw:
        assert (tmp_path / "reserve").stat().st_size == 1 << 20
        # the store is refused a write for want of space (as SQLite or the inbox report it)
        gw.gateway.disk.refused(sqlite3.OperationalError("database is locked"), "gateway.db")
        assert not gw.gateway.disk.full  # not a space error
        gw.gateway.disk.refused(OSError(errno.ENOSPC, "No space left on device"), "inbox")
        assert not (tmp_path / "reserve").exists()
        async with gw.http.get(gw.url + "/readyz") as resp:
            assert (resp.status, await resp.json()) == (
                503, {"ready": False, "reason": "data folder full"})
        async with gw.http.post(
            gw.url + "/v1/batch", json={"batch": [_track(1)]}, headers={"Authorization": basic(WRITE_KEY)}
        ) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == str(settings.retry_after)
            assert (await resp.json())["error"] == "data folder full: retry later"
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
        assert "accoil_gateway_disk_full 1.0" in metrics
        status, stats = await gw.admin("GET", "/admin/stats")
        assert (status, stats["data_folder_full"]) == (200, True)
        # this disk has room: the reserve is made again and ingest resumes by itself
        room = True
        for _ in range(100):
            async with gw.http.get(gw.url + "/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert (tmp_path / "reserve").stat().st_size == 1 << 20
        status, _ = await gw.post("/v1/batch", {"batch": [_track(2)]})
        assert status == 200
        await gw.idle()
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
    assert "accoil_gateway_disk_full 0.0" in metrics
    assert mock_accoil.count("u2", "Event 2") == 1


async def test_a_start_on_a_full_disk_applies_once_the_inbox_can_be_restarted(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a start on a full disk cannot reset the inbox's progress (a write): the gateway must come
    # up all the same, and apply nothing until the reset goes through, then everything once
    real = SqliteStore.restart_inbox
    refusals = 0

    async def restart_inbox(self: SqliteStore) -> None:
        nonlocal refusals
        if refusals < 3:
            refusals += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        await real(self)

    monkeypatch.setattr(SqliteStore, "restart_inbox", restart_inbox)
    settings = settings_for(mock_accoil.url, tmp_path)
    async with running(settings) as gw:
        assert refusals == 1, "the start went on after a refused reset"
        status, _ = await gw.post("/v1/batch", {"batch": [_track(i) for i in range(12)]})
        assert status == 200
        await gw.idle()
        assert refusals == 3
    for u in range(3):
        for e in range(4):
            expected = sum(1 for i in range(12) if i % 3 == u and i % 4 == e)
            assert mock_accoil.count(f"u{u}", f"Event {e}") == expected
