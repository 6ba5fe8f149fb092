"""bench_forward's capacity scenario: the drain's slice of the mock's journal starts where
the drop fault was lifted, however late the lift comes after the events were queued."""

from __future__ import annotations

import json
import urllib.request

import bench_forward
import pytest

from mock_accoil.server import MockAccoilServer
from tests.mock.mock_helpers import v2_auth

TRACK = json.dumps({"userId": "u", "event": "E"}).encode()


def track(url: str) -> int:
    req = urllib.request.Request(url + "/v2/track", data=TRACK, method="POST",
                                 headers={**v2_auth(), "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        status: int = resp.status
        return status


def drop_then_read(mock: MockAccoilServer) -> int:
    """The mock drops every connection, drops one call, and the bench reads the journal's
    last seq, as it does once the gateway's inbox is empty."""
    mock.add_fault(drop=True)
    with pytest.raises(OSError):
        track(mock.url)
    read = bench_forward.last_seq(mock.url)
    assert read == mock.calls()[-1]["seq"]
    return read


def test_the_drain_starts_after_a_drop_that_came_between_the_read_and_the_lift(
    mock_accoil: MockAccoilServer,
) -> None:
    read = drop_then_read(mock_accoil)
    # the gateway's next call, dropped after the seq was read and before the lift, as a
    # loaded machine interleaves them
    with pytest.raises(OSError):
        track(mock_accoil.url)
    dropped = mock_accoil.calls(since=read)
    assert [c["status"] for c in dropped] == [None]
    start = bench_forward.lift_drop(mock_accoil.url, read)
    assert start == dropped[0]["seq"] > read
    assert mock_accoil.faults() == []
    assert track(mock_accoil.url) == 202
    assert [c["status"] for c in mock_accoil.calls(since=start)] == [202]


def test_without_a_late_drop_the_drain_starts_at_the_read(
    mock_accoil: MockAccoilServer,
) -> None:
    read = drop_then_read(mock_accoil)
    assert bench_forward.lift_drop(mock_accoil.url, read) == read
    assert track(mock_accoil.url) == 202
    assert [c["status"] for c in mock_accoil.calls(since=read)] == [202]
