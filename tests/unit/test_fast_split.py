"""The compiled split of a stored batch by partition (gateway/_check.c, `split`) against the
pure `_split` (gateway/store/redis/partition.py).

The rule that makes it safe, as for the compiled check: whenever the compiled split takes a
body (returns parts), `_split` returns the very same parts, byte for byte, in the same
order, each message in the partition `partition_of` gives its user. It may refuse (None)
anything, and `split` then runs `_split`. The bodies are JSON text written fragment by
fragment (the strategies of test_fast_check.py), so they hold ids in every form: escapes,
unicode, integers, -0, floats, bools, objects, ids given twice.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import segment
from gateway.segment import MAX_BATCH, id_str
from gateway.store.redis import partition
from gateway.store.redis.partition import Parts, _seed, partition_of
from tests.unit.test_fast_check import (
    bodies,
    good_ids,
    good_json,
    ids,
    join_object,
    json_text,
    messages,
    mutated,
    quoted,
    sdk_body,
    sdk_messages,
    ws,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchkit.traffic import DEFAULT_MIX, Traffic, parse_mix  # noqa: E402

fast_split = partition._fast_split
needs_module = pytest.mark.skipif(fast_split is None, reason="gateway._check is not built")
# what `_split` raises for a body that is not a batch (ingest never stores one)
NOT_A_BATCH = (msgspec.MsgspecError, RecursionError)


def same_parts(source: str, body: bytes, partitions: int) -> Parts | None:
    """The property: a body the compiled split takes is split exactly as `_split` splits it
    (the parts' bytes, their counts, their order); the parts, or None where it refused."""
    assert fast_split is not None
    got = fast_split(body, _seed(source), partitions)
    try:
        want = partition._split(source, body, partitions)
    except NOT_A_BATCH as exc:
        assert got is None, f"taken, but _split raises {exc!r}"
        return None
    if got is not None:
        assert list(got.items()) == list(want.items())
        assert partition.split(source, body, partitions) == want
    return got


def test_the_module_is_built_where_a_compiler_is() -> None:
    # a broken build must fail CI, not fall back to the slow split unnoticed
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert fast_split is not None, "gateway._check did not build: run `make install`"


# --- generated bodies ---------------------------------------------------------------------

# ids as SDKs send them (`common_ids`), and in any other form (`odd_ids`)
common_ids = st.one_of(
    st.sampled_from(['"u1"', '"u2"', '"user-42"', '"é"', '"😀 ü"', '""', "0", "-0", "7", "-7",
                     "123456789012345678", "-123456789012345678", "null", "true", "false"]),
    st.text(st.characters(exclude_categories=["Cs", "Cc"], exclude_characters='"\\'),
            max_size=6).map(quoted),
    st.integers(-(10**18) + 1, 10**18 - 1).map(str))
odd_ids = st.one_of(ids, good_ids, st.sampled_from(
    ["1.0", "1e2", "[]", '{"a":1}', '"\\u0075"', "1234567890123456789", "1e400"]))
sources = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
partition_counts = st.sampled_from([1, 2, 3, 7, 64, 64, 1000, 16384])


@st.composite
def elements(draw: st.DrawFn, odd: bool) -> str:
    """A batch's element: a message of ids, its userId and anonymousId given or not, other
    fields any JSON. `odd`: now and then any JSON, a message as the compiled check's tests
    write them, ids in any form, one given twice or spelt with an escape."""
    # (the rare branches on the high draws: hypothesis draws 0 the most)
    if odd:
        kind = draw(st.integers(0, 9))
        if kind == 9:
            return draw(json_text)
        if kind == 8:
            return draw(messages())
    id_forms = st.one_of(common_ids, odd_ids) if odd else common_ids
    pairs: list[tuple[str, str]] = []
    for key in ("userId", "anonymousId"):
        if draw(st.integers(0, 3)) < 3:
            pairs.append((quoted(key), draw(id_forms)))
    values = st.one_of(good_json, json_text) if odd else good_json
    pairs += draw(st.lists(st.tuples(st.sampled_from(['"type"', '"event"', '"x"', '"é"']),
                                     values), max_size=2))
    twist = draw(st.integers(0, 9)) if odd else 0
    if twist == 9 and pairs:
        pairs.append(draw(st.sampled_from(pairs)))  # a field twice
    elif twist == 8:
        pairs.append(('"user\\u0049d"', draw(id_forms)))
    return join_object(draw(st.permutations(pairs)), draw(ws))


@st.composite
def split_bodies(draw: st.DrawFn, odd: bool) -> bytes:
    """A body as `split` may be handed it: a batch of elements, the top-level fields any
    JSON. `odd`: now and then a field twice, or the body broken in one place."""
    space = draw(ws)
    batch = ",".join(draw(st.lists(elements(odd), max_size=8)))
    pairs = [('"batch"', "[" + space + batch + "]")]
    values = st.one_of(good_json, json_text) if odd else good_json
    for key in ("context", "integrations", "sentAt", "writeKey", "extra"):
        if draw(st.booleans()):
            pairs.append((quoted(key), draw(values)))
    if odd and draw(st.integers(0, 9)) == 9:
        pairs.append(draw(st.sampled_from(pairs)))
    body = (draw(ws) + join_object(draw(st.permutations(pairs)), space) + draw(ws)).encode()
    return draw(mutated(body)) if odd and draw(st.integers(0, 3)) == 3 else body


@needs_module
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(source=sources, body=split_bodies(odd=False), partitions=partition_counts)
def test_a_common_body_is_taken_and_split_as_the_pure_split_does(
    source: str, body: bytes, partitions: int
) -> None:
    assert same_parts(source, body, partitions) is not None


@needs_module
@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(source=sources, body=split_bodies(odd=True), partitions=partition_counts)
@example(source="web", body=b'{"batch":[]}', partitions=64)
@example(source="web", body=b'{"batch":[{"userId":-0},{"userId":"0"},{"userId":0}]}',
         partitions=64)
@example(source="web", body=b'{"batch":[17,"x",null,{"userId":true,"anonymousId":"a"}],'
                            b'"context":null,"sentAt":1}', partitions=7)
def test_a_split_taken_is_the_pure_split(source: str, body: bytes, partitions: int) -> None:
    same_parts(source, body, partitions)


@needs_module
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(source=sources, body=st.one_of(bodies(), bodies(keyed=True)),
       partitions=partition_counts)
def test_a_stored_body_split_is_the_pure_split(source: str, body: bytes, partitions: int) -> None:
    # what ingest hands the store: the checked body, its write key stripped
    try:
        stored = segment.check_batch(body).body
    except segment.InvalidBody:
        return
    same_parts(source, stored, partitions)


@needs_module
@settings(max_examples=300, deadline=None)
@given(source=sources, user=st.one_of(common_ids, odd_ids),
       other=st.one_of(common_ids, odd_ids), partitions=partition_counts)
def test_each_message_is_in_its_users_partition(
    source: str, user: str, other: str, partitions: int
) -> None:
    body = f'{{"batch":[{{"userId":{user}}},{{"userId":"u"}},{{"anonymousId":{other}}}]}}'.encode()
    parts = same_parts(source, body, partitions)
    if parts is None:
        return
    expected = [partition_of(source, id_str(json.loads(value)), partitions)
                for value in (user, '"u"', other)]
    # each part holds the messages whose partition is its key, in the batch's order
    messages_by_part = {p: json.loads(part)["batch"] for p, (part, _) in parts.items()}
    batch = json.loads(body)["batch"]
    for p, held in messages_by_part.items():
        assert held == [m for m, q in zip(batch, expected, strict=True) if q == p]
    assert set(parts) == set(expected)


# --- what must be taken ------------------------------------------------------------------


@needs_module
def test_the_benchmarks_batches_are_taken() -> None:
    # as ingest stores them (the checked body), every call type, and the sustained
    # benchmark's track-only batches
    for mix in (parse_mix(DEFAULT_MIX), {"track": 1.0}):
        traffic = Traffic(accounts=500, users=5000, mix=mix, seed=5)
        for _ in range(5):
            stored = segment.check_batch(traffic.batch(100).body).body
            parts = same_parts("web", stored, 64)
            assert parts is not None, "the compiled split refused a benchmark batch"
            assert len(parts) > 20 and sum(n for _, n in parts.values()) == 100


@needs_module
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_sdks_batches_are_taken(ensure_ascii: bool) -> None:
    sent = sdk_messages()
    body = sdk_body(sent, ensure_ascii=ensure_ascii)
    stored = segment.check_batch(body).body  # the key stripped, the body rewritten
    for partitions in (1, 64, 1000):
        parts = same_parts("web", stored, partitions)
        assert parts is not None, "the compiled split refused an SDK batch"
        assert sum(n for _, n in parts.values()) == len(sent)
    # unicode in the ids themselves, as sent raw (ensure_ascii=False) and as the SDK's
    # escapes (left to Python, which splits them the same)
    users = [{"type": "track", "event": "E", "userId": u} for u in ("ünï", "😀", "u", "ユーザー")]
    raw = json.dumps({"batch": users}, ensure_ascii=ensure_ascii).encode()
    parts = same_parts("web", raw, 64)
    assert (parts is not None) is (not ensure_ascii)
    assert partition.split("web", raw, 64) == partition._split("web", raw, 64)


# --- what is left to Python --------------------------------------------------------------


@needs_module
@pytest.mark.parametrize(
    "body",
    [
        b'{"batch":[{"userId":"\\u00fc"},{"userId":"b"}]}',  # an escape in an id
        b'{"batch":[{"anonymousId":"a\\"b"},{"userId":"b"}]}',
        b'{"batch":[{"userId":1.5,"anonymousId":"a"},{"userId":"b"}]}',  # a float id
        b'{"batch":[{"userId":1e400,"anonymousId":"a"},{"userId":"b"}]}',
        b'{"batch":[{"userId":1234567890123456789},{"userId":"b"}]}',  # past 18 digits
        b'{"batch":[{"userId":{"id":1}},{"userId":"b"}]}',  # an object
        b'{"batch":[{"userId":["a"]},{"userId":"b"}]}',
        b'{"batch":[{"userId":"a","userId":"c"},{"userId":"b"}]}',  # given twice
        b'{"batch":[{"user\\u0049d":"a"},{"userId":"b"}]}',  # a key spelt with an escape
        b'{"batch":[{"userId":"a"}],"context":{},"context":null}',
        b'{"batch":[{"userId":"a"}],"batch":[{"userId":"b"}]}',
        b'{"b\\u0061tch":[{"userId":"a"}]}',
        b'{"batch":[{"userId":"a","p":' + b"[" * 40 + b"]" * 40 + b"}]}",  # deep
        b'{"batch":[{"userId":"\xff"}]}',  # not UTF-8
        b'{"batch":[{"userId":"a"}]} x',
        b'{"batch":{}}',
        b'{"context":{}}',
        b"[]",
        b"",
    ],
)
def test_what_it_leaves_to_the_pure_split(body: bytes) -> None:
    assert fast_split is not None
    assert fast_split(body, _seed("web"), 64) is None
    try:
        want = partition._split("web", body, 64)
    except NOT_A_BATCH:
        return
    assert partition.split("web", body, 64) == want


@needs_module
def test_the_batch_limit_and_the_partition_counts() -> None:
    assert fast_split is not None
    one = b'{"type":"track","userId":"u%d","event":"e"}'
    full = b'{"batch":[' + b",".join(one % i for i in range(MAX_BATCH)) + b"]}"
    assert same_parts("web", full, 64) is not None
    over = b'{"batch":[' + b",".join(one % i for i in range(MAX_BATCH + 1)) + b"]}"
    assert fast_split(over, _seed("web"), 64) is None
    assert partition.split("web", over, 64) == partition._split("web", over, 64)
    # a partition count past any `Settings.partitions`, or none: left to Python
    assert fast_split(full, _seed("web"), 1 << 17) is None
    assert fast_split(full, _seed("web"), 0) is None
    assert same_parts("web", full, 1 << 16) is not None


@needs_module
def test_a_body_of_one_partition_is_the_same_object() -> None:
    assert fast_split is not None
    body = b'{"batch":[{"userId":"u1"},{"userId":"u1","anonymousId":"x"},{"anonymousId":"u1"}]}'
    parts = fast_split(body, _seed("web"), 64)
    assert parts == {partition_of("web", "u1", 64): (body, 3)}
    assert next(iter(parts.values()))[0] is body  # no copy
    assert fast_split(b'{"batch":[]}', _seed("web"), 64) == {0: (b'{"batch":[]}', 0)}


@needs_module
def test_its_arguments() -> None:
    split: Any = fast_split
    with pytest.raises(TypeError, match="bytes"):
        split(bytearray(b'{"batch":[]}'), 0, 64)
    with pytest.raises(TypeError, match="3 arguments"):
        split(b'{"batch":[]}', 0)
    with pytest.raises(OverflowError):
        split(b'{"batch":[]}', 1 << 32, 64)
    with pytest.raises(OverflowError):
        split(b'{"batch":[]}', -1, 64)
