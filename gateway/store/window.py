"""The dedupe window's per-key loops, over the window's table of bits (`sqlite._Window`).

Written twice: here in Python, and in C (gateway/_window.c, `gateway._window`), used where
it was built (setup.py: the build is optional); tests/unit/test_window_native.py holds the
two to each other, result for result and bit for bit.

A key is 16 bytes of BLAKE2b output, uniform: its 2 slots come from its own first 8 bytes
read as a little-endian integer `h`: `h & mask`, and that slot with its low 6 bits flipped
by `h >> 40 & 63` (another among the same 64 slots: one cache line). Not Python's `hash()`:
that is salted per process, and the C could not reproduce it. `mask` is the slots less one
(a power of two, at least 64 slots). The window's table is a byte a slot, a bit of it a day
(a plane); a day held apart is a bitmap, a bit a slot.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType

from gateway.compiled import load
from gateway.keys import DEDUPE_BYTES

Keys = list[bytes] | bytes | bytearray | memoryview  # a list, or the keys packed end to end


def _slots(key: bytes, mask: int) -> tuple[int, int]:
    h = int.from_bytes(key, "little")  # of a 16-byte key, its low 64 bits are the first 8 bytes
    a = h & mask
    return a, a ^ (h >> 40 & 63)


def _listed(keys: Keys) -> Iterator[bytes]:
    """Each key, checked as it comes (as the C does: the keys before a bad one are marked)."""
    if isinstance(keys, list):
        return map(_sized, keys)
    packed = bytes(keys)
    if len(packed) % DEDUPE_BYTES:
        raise ValueError(f"dedupe keys are {DEDUPE_BYTES} bytes each")
    return (packed[i : i + DEDUPE_BYTES] for i in range(0, len(packed), DEDUPE_BYTES))


def _sized(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != DEDUPE_BYTES:
        raise ValueError(f"dedupe keys are {DEDUPE_BYTES} bytes each")
    return key


def _table(bits: bytearray, mask: int, shift: int) -> None:
    if mask < 63 or mask & (mask + 1):
        raise ValueError("slots must be a power of two, at least 64")
    if len(bits) != (mask + 1) >> shift:
        raise ValueError("the table's size does not match its slots")


def mark(bits: bytearray, mask: int, bit: int, keys: Keys) -> None:
    """Set `bit` in both slots of each key."""
    _table(bits, mask, 0)
    for key in _listed(keys):
        a, b = _slots(key, mask)
        bits[a] |= bit
        bits[b] |= bit


def check(bits: bytearray, mask: int, new: int, keys: list[bytes]) -> list[tuple[bytes, int]]:
    """(key, the bits both its slots share) for each key they share any, in order; then
    `new` set in both slots of every key."""
    _table(bits, mask, 0)
    maybe: list[tuple[bytes, int]] = []
    for key in keys:
        if len(key) != DEDUPE_BYTES or not isinstance(key, bytes):
            _sized(key)
        h = int.from_bytes(key, "little")  # `_slots`, written out: the turn's hot loop
        a = h & mask
        b = a ^ (h >> 40 & 63)
        x, y = bits[a], bits[b]
        if v := x & y:
            maybe.append((key, v))
        bits[a] = x | new
        bits[b] = y | new
    return maybe


def mark_apart(bits: bytearray, mask: int, keys: Keys) -> None:
    """Set both slots of each key in a bitmap."""
    _table(bits, mask, 3)
    for key in _listed(keys):
        for s in _slots(key, mask):
            bits[s >> 3] |= 1 << (s & 7)


def holds_apart(bits: bytearray, mask: int, keys: list[bytes]) -> list[bytes]:
    """The keys both of whose slots a bitmap has set, in order."""
    _table(bits, mask, 3)
    return [
        key for key in keys
        if all(bits[s >> 3] >> (s & 7) & 1 for s in _slots(_sized(key), mask))
    ]


_STEP = 1 << 20  # bytes a byte map rewrites at once: no second copy of the table


def clear(bits: bytearray, plane: int) -> None:
    """Clear the plane's bit in every slot (a byte map, in C's `translate`)."""
    if not 0 <= plane <= 7:
        raise ValueError("a plane is 0 to 7")
    keep = bytes(v & ~(1 << plane) for v in range(256))
    for at in range(0, len(bits), _STEP):
        bits[at : at + _STEP] = bits[at : at + _STEP].translate(keep)


def copy_plane(bits: bytearray, plane: int, out: bytearray) -> None:
    """Bit `i` of `out` (len(bits) / 8 bytes) is slot `i`'s bit of the plane: each byte
    mapped to an ASCII digit, read as one binary number."""
    if not 0 <= plane <= 7 or len(bits) % 8 or len(out) != len(bits) // 8:
        raise ValueError("a plane is 0 to 7, copied into a bit a slot")
    digit = bytes(48 + (v >> plane & 1) for v in range(256))
    for at in range(0, len(bits), _STEP):
        digits = bits[at : at + _STEP].translate(digit)[::-1]  # slot `at` the lowest bit
        out[at >> 3 : (at + len(digits)) >> 3] = int(digits, 2).to_bytes(len(digits) >> 3, "little")


def unique_sorted(keys: list[bytes]) -> list[bytes]:
    """`sorted(set(keys))`, every key 16 bytes."""
    for key in keys:
        _sized(key)
    return sorted(set(keys))


PURE = sys.modules[__name__]
NATIVE = load("_window")
# the loops the window runs: the C where it was built, else the Python above
loops: ModuleType = PURE if NATIVE is None else NATIVE
