"""An inbox entry's layout and the append command's bytes (pure, no Redis): an entry of
several records reads back as written whatever the source's name and the bodies hold, the
older layouts (one record in a field `d`, or four fields) still read, a group's parts make
one entry a partition and source, and the append's RESP is byte for byte what
`hiredis.pack_command` packs."""

from __future__ import annotations

import hiredis
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store.redis.inbox import (
    _APPEND,
    FIELD,
    ONE,
    RedisInbox,
    _entries,
    _Queued,
    entry_records,
    entry_value,
)
from gateway.store.redis.partition import inbox_key, waiting_key

# any text: spaces, digits, NUL, newlines, non-ASCII (a source's name is the operator's)
sources = st.text(min_size=1, max_size=40)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
counts = st.integers(min_value=1, max_value=5000)
bodies = st.binary(max_size=400)


records = st.lists(st.tuples(times, counts, bodies), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(source=sources, written=records)
def test_an_entry_reads_back_as_written(
    source: str, written: list[tuple[float, int, bytes]]
) -> None:
    value = entry_value(source.encode(), [(n, repr(at).encode(), b) for at, n, b in written])
    assert entry_records([FIELD, value]) == (source.encode(), written)


@settings(max_examples=200, deadline=None)
@given(source=sources, at=times, count=counts, body=bodies)
def test_an_entry_of_one_record_in_d_still_reads(
    source: str, at: float, count: int, body: bytes
) -> None:
    # the layout of the version before: `<messages> <received_at> <bytes of source> <source><body>`
    src = source.encode()
    value = b"%d %s %d %s%s" % (count, repr(at).encode(), len(src), src, body)
    assert entry_records([ONE, value]) == (src, [(at, count, body)])


@settings(max_examples=200, deadline=None)
@given(source=sources, at=times, count=counts, body=bodies, order=st.permutations("stnb"))
def test_an_entry_of_the_four_field_layout_reads_in_any_order(
    source: str, at: float, count: int, body: bytes, order: list[str]
) -> None:
    values = {"s": source.encode(), "t": repr(at).encode(), "n": b"%d" % count, "b": body}
    fields = [x for name in order for x in (name.encode(), values[name])]
    assert entry_records(fields) == (source.encode(), [(at, count, body)])


def test_an_entry_missing_a_field_or_cut_short_is_an_error_not_a_guess() -> None:
    with pytest.raises(KeyError):
        entry_records([b"s", b"web", b"t", b"1.0", b"b", b"{}"])
    with pytest.raises(ValueError):
        entry_records([ONE, b"3 1.0 x web{}"])
    whole = entry_value(b"web", [(3, b"1.0", b'{"batch":[]}')])
    with pytest.raises(ValueError):
        entry_records([FIELD, whole[:-1]])  # the body runs past the entry
    with pytest.raises(ValueError):
        entry_records([FIELD, b"3 web"])  # a source and no record


def test_a_value_is_the_source_then_each_records_header_and_body_as_it_is() -> None:
    # what an operator sees with XRANGE: the source's length and name, then each record's
    # messages, received_at and body's length before the body
    assert entry_value(b"web", [(3, b"1700000000.5", b'{"batch":[]}'),
                                (1, b"1700000000.75", b"{}")]) == (
        b'3 web3 1700000000.5 12 {"batch":[]}1 1700000000.75 2 {}')


def _queued(source: bytes, at: bytes, parts: dict[int, tuple[bytes, int]]) -> _Queued:
    return (source, at, parts, True, None)  # type: ignore[return-value]  # (no future: not sent)


def test_a_groups_parts_make_one_entry_a_partition_and_source_in_order() -> None:
    group = [
        _queued(b"web", b"1.0", {3: (b"a", 2), 5: (b"b", 1)}),
        _queued(b"ios", b"2.0", {3: (b"c", 4)}),
        _queued(b"web", b"3.0", {5: (b"d", 3), 3: (b"e", 1)}),
    ]
    entries, where = _entries(group)
    assert entries == [
        (3, 3, entry_value(b"web", [(2, b"1.0", b"a"), (1, b"3.0", b"e")])),
        (5, 4, entry_value(b"web", [(1, b"1.0", b"b"), (3, b"3.0", b"d")])),
        (3, 4, entry_value(b"ios", [(4, b"2.0", b"c")])),
    ]
    assert where == [{3: 0, 5: 1}, {3: 2}, {5: 1, 3: 0}]


entries = st.lists(
    st.tuples(st.integers(min_value=0, max_value=63), counts, st.binary(max_size=300)),
    min_size=1, max_size=64,
)


@settings(max_examples=300, deadline=None)
@given(appended=entries, ids=st.booleans())
def test_the_append_is_packed_as_hiredis_packs_it(
    appended: list[tuple[int, int, bytes]], ids: bool
) -> None:
    # the entries' keys, then what to answer, then each entry's count and value, in order
    inbox = RedisInbox(aioredis.Redis(), 64)  # never connects: only packs
    keys = [k for p, _, _ in appended for k in (inbox_key(p), waiting_key(p))]
    args: list[str | bytes | int] = ["ids" if ids else "count"]
    for _, count, value in appended:
        args += (count, value)
    expected = hiredis.pack_command(("EVAL", _APPEND, len(keys), *keys, *args))  # type: ignore[arg-type]
    assert inbox._pack_append(appended, ids=ids) == expected
