"""What is deliberately not forwarded: messages turned off by `integrations`, and unnamed
pages (DESIGN 2 and 3). Both are counted, and neither is a dead letter."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Source
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import API_KEY, WRITE_KEY, running, settings_for

TS = "2026-11-20T10:00:00.000Z"


def track(mid: str, event: str, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": mid, "userId": "u1", "event": event, "timestamp": TS,
            **extra}


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_integrations_turn_accoil_off_as_segment_does(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    batch = {
        "batch": [
            track("i1", "Plain"),
            track("i2", "Off", integrations={"All": False}),
            track("i3", "On", integrations={"All": False, "Accoil Analytics": True}),
            track("i4", "Off", integrations={"Accoil Analytics": False}),
            track("i5", "On", integrations={"Accoil Analytics": {"some": "setting"}, "All": False}),
            track("i6", "On", integrations={"Mixpanel": False}),
            {"type": "identify", "messageId": "i7", "userId": "u2", "timestamp": TS,
             "traits": {"email": "x@acme.io"}, "integrations": {"All": False}},
        ],
    }
    # the batch's integrations sit under each message's own
    consent_off = {
        "batch": [track("j1", "Off"), track("j2", "On", integrations={"Accoil Analytics": True})],
        "integrations": {"All": False},
    }
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert await gw.post("/v1/batch", batch) == (200, {"success": True})
        assert await gw.post("/v1/batch", consent_off) == (200, {"success": True})
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        text = await (await gw.http.get(gw.url + "/metrics")).text()
    assert listing["dead_letters"] == []
    assert mock_accoil.count("u1", "Plain") == 1
    assert mock_accoil.count("u1", "On") == 4
    assert mock_accoil.count("u1", "Off") == 0
    assert mock_accoil.calls(path="/v2/identify") == []
    assert metric(text, "accoil_gateway_messages_skipped_total",
                  source="main", reason="integrations") == 4


async def test_unnamed_pages_are_skipped_and_counted(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # what analytics.js's snippet sends: page() with only the page's properties
    pages = {"batch": [
        {"type": "page", "messageId": f"p{i}", "userId": "u1", "timestamp": TS,
         "properties": {"title": "Pricing", "path": "/pricing", "url": "http://x/pricing"}}
        for i in range(5)
    ] + [{"type": "screen", "messageId": "s1", "userId": "u1", "timestamp": TS}]}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert await gw.post("/v1/batch", pages) == (200, {"success": True})
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        text = await (await gw.http.get(gw.url + "/metrics")).text()
    assert listing["dead_letters"] == []
    assert mock_accoil.calls() == []
    assert metric(text, "accoil_gateway_messages_skipped_total", source="main", reason="unnamed") == 6


@pytest.mark.parametrize(("mode", "event"), [("title", "Page Viewed Pricing"),
                                             ("path", "Page Viewed /pricing")])
async def test_unnamed_pages_named_from_their_properties(
    mock_accoil: MockAccoilServer, tmp_path: Path, mode: Any, event: str
) -> None:
    source = Source(write_key=WRITE_KEY, accoil_api_key=API_KEY, base_url=mock_accoil.url,
                    name="main", unnamed_pages=mode)
    page = {"type": "page", "messageId": "p1", "userId": "u1", "timestamp": TS,
            "properties": {"title": "Pricing", "path": "/pricing"}}
    async with running(settings_for(mock_accoil.url, tmp_path, sources=[source])) as gw:
        assert await gw.post("/v1/p", page) == (200, {"success": True})
        await gw.idle()
    assert mock_accoil.count("u1", event) == 1


async def test_created_at_in_either_spelling_reaches_accoil_as_iso(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    batch = {"batch": [
        {"type": "identify", "messageId": "c1", "userId": "u1", "timestamp": TS,
         "traits": {"created_at": 1705312800}},
        {"type": "group", "messageId": "c2", "userId": "u1", "groupId": "acme", "timestamp": TS,
         "traits": {"created_at": "1705312800123", "createdAt": "2024-01-15T12:00:00+02:00"}},
    ]}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert await gw.post("/v1/batch", batch) == (200, {"success": True})
        await gw.idle()
    assert mock_accoil.users()[0]["traits"] == {"created_at": "2024-01-15T10:00:00.000Z"}
    assert mock_accoil.accounts()[0]["traits"] == {
        "created_at": "2024-01-15T10:00:00.123Z", "createdAt": "2024-01-15T10:00:00.000Z"
    }


async def test_the_same_reason_repeated_is_one_dead_letter_with_a_count(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # a browser before login: anonymous-only calls, each its own account actor
    def anon(i: int) -> dict[str, Any]:
        return {"type": "track", "messageId": f"a{i}", "anonymousId": f"anon-{i}",
                "event": "Clicked", "timestamp": TS}

    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        for start in (0, 10, 20):
            body = {"batch": [anon(i) for i in range(start, start + 10)]
                    + [{"type": "track", "messageId": f"bad{start}", "userId": "u1"}]}
            assert (await gw.post("/v1/batch", body))[0] == 200
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
    letters = sorted(listing["dead_letters"], key=lambda d: d["stage"])
    assert [(d["stage"], d["repeat"]) for d in letters] == [("ingest", 3), ("mapping", 30)]
    assert letters[1]["reason"] == "userId is required to forward a track call"
    assert letters[1]["payload"]["messageId"] == "a0"  # the first stands for all
    assert letters[1]["last_at"] >= letters[1]["created_at"]


async def test_dead_letters_are_pruned_after_the_retention(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.pipeline

    monkeypatch.setattr(gateway.pipeline, "HOUSEKEEPING", 0.05)
    anon = {"type": "track", "messageId": "gone", "anonymousId": "a1", "event": "E", "timestamp": TS}
    settings = settings_for(mock_accoil.url, tmp_path, dead_letter_retention=0.5)
    async with running(settings) as gw:
        assert (await gw.post("/v1/batch", {"batch": [anon]}))[0] == 200
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        assert [d["payload"]["messageId"] for d in listing["dead_letters"]] == ["gone"]
        deadline = time.monotonic() + 10
        while listing["dead_letters"]:
            assert time.monotonic() < deadline, "the dead letter outlived its retention"
            await asyncio.sleep(0.05)
            _, listing = await gw.admin("GET", "/admin/dead-letters?replayed=true")
