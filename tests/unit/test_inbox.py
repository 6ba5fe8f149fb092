"""The inbox log: appends on the event loop, group commits, segments, a reader elsewhere."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from gateway.store import inbox
from gateway.store.inbox import InboxLog


async def test_records_cross_segments_and_read_back_in_order(tmp_path: Path) -> None:
    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    writer.segment_bytes = 1000
    rng = random.Random(7)
    bodies = [rng.randbytes(rng.randint(0, 600)) for _ in range(400)]
    # appended in one turn of the loop: one group, one writev
    ids = await asyncio.gather(*(writer.append("s", float(i), b, i % 7) for i, b in enumerate(bodies)))
    one = ids[0]  # a new inbox starts at the clock, so that ids never repeat older ones
    assert one > 1_700_000_000 * 10**6 and ids == list(range(one, one + 400))
    more = [await writer.append("t", 0.0, b"x" * i, 1) for i in range(50)]
    assert more == list(range(one + 400, one + 450))
    # a group is never split: the 400 share the first segment, later ones rotate every ~1000 bytes
    assert writer.segments()[:2] == [one, one + 400] and len(writer.segments()) > 3

    reader = InboxLog(tmp_path / "inbox")  # another process's view: it never appends
    got, cursor = [], 0
    while rows := reader.read_after(cursor, 64):
        got += rows
        cursor = rows[-1].id
    assert [r.id for r in got] == list(range(one, one + 450))
    assert [r.body for r in got[:400]] == bodies
    assert [(r.source, r.count) for r in got[398:402]] == [("s", 398 % 7), ("s", 399 % 7), ("t", 1), ("t", 1)]
    assert reader.counts() == {r.id: r.count for r in got}
    # a reader may start anywhere, and a dropped segment is skipped
    assert [r.id for r in reader.read_after(one + 199, 3)] == [one + 200, one + 201, one + 202]
    first = reader.segments()[0]
    reader.drop(first)
    assert reader.read_after(0, 1)[0].id == reader.segments()[0]
    writer.close()


async def test_a_record_being_written_is_not_read_yet(tmp_path: Path) -> None:
    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    await writer.append("s", 1.0, b"whole", 1)
    (segment,) = (tmp_path / "inbox").iterdir()
    with open(segment, "ab") as f:  # noqa: ASYNC230  # half a record, as a reader may see mid-write
        f.write(b"\x00" * 20)
    reader = InboxLog(tmp_path / "inbox")
    assert [r.body for r in reader.read_after(0, 10)] == [b"whole"]
    writer.close()


async def test_a_write_the_disk_cut_short_is_cut_off_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    first = await writer.append("s", 1.0, b"before", 1)
    real = inbox._write_all

    def half_then_full(fd: int, pieces: list[bytes]) -> int:
        os.write(fd, b"".join(pieces)[:25])  # the disk took part of the record
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inbox, "_write_all", half_then_full)
    with pytest.raises(OSError, match="No space"):
        await writer.append("s", 2.0, b"refused", 1)
    monkeypatch.setattr(inbox, "_write_all", real)
    after = await writer.append("s", 3.0, b"after", 1)
    assert after == first + 1, "the refused record's id is given to the next one"
    # the full disk moved appends to a new segment, so the old one can be reaped once applied
    assert writer.segments() == [first, after]
    # a reader does not stop at the torn record, and a restart keeps what came after it
    reader = InboxLog(tmp_path / "inbox")
    assert [(r.id, r.body) for r in reader.read_after(0, 10)] == [(first, b"before"), (after, b"after")]
    writer.close()
    again = InboxLog(tmp_path / "inbox")
    again.open_for_append()
    assert await again.append("s", 4.0, b"next", 1) == after + 1
    assert [r.body for r in InboxLog(tmp_path / "inbox").read_after(0, 10)] == [b"before", b"after", b"next"]
    again.close()


def legacy_record(row_id: int, source: str, received_at: float, count: int, body: bytes) -> bytes:
    """A record as the inbox wrote it before segments had a magic: zlib's CRC-32 (the
    encoder of that version, verbatim)."""
    src = source.encode()
    head = inbox.HEADER.pack(0, row_id, received_at, count, len(body), len(src))[4:]
    crc = zlib.crc32(body, zlib.crc32(src, zlib.crc32(head)))
    return struct.pack("<I", crc) + head + src + body


def write_legacy(folder: Path, first: int, bodies: list[bytes], tail: bytes = b"") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / inbox.segment_name(first)
    path.write_bytes(
        b"".join(legacy_record(first + i, "old", float(i), i + 1, b) for i, b in enumerate(bodies))
        + tail
    )
    return path


async def test_a_pre_upgrade_inbox_is_read_in_full_and_appended_after(tmp_path: Path) -> None:
    rng = random.Random(3)
    first = 1_750_000_000_000_000
    old = [rng.randbytes(rng.randint(0, 3000)) for _ in range(30)]
    write_legacy(tmp_path / "inbox", first - 30, old[:10])
    # the last segment ends with a record the crash tore: the writer cuts it off
    torn = legacy_record(first + 20, "old", 0.0, 1, b"torn" * 50)[:-7]
    last = write_legacy(tmp_path / "inbox", first - 20, old[10:], tail=torn)

    reader = InboxLog(tmp_path / "inbox")
    got = reader.read_after(0, 100)
    assert [r.id for r in got] == list(range(first - 30, first))
    assert [r.body for r in got] == old and got[12].source == "old" and got[12].count == 3
    assert reader.counts() == {r.id: r.count for r in got}

    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    assert last.stat().st_size == sum(len(legacy_record(0, "old", 0.0, 0, b)) for b in old[10:])
    new = [await writer.append("new", 1.0, b"new %d" % i, 1) for i in range(3)]
    assert new == [first, first + 1, first + 2]
    # the new records start a segment of their own, with the magic: no file mixes the formats
    assert writer.segments() == [first - 30, first - 20, first]
    assert (tmp_path / "inbox" / inbox.segment_name(first)).read_bytes().startswith(inbox.MAGIC)
    rows, cursor = [], 0
    while batch := InboxLog(tmp_path / "inbox").read_after(cursor, 7):
        rows += batch
        cursor = batch[-1].id
    assert [r.body for r in rows] == old + [b"new 0", b"new 1", b"new 2"]
    writer.close()


async def test_a_legacy_segment_without_a_whole_record_is_restarted_in_the_new_format(
    tmp_path: Path,
) -> None:
    path = write_legacy(tmp_path / "inbox", 500, [], tail=legacy_record(500, "s", 0.0, 1, b"x")[:-1])
    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    assert await writer.append("s", 1.0, b"body", 2) == 500
    assert writer.segments() == [500] and path.read_bytes().startswith(inbox.MAGIC)
    assert [(r.id, r.body, r.count) for r in InboxLog(tmp_path / "inbox").read_after(0, 5)] == [
        (500, b"body", 2)
    ]
    writer.close()


async def test_a_record_with_a_flipped_bit_is_not_read(tmp_path: Path) -> None:
    writer = InboxLog(tmp_path / "inbox")
    writer.open_for_append()
    await writer.append("s", 1.0, b"first", 1)
    second = await writer.append("s", 1.0, b"second", 1)
    writer.close()
    (segment,) = (tmp_path / "inbox").iterdir()
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0x10  # inside the second body: its CRC-32C no longer matches
    segment.write_bytes(bytes(data))
    assert [r.body for r in InboxLog(tmp_path / "inbox").read_after(0, 5)] == [b"first"]
    again = InboxLog(tmp_path / "inbox")
    again.open_for_append()  # the writer cuts the bad record off and reuses its id
    assert await again.append("s", 2.0, b"again", 1) == second
    assert [r.body for r in InboxLog(tmp_path / "inbox").read_after(0, 5)] == [b"first", b"again"]
    again.close()


def test_crc32c_is_the_castagnoli_crc_and_chains() -> None:
    assert inbox.crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert inbox.crc32c(b"6789", inbox.crc32c(b"12345")) == inbox.crc32c(b"123456789")
    assert inbox.crc32c(b"") == 0
