"""An inbox entry's layout and the append command's bytes (pure, no Redis): the one-field
entry reads back as written whatever the source's name holds, the older four-field entry
still reads, and the append's RESP is byte for byte what `hiredis.pack_command` packs."""

from __future__ import annotations

import hiredis
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.redis.inbox import _APPEND, FIELD, RedisInbox, entry_fields, entry_value
from gateway.store.redis.partition import inbox_key, waiting_key

# any text: spaces, digits, NUL, newlines, non-ASCII (a source's name is the operator's)
sources = st.text(min_size=1, max_size=40)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
counts = st.integers(min_value=1, max_value=5000)
bodies = st.binary(max_size=400)


@settings(max_examples=500, deadline=None)
@given(source=sources, at=times, count=counts, body=bodies)
def test_an_entry_reads_back_as_written(source: str, at: float, count: int, body: bytes) -> None:
    value = entry_value(source.encode(), repr(at), count, body)
    assert entry_fields([FIELD, value]) == (source.encode(), at, count, body)


@settings(max_examples=200, deadline=None)
@given(source=sources, at=times, count=counts, body=bodies, order=st.permutations("stnb"))
def test_an_entry_of_the_older_layout_reads_in_any_order(
    source: str, at: float, count: int, body: bytes, order: list[str]
) -> None:
    values = {"s": source.encode(), "t": repr(at).encode(), "n": b"%d" % count, "b": body}
    fields = [x for name in order for x in (name.encode(), values[name])]
    assert entry_fields(fields) == (source.encode(), at, count, body)


def test_an_entry_missing_a_field_is_an_error_not_a_guess() -> None:
    with pytest.raises(KeyError):
        entry_fields([b"s", b"web", b"t", b"1.0", b"b", b"{}"])
    with pytest.raises(ValueError):
        entry_fields([FIELD, b"3 1.0 x web{}"])


def test_a_value_is_its_header_then_the_body_as_it_is() -> None:
    # what an operator sees with XRANGE: messages, received_at, the source's length and name
    assert entry_value(b"web", "1700000000.5", 3, b'{"batch":[]}') == (
        b'3 1700000000.5 3 web{"batch":[]}')


parts = st.dictionaries(
    st.integers(min_value=0, max_value=63),
    st.tuples(counts, st.binary(max_size=300)),
    min_size=1, max_size=64,
)


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(parts, min_size=1, max_size=5), ids=st.booleans())
def test_the_append_is_packed_as_hiredis_packs_it(
    requests: list[dict[int, tuple[int, bytes]]], ids: bool
) -> None:
    # a group of requests: their keys, then what to answer, then their parts, in order
    inbox = RedisInbox(aioredis.Redis(), 64)  # never connects: only packs
    keys = [k for parts in requests for p in parts for k in (inbox_key(p), waiting_key(p))]
    args: list[str | bytes | int] = ["ids" if ids else "count"]
    for parts in requests:
        for count, value in parts.values():
            args += (count, value)
    expected = hiredis.pack_command(("EVAL", _APPEND, len(keys), *keys, *args))  # type: ignore[arg-type]
    assert inbox._pack_append(requests, ids=ids) == expected
