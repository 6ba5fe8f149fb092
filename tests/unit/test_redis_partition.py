"""Partitioning (pure, no Redis): a stable hash, an even spread, and batches split so that
each part decodes to exactly its messages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from gateway.segment import decode_batch
from gateway.store.redis.partition import (
    NO_USER_PARTITION,
    epoch_key,
    inbox_key,
    lease_key,
    partition_of,
    progress_key,
    split,
    tag,
)


def test_the_hash_is_pinned() -> None:
    # these numbers are the deployment's data layout: a change would move users between
    # partitions under a running deployment
    assert partition_of("web", "user_1", 64) == 57
    assert partition_of("web", "42", 64) == 24
    assert partition_of("mobile", "user_1", 64) == 52
    assert partition_of("web", "user_1", 1000) == 977


def test_the_hash_does_not_depend_on_the_process() -> None:
    # Python's hash() is salted per process; crc32 is not
    code = ("from gateway.store.redis.partition import partition_of as f;"
            "print([f('web', f'u{i}', 64) for i in range(50)])")
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    assert json.loads(runs.pop()) == [partition_of("web", f"u{i}", 64) for i in range(50)]


def test_users_spread_evenly() -> None:
    counts = Counter(partition_of("web", f"user_{i}", 64) for i in range(64_000))
    assert set(counts) == set(range(64))
    assert min(counts.values()) > 900 and max(counts.values()) < 1100


def test_no_user_goes_to_the_fixed_partition() -> None:
    assert partition_of("web", None, 64) == NO_USER_PARTITION == 0


def test_keys_carry_the_partition_tag() -> None:
    assert tag(7) == "{p7}"
    assert [k(7) for k in (inbox_key, progress_key, lease_key, epoch_key)] == [
        "{p7}:inbox", "{p7}:progress", "{p7}:lease", "{p7}:epoch"]


def batch(*messages: dict[str, object], **envelope: object) -> bytes:
    return json.dumps({"batch": list(messages), **envelope}).encode()


def track(i: int, **ids: object) -> dict[str, object]:
    return {"type": "track", "event": "E", "messageId": f"m{i}", **ids}


def test_a_batch_of_one_partition_is_stored_as_it_is() -> None:
    body = batch(track(1, userId="u1"), track(2, userId="u1", anonymousId="a9"))
    assert split("web", body, 64) == {partition_of("web", "u1", 64): (body, 2)}


def test_split_keeps_each_users_order_and_the_envelope() -> None:
    users = [f"user_{i % 7}" for i in range(40)]
    messages = [track(i, userId=u) for i, u in enumerate(users)]
    body = batch(*messages, context={"library": {"name": "x"}}, sentAt="2026-01-01T00:00:00Z")
    parts = split("web", body, 64)
    assert len(parts) > 1
    seen: list[str] = []
    for p, (part, n) in parts.items():
        decoded = decode_batch(part)
        assert decoded.count == n
        assert decoded.context == {"library": {"name": "x"}}
        assert decoded.sent_at is not None and decoded.sent_at.year == 2026
        ids = [str(m.messageId) for m in decoded.messages]
        assert all(partition_of("web", str(m.userId), 64) == p for m in decoded.messages)
        # in the client's order within the part
        assert ids == sorted(ids, key=lambda x: int(x[1:]))
        seen += ids
    assert sorted(seen) == sorted(f"m{i}" for i in range(40))


@pytest.mark.parametrize(
    ("ids", "user"),
    [
        ({"userId": "u1", "anonymousId": "a1"}, "u1"),  # userId wins
        ({"userId": "", "anonymousId": "a1"}, "a1"),  # an empty userId is no userId
        ({"anonymousId": "a1"}, "a1"),
        ({"userId": 42}, "42"),  # integer ids are their decimal text, as upstream
        ({"userId": True, "anonymousId": "a1"}, "a1"),  # not an id
    ],
)
def test_the_partition_key_is_user_then_anonymous_id(ids: dict[str, object], user: str) -> None:
    body = batch(track(1, **ids), track(2, userId="zz"))
    parts = split("web", body, 1000)
    assert partition_of("web", user, 1000) in parts


def test_invalid_messages_go_with_the_rest_and_without_ids_to_partition_0() -> None:
    body = batch(track(1, userId="u1"), {"type": "track", "messageId": "bad"},
                 {"type": "track", "userId": {"not": "an id"}, "messageId": "odd"})
    parts = split("web", body, 64)
    assert parts[0][1] == 2  # no usable id: the fixed partition
    assert sum(n for _, n in parts.values()) == 3
    rejected = decode_batch(parts[0][0]).rejected
    assert sorted(r.messageId or "" for r in rejected) == ["bad", "odd"]


def test_messages_whose_ids_cannot_be_read_go_to_partition_0() -> None:
    # not objects, or ids out of msgspec's range: rejected by ingest, kept as dead letters
    odd = [b"17", b'"text"', b'{"type":"track","userId":1e400,"anonymousId":"a1"}',
           b'{"type":"track","userId":"u2","anonymousId":[-1e400]}',
           b'{"type":"track","userId":' + b"9" * 4400 + b"}"]
    body = b'{"batch":[' + b",".join([json.dumps(track(1, userId="u1")).encode(), *odd]) + b"]}"
    parts = split("web", body, 64)
    assert parts[0][1] == len(odd) and sum(n for _, n in parts.values()) == len(odd) + 1
    assert [r.raw for r in decode_batch(parts[0][0]).rejected] == odd
