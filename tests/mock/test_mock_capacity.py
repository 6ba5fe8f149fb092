"""The capacity fault: calls past N a second or C in flight get 429 with Retry-After.

The bucket and the in-flight count on their own (with a fake clock), then over HTTP
against the fixture, as CLI flags and as a spawned process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from mock_accoil.capacity import Capacity, Gate
from mock_accoil.cli import build_parser, capacity_from_args, main
from mock_accoil.faults import Fault
from mock_accoil.server import MockAccoilError, MockAccoilServer
from mock_accoil.state import MockAccoil
from tests.mock.mock_helpers import KEY, Ingest, Process, request, v2_auth

TRACK = {"userId": "u", "event": "E"}


# -- the gate, pure ----------------------------------------------------------------------


def test_rate_allows_the_burst_then_refills_at_the_rate() -> None:
    gate = Gate()
    gate.set(Capacity(rate=10.0, burst=3), now=0.0)
    assert [gate.admit(0.0) for _ in range(4)] == [None, None, None, "rate"]
    # a tenth of a second later, one more token
    assert gate.admit(0.1) is None
    assert gate.admit(0.1) == "rate"
    # a long wait fills the bucket to its size, not beyond
    assert [gate.admit(10.0) for _ in range(4)] == [None, None, None, "rate"]
    report = gate.report()
    assert (report.admitted, report.refused_rate, report.refused_concurrency) == (7, 3, 0)


def test_default_burst_is_a_tenth_of_a_second() -> None:
    assert Capacity(rate=400.0).bucket == 40.0
    assert Capacity(rate=5.0).bucket == 1.0  # at least one call
    assert Capacity(concurrency=3).bucket == float("inf")


def test_concurrency_counts_calls_until_released() -> None:
    gate = Gate()
    gate.set(Capacity(concurrency=2), now=0.0)
    assert [gate.admit(0.0) for _ in range(3)] == [None, None, "concurrency"]
    assert gate.in_flight == 2
    gate.release()
    assert gate.admit(0.0) is None
    assert gate.report().refused_concurrency == 1


def test_a_new_capacity_starts_full_and_keeps_calls_in_flight() -> None:
    gate = Gate()
    gate.set(Capacity(rate=1.0, burst=1, concurrency=5), now=0.0)
    assert gate.admit(0.0) is None and gate.admit(0.0) == "rate"
    gate.set(Capacity(rate=100.0, burst=2, concurrency=1), now=0.0)
    # the call admitted under the old capacity still holds its slot
    assert gate.admit(0.0) == "concurrency"
    gate.release()
    assert gate.admit(0.0) is None
    gate.set(None, now=0.0)
    assert all(gate.admit(0.0) is None for _ in range(100))


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"rate": 0}, "Expected `float` > 0.0"),
        ({"burst": 3}, "burst needs a rate"),
        ({"concurrency": 0}, "Expected `int` >= 1"),
        ({"latency": -1}, "Expected `float` >= 0.0"),
        ({"rate": 5, "per": "minute"}, "unknown field `per`"),
    ],
)
def test_bad_capacity_is_refused(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=error):
        msgspec.convert(spec, Capacity)


def test_state_refuses_without_changing_anything() -> None:
    clock = [0.0]
    state = MockAccoil(monotonic=lambda: clock[0])
    state.set_capacity(Capacity(rate=1.0, burst=1, retry_after=3, latency=0.25))
    body = b'{"userId":"u","event":"E"}'
    first = state.receive("/v2/track", authorization=f"Basic {KEY}", body=body)
    second = state.receive("/v2/track", authorization=f"Basic {KEY}", body=body)
    assert (first.status, first.latency, first.held) == (202, 0.25, True)
    assert (second.status, second.latency, second.held) == (429, 0.0, False)
    assert second.headers == {"Retry-After": "3"}
    assert second.body == {"error": "mock capacity: more than 1 calls a second"}
    assert state.count("u", "E") == 1
    assert [c.status for c in state.calls()] == [202, 429]
    state.reset()
    assert state.capacity().capacity is None and state.capacity().admitted == 0


def test_a_faulted_call_spends_no_capacity() -> None:
    state = MockAccoil(monotonic=lambda: 0.0)
    state.set_capacity(Capacity(rate=1.0, burst=1))
    state.add_fault(Fault(status=503, count=1))
    body = b'{"userId":"u"}'
    assert state.receive("/v2/identify", authorization="Basic k", body=body).status == 503
    assert state.receive("/v2/identify", authorization="Basic k", body=body).status == 202
    assert state.receive("/v2/identify", authorization="Basic k", body=body).status == 429


# -- over HTTP -----------------------------------------------------------------------------


async def test_rate_capacity_over_http(mock_accoil: MockAccoilServer, ingest: Ingest) -> None:
    report = mock_accoil.set_capacity(2.0, burst=2, retry_after=2)
    assert report["capacity"] == {"rate": 2.0, "burst": 2, "retry_after": 2}
    statuses = [await ingest.v2("/v2/track", TRACK) for _ in range(3)]
    assert [s for s, _, _ in statuses] == [202, 202, 429]
    status, body, headers = statuses[2]
    assert headers["Retry-After"] == "2"
    assert body == {"error": "mock capacity: more than 2 calls a second"}
    assert mock_accoil.count("u", "E") == 2
    report = mock_accoil.capacity()
    assert (report["admitted"], report["refused_rate"], report["in_flight"]) == (2, 1, 0)


async def test_concurrency_capacity_over_http(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    mock_accoil.set_capacity(concurrency=2, latency=0.3)
    results = await asyncio.gather(*(ingest.v2("/v2/track", TRACK) for _ in range(5)))
    assert sorted(s for s, _, _ in results) == [202, 202, 429, 429, 429]
    assert all(h["Retry-After"] == "1" for s, _, h in results if s == 429)
    # the slots come back once the calls are answered
    assert (await ingest.v2("/v2/track", TRACK))[0] == 202
    assert mock_accoil.capacity()["in_flight"] == 0


async def test_latency_and_capacity_change_while_running(
    mock_accoil: MockAccoilServer, ingest: Ingest
) -> None:
    mock_accoil.set_capacity(latency=0.2)
    started = time.perf_counter()
    assert (await ingest.v2("/v2/track", TRACK))[0] == 202
    assert time.perf_counter() - started >= 0.2
    mock_accoil.set_capacity(1.0, burst=1)  # replaces: no latency now
    started = time.perf_counter()
    assert [(await ingest.v2("/v2/track", TRACK))[0] for _ in range(2)] == [202, 429]
    assert time.perf_counter() - started < 0.2
    mock_accoil.clear_capacity()
    assert [(await ingest.v2("/v2/track", TRACK))[0] for _ in range(5)] == [202] * 5
    assert mock_accoil.capacity()["capacity"] is None


async def test_client_that_goes_away_frees_its_slot(mock_accoil: MockAccoilServer) -> None:
    mock_accoil.set_capacity(concurrency=1, latency=0.5)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await session.post(mock_accoil.url + "/v2/track", json=TRACK, headers=v2_auth())
    deadline = time.monotonic() + 3
    while mock_accoil.capacity()["in_flight"]:
        assert time.monotonic() < deadline, "the abandoned call kept its slot"
        await asyncio.sleep(0.05)


def test_bad_capacity_over_http_is_400(mock_accoil: MockAccoilServer) -> None:
    with pytest.raises(MockAccoilError, match="400.*burst needs a rate"):
        mock_accoil.set_capacity(burst=5)
    with pytest.raises(MockAccoilError, match="400.*concurrency"):
        mock_accoil.set_capacity(concurrency=0)
    assert mock_accoil.capacity()["capacity"] is None


def test_reset_lifts_the_capacity(mock_accoil: MockAccoilServer) -> None:
    mock_accoil.set_capacity(10.0)
    mock_accoil.reset()
    assert mock_accoil.capacity() == {
        "capacity": None, "in_flight": 0, "admitted": 0, "refused_rate": 0,
        "refused_concurrency": 0,
    }


# -- CLI -------------------------------------------------------------------------------------


def _capacity(*argv: str) -> Capacity | None:
    return capacity_from_args(build_parser().parse_args(list(argv)))


def test_capacity_flags() -> None:
    assert _capacity() is None
    assert _capacity("--capacity-rate", "400", "--capacity-concurrency", "64",
                     "--capacity-latency", "0.05") == Capacity(
        rate=400.0, concurrency=64, latency=0.05)
    assert _capacity("--capacity-rate", "5", "--capacity-burst", "10",
                     "--capacity-retry-after", "2") == Capacity(rate=5.0, burst=10, retry_after=2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--capacity-rate", "0"], "--capacity-rate: Expected float > 0.0"),
        (["--capacity-concurrency", "0"], "--capacity-concurrency: Expected int >= 1"),
        (["--capacity-latency", "0.1"], "need --capacity-rate or --capacity-concurrency"),
        (["--capacity-concurrency", "2", "--capacity-burst", "3"],
         "--capacity-burst needs --capacity-rate"),
        (["--capacity-rate", "5", "--capacity-retry-after", "-1"],
         "--capacity-retry-after: Expected int >= 0"),
    ],
)
def test_bad_capacity_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_process_capacity_flags(spawn: type[Process]) -> None:
    mock = spawn("--capacity-rate", "1", "--capacity-burst", "1", "--capacity-retry-after", "4")
    auth = {"Authorization": f"Basic {KEY}", "Content-Type": "application/json"}
    assert request(mock.url + "/v2/track", TRACK, auth)[0] == 202
    status, body = request(mock.url + "/v2/track", TRACK, auth)
    assert status == 429 and "1 calls a second" in body["error"]
    _, report = request(mock.url + "/_mock/capacity")
    assert report["capacity"] == {"rate": 1.0, "burst": 1, "retry_after": 4}
    assert mock.stop()[0] == 0
