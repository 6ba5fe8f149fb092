"""Every fault mode, over HTTP against the fixture, plus the fault rules on their own."""

from __future__ import annotations

import time

import aiohttp
import pytest

from mock_accoil.faults import Fault, FaultSet
from mock_accoil.server import MockAccoilError, MockAccoilServer
from tests.mock.mock_helpers import KEY, Ingest

TRACK = {"userId": "u", "event": "E"}


async def test_status_fault_for_two_calls_fails_exactly_two(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    fault = mock_accoil.add_fault(503, count=2)
    assert (fault["status"], fault["count"], fault["remaining"]) == (503, 2, 2)
    statuses = [(await ingest.v2("/v2/track", TRACK))[0] for _ in range(4)]
    assert statuses == [503, 503, 202, 202]
    assert mock_accoil.faults() == []  # expired after its count
    assert [c["status"] for c in mock_accoil.calls()] == [503, 503, 202, 202]
    assert [c["fault"] for c in mock_accoil.calls()] == [fault["id"], fault["id"], None, None]
    assert mock_accoil.count("u", "E") == 2  # faulted calls changed nothing


async def test_fault_reply_body_and_retry_after(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    mock_accoil.add_fault(429, count=1)
    status, body, headers = await ingest.v2("/v2/track", TRACK)
    assert (status, headers["Retry-After"]) == (429, "1")  # 429 always says when to retry
    assert "error" in body
    mock_accoil.add_fault(429, count=1, retry_after=7)
    assert (await ingest.v2("/v2/track", TRACK))[2]["Retry-After"] == "7"
    mock_accoil.add_fault(503, count=1, retry_after=3)
    assert (await ingest.v2("/v2/track", TRACK))[2]["Retry-After"] == "3"
    mock_accoil.add_fault(500, count=1)
    status, _, headers = await ingest.v2("/v2/track", TRACK)
    assert status == 500 and "Retry-After" not in headers


@pytest.mark.parametrize("status", [413, 500, 503])
async def test_any_status(mock_accoil: MockAccoilServer, ingest: Ingest, status: int) -> None:
    mock_accoil.add_fault(status, count=1)
    assert (await ingest.v2("/v2/identify", {"userId": "u"}))[0] == status
    assert (await ingest.v2("/v2/identify", {"userId": "u"}))[0] == 202


async def test_fault_by_path(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    mock_accoil.add_fault(500, path="/v2/track")
    assert (await ingest.v2("/v2/identify", {"userId": "u"}))[0] == 202
    assert (await ingest.v2("/v2/group", {"groupId": "g"}))[0] == 202
    assert (await ingest.v2("/v2/track", TRACK))[0] == 500
    assert (await ingest.v2("/v2/track", TRACK))[0] == 500  # no count: stays until cleared
    assert (await ingest.segment({"type": "track", **TRACK}))[0] == 202
    mock_accoil.clear_faults()
    assert (await ingest.v2("/v2/track", TRACK))[0] == 202


async def test_faults_do_not_touch_the_inspection_api(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    mock_accoil.add_fault(503)
    assert mock_accoil.calls() == []
    assert (await ingest.v2("/v2/track", TRACK))[0] == 503


async def test_rate_fails_about_that_fraction(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    mock_accoil.add_fault(503, rate=0.3)
    statuses = [(await ingest.v2("/v2/track", TRACK))[0] for _ in range(200)]
    failed = statuses.count(503)
    assert 30 <= failed <= 90, failed
    assert statuses.count(202) == 200 - failed
    assert mock_accoil.count("u", "E") == 200 - failed


def test_rate_is_seeded_and_reproducible() -> None:
    def run(seed: int) -> list[bool]:
        faults = FaultSet(seed)
        faults.add(Fault(status=500, rate=0.5))
        return [faults.decide("/v2/track").status == 500 for _ in range(64)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    never, always = FaultSet(), FaultSet()
    never.add(Fault(status=500, rate=0.0))
    always.add(Fault(status=500, rate=1.0))
    assert not any(never.decide("/v2/track").decides_reply for _ in range(50))
    assert all(always.decide("/v2/track").decides_reply for _ in range(50))


def test_rate_and_count_together_fail_n_calls_in_all() -> None:
    faults = FaultSet(3)
    faults.add(Fault(status=500, rate=0.5, count=5))
    fired = [faults.decide("/v2/track").status == 500 for _ in range(200)]
    assert sum(fired) == 5
    assert fired.index(False) < 10  # the rate still applies while the count lasts
    assert faults.active() == []


def test_first_deciding_fault_wins_and_later_counts_are_kept() -> None:
    faults = FaultSet()
    first = faults.add(Fault(status=503, count=1))
    second = faults.add(Fault(status=429, count=1))
    slow = faults.add(Fault(latency=0.5, count=3))
    a, b, c = (faults.decide("/v2/group") for _ in range(3))
    assert (a.status, a.fault_id, a.latency) == (503, first.id, 0.5)
    assert (b.status, b.fault_id, b.retry_after) == (429, second.id, 1)
    assert (c.status, c.latency, c.decides_reply) == (None, 0.5, False)
    assert faults.active() == []
    assert slow.hits == 0  # active() and add() hand out copies


async def test_latency_delays_the_reply(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    mock_accoil.add_fault(latency=0.3, count=1, path="/v2/identify")
    start = time.monotonic()
    status, _, _ = await ingest.v2("/v2/identify", {"userId": "u"})
    slow = time.monotonic() - start
    start = time.monotonic()
    await ingest.v2("/v2/identify", {"userId": "u"})
    fast = time.monotonic() - start
    assert status == 202 and slow >= 0.3 and fast < 0.2
    assert len(mock_accoil.users()) == 1  # a slow accepted call still counts


async def test_drop_closes_the_connection_without_reply(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    fault = mock_accoil.add_fault(drop=True, count=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await ingest.v2("/v2/track", TRACK)
    assert (await ingest.v2("/v2/track", TRACK))[0] == 202
    dropped, ok = mock_accoil.calls()
    assert (dropped["status"], dropped["fault"], dropped["api_key"]) == (None, fault["id"], KEY)
    assert ok["status"] == 202
    assert mock_accoil.count("u", "E") == 1


async def test_drop_rate(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    mock_accoil.add_fault(drop=True, rate=0.5)
    outcomes: list[int | None] = []
    for _ in range(40):
        try:
            outcomes.append((await ingest.v2("/v2/track", TRACK))[0])
        except aiohttp.ClientConnectionError:
            outcomes.append(None)
    assert 5 <= outcomes.count(None) <= 35
    assert mock_accoil.count("u", "E") == outcomes.count(202)


def test_list_and_clear_faults(mock_accoil: MockAccoilServer) -> None:
    a = mock_accoil.add_fault(503, count=2, path="/v2/track")
    b = mock_accoil.add_fault(latency=0.01)
    listed = mock_accoil.faults()
    assert [f["id"] for f in listed] == [a["id"], b["id"]]
    assert listed[0]["remaining"] == 2 and listed[0]["hits"] == 0
    mock_accoil.clear_faults()
    assert mock_accoil.faults() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, None),
        ({"status": 200}, "status"),
        ({"status": 600}, "status"),
        ({"status": "503"}, "status"),
        ({"status": 503, "rate": 1.5}, "rate"),
        ({"status": 503, "count": 0}, "count"),
        ({"latency": -1}, "latency"),
        ({"status": 503, "drop": True}, None),
        ({"retry_after": 3, "drop": True}, None),
        ({"status": 503, "path": "/v2/nope"}, None),
        ({"status": 503, "paths": ["/v2/track"]}, "paths"),
    ],
)
async def test_invalid_faults_are_refused(
    mock_accoil: MockAccoilServer, ingest: Ingest, body: dict[str, object], field: str | None
) -> None:
    status, reply, _ = await ingest.post("/_mock/faults", body)
    assert status == 400
    assert reply["field"] == field
    assert mock_accoil.faults() == []


async def test_fault_body_must_be_json(ingest: Ingest) -> None:
    status, reply, _ = await ingest.post("/_mock/faults", raw=b"nope")
    assert (status, reply["field"]) == (400, None)


def test_client_raises_on_refused_fault(mock_accoil: MockAccoilServer) -> None:
    with pytest.raises(MockAccoilError, match="400"):
        mock_accoil.add_fault(status=200)
