"""The worker protocol: tagged Structs on the wire, one line each, decoded by their tag."""

from __future__ import annotations

import msgspec
import pytest

from gateway.worker import MetricsText, Reply, Request, Requeue, Stats, Stop

_decode = msgspec.json.Decoder(Request).decode


@pytest.mark.parametrize(
    "request_", [Stats(1), MetricsText(2), Requeue(3, [7, 9]), Stop(4, 2.5)]
)
def test_requests_round_trip_by_their_tag(request_: Request) -> None:
    line = msgspec.json.encode(request_)
    assert msgspec.json.decode(line)["type"] == type(request_).__struct_config__.tag
    assert _decode(line) == request_


def test_a_request_of_no_known_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'drop'"):
        _decode(b'{"type": "drop", "id": 1}')
    with pytest.raises(msgspec.ValidationError, match="ids"):
        _decode(b'{"type": "requeue", "id": 1}')


def test_replies_carry_results_or_errors() -> None:
    for reply in (Reply(1, {"busy": False}), Reply(2, "text"), Reply(3, 5), Reply(4, error="boom")):
        assert msgspec.json.decode(msgspec.json.encode(reply), type=Reply) == reply
