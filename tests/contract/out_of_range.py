"""A batch with numbers outside the double range, and what it must give by either pipeline
(inline, or in the worker process, the default): Segment's JavaScript reads 1e400 as
Infinity and sends it on as null, so such a value is forwarded as null; an id is rejected
(docs/ingest.md). Shared by tests/contract/test_end_to_end.py and test_process.py."""

from __future__ import annotations

from typing import Any

TS = "2026-11-20T10:00:00.000Z"
HUGE = "9" * 4400  # an integer longer than msgspec reads: as far beyond a double

REJECTED_RAW = ('{"type":"track","messageId":"n5","userId":1e400,"anonymousId":"a-num",'
                '"event":"Lost Id","timestamp":"' + TS + '"}')
BATCH = (
    '{"batch":['
    '{"type":"identify","messageId":"n1","userId":"u-num","timestamp":"' + TS + '",'
    '"context":{"groupId":"acct-num","ip":[1e400]},'
    '"traits":{"email":"n@b.c","score":1e400,"low":-1e400,"tiny":1e-400,'
    '"big":18446744073709551616,"long":' + HUGE + '}},'
    '{"type":"group","messageId":"n2","userId":"u-num","groupId":"acct-num",'
    '"timestamp":"' + TS + '","traits":{"name":"Num","mrr":-1e400}},'
    '{"type":"track","messageId":"n3","userId":"u-num","event":"Num Tracked",'
    '"timestamp":"' + TS + '","properties":{"x":1e400},"context":{"groupId":"acct-num"}},'
    '{"type":"page","messageId":"n4","userId":"u-num","name":"Home","timestamp":"' + TS + '",'
    '"properties":{"title":1e400,"path":"/p"}},'
    + REJECTED_RAW +
    '],"context":{"locale":1e400}}'
).encode()

REJECTED = [{"index": 4, "messageId": "n5", "reason": "Number out of range - at `userId`"}]


def forwarded(calls: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The bodies mock Accoil accepted, by path."""
    out: dict[str, list[Any]] = {}
    for call in calls:
        assert call["status"] == 202, call
        out.setdefault(call["path"], []).append(call["body"])
    return out


EXPECTED = {
    "/v2/identify": [{
        "userId": "u-num", "groupId": "acct-num", "timestamp": TS,
        "traits": {"email": "n@b.c", "score": None, "low": None, "tiny": 0.0,
                   "big": 18446744073709551616, "long": None},
    }],
    "/v2/group": [{"groupId": "acct-num", "userId": "u-num", "timestamp": TS,
                   "traits": {"name": "Num", "mrr": None}}],
    "/v2/track": [
        {"userId": "u-num", "event": "Num Tracked", "timestamp": TS},
        {"userId": "u-num", "event": "Page Viewed Home", "timestamp": TS},
    ],
}
