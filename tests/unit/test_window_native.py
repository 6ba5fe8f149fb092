"""The dedupe window's loops in C (gateway/_window.c) against the same in Python
(`gateway.store.window`): the same results and the same bits, call for call."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.keys import dedupe_key
from gateway.store import window

native = window.NATIVE
pure = window.PURE
needs_module = pytest.mark.skipif(native is None, reason="gateway._window is not built")

key = st.binary(min_size=16, max_size=16)
# few distinct keys in a list often: repeats, and keys sharing their slots at 64 slots
keys = st.lists(st.one_of(key, st.sampled_from([b"\x00" * 16, b"\xff" * 16, b"k" * 16])),
                max_size=200)
slots = st.sampled_from([64, 128, 1 << 12])
plane = st.integers(0, 7)


def test_the_module_is_built_where_a_compiler_is() -> None:
    # a broken build must fail CI, not leave the window's loops in Python unnoticed
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert native is not None, "gateway._window did not build: run `make install`"
    assert window.loops is native


def both(name: str, *args: Any) -> Any:
    """`name` run by each, on copies of the tables among `args`: the same result, the same
    tables after (or the same error)."""
    outcomes = []
    for loops in (pure, native):
        copies = [bytearray(a) if isinstance(a, bytearray) else a for a in args]
        fn: Callable[..., Any] = getattr(loops, name)
        try:
            result = fn(*copies)
        except ValueError as exc:
            result = f"ValueError: {exc}"
        outcomes.append((result, [c for c in copies if isinstance(c, bytearray)]))
    assert outcomes[0] == outcomes[1]
    return outcomes[0][0]


def table(n: int, seed: bytes) -> bytearray:
    """A table of `n` bytes, some bits set in every plane."""
    return bytearray((seed * (n // max(1, len(seed)) + 1))[:n]) if seed else bytearray(n)


@needs_module
@settings(max_examples=300, deadline=None)
@given(slots, plane, keys, st.binary(max_size=64))
def test_marks_and_checks_are_the_same_bits(n: int, p: int, ks: list[bytes], seed: bytes) -> None:
    bits = table(n, seed)
    both("mark", bits, n - 1, 1 << p, ks)
    both("mark", bits, n - 1, 1 << p, b"".join(ks))  # packed end to end
    both("check", bits, n - 1, 1 << p, ks)
    apart = table(n >> 3, seed)
    both("mark_apart", apart, n - 1, ks)
    both("mark_apart", apart, n - 1, b"".join(ks))
    both("holds_apart", apart, n - 1, ks)


@needs_module
@settings(max_examples=200, deadline=None)
@given(slots, plane, keys, keys)
def test_a_checked_key_is_found_again_in_its_plane(n: int, p: int, first: list[bytes],
                                                    later: list[bytes]) -> None:
    # what the window relies on: a key checked under a plane always finds that plane's bit
    assert native is not None
    for loops in (pure, native):
        bits = bytearray(n)
        loops.check(bits, n - 1, 1 << p, first)
        found = {k for k, v in loops.check(bits, n - 1, 1 << p, first + later) if v >> p & 1}
        assert set(first) <= found
        apart = bytearray(n >> 3)
        loops.mark_apart(apart, n - 1, first)
        assert set(first) <= set(loops.holds_apart(apart, n - 1, first + later))


@needs_module
@settings(max_examples=200, deadline=None)
@given(slots, plane, st.binary(min_size=8, max_size=8))
def test_a_plane_cleared_or_copied_apart_is_the_same(n: int, p: int, seed: bytes) -> None:
    bits = table(n, seed + bytes(range(256)))
    both("clear", bits, p)
    both("copy_plane", bits, p, bytearray(n >> 3))


@needs_module
@settings(max_examples=300, deadline=None)
@given(keys)
def test_the_keys_of_a_turn_sorted_once_each(ks: list[bytes]) -> None:
    assert both("unique_sorted", ks) == sorted(set(ks))


@needs_module
@pytest.mark.parametrize("bad", [b"short", b"x" * 17, "a str key of sixteen"[:16]])
def test_a_key_of_another_size_is_refused_alike(bad: Any) -> None:
    good = [dedupe_key(b"s", "m1")]
    for name, args in [
        ("unique_sorted", (good + [bad],)),
        ("check", (bytearray(64), 63, 1, good + [bad])),
        ("mark", (bytearray(64), 63, 1, good + [bad])),
        ("holds_apart", (bytearray(8), 63, good + [bad])),
        ("mark_apart", (bytearray(8), 63, good + [bad])),
    ]:
        assert both(name, *args) == "ValueError: dedupe keys are 16 bytes each", name
    assert both("mark", bytearray(64), 63, 1, b"x" * 20) == (
        "ValueError: dedupe keys are 16 bytes each")


@needs_module
@pytest.mark.parametrize(("size", "mask"), [(64, 31), (64, 64), (100, 99), (32, 63)])
def test_a_table_that_does_not_match_its_slots_is_refused_alike(size: int, mask: int) -> None:
    found = both("check", bytearray(size), mask, 1, [dedupe_key(b"s", "m1")])
    assert isinstance(found, str) and found.startswith("ValueError")
    found = both("mark_apart", bytearray(size >> 3), mask, [dedupe_key(b"s", "m1")])
    assert isinstance(found, str) and found.startswith("ValueError")


def test_a_key_takes_its_slots_from_its_own_bytes() -> None:
    # the same slots in every process (not Python's salted hash): low 8 bytes, little-endian
    k = bytes([5, 0, 0, 0, 0, 0x2A, 0, 0]) + b"\x00" * 8
    bits = bytearray(1 << 12)
    window.loops.mark(bits, (1 << 12) - 1, 1 << 3, [k])
    assert [i for i, v in enumerate(bits) if v] == sorted({5, 5 ^ 0x2A}) and bits[5] == 8
