"""The inbox: accepted request bodies, as an append-only log of segment files.

Ingest appends; the router reads in id order; a segment is deleted whole once every record
in it is applied (`SqliteStore.reap`). Appending is one `write` per group commit, made on
the event loop, so an acknowledgement costs no thread hop and no SQLite transaction: the
records of every request that arrived in the same turn of the loop go out together.

Durability follows `fsync`: "off" and "normal" write to the OS (a killed process loses
nothing), "full" also waits for `fdatasync` (a power cut loses nothing).

A record: a header (crc, id, received_at, count, body length, source length), the source
id, then the body. The crc covers everything after itself, so a record torn by a crash is
recognised: the next writer cuts it off; readers stop before a record that is not whole
yet.

A segment opens with `MAGIC`, and its records' crc is a CRC-32C (the CPU's own instruction,
through google-crc32c: about 1 µs for a 20 KB body where zlib's CRC-32 takes 5). A segment
without it was written before the magic existed, and its records carry zlib's CRC-32: it
is read as it is, and a writer that finds one at the end of the log starts a new segment
rather than mix the two in a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import google_crc32c

from gateway.disk import out_of_space
from gateway.store.base import InboxRow

HEADER = struct.Struct("<IQdIIH")  # crc, id, received_at, count, body length, source length
_CRC = struct.Struct("<I")
# opens a segment whose records carry a CRC-32C. A segment from before it starts with its
# first record, whose first 8 bytes (a crc, then the low half of the segment's first id)
# match these only by a 1 in 2**64 chance
MAGIC = b"GWINBX\x00\x02"
IOV_MAX = 1024  # pieces one writev takes
SEGMENT_BYTES = 64 * 1024 * 1024
SUFFIX = ".log"


def segment_name(first_id: int) -> str:
    return f"{first_id:020d}{SUFFIX}"


def crc32c(data: bytes, value: int = 0) -> int:
    """CRC-32C, chained as zlib.crc32 chains: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    crc: int = google_crc32c.extend(value, data)
    return crc


class Format(NamedTuple):
    """How a segment's records are checked: what opens the segment, and the crc function."""

    magic: bytes
    crc: Callable[[bytes, int], int]


LEGACY = Format(b"", zlib.crc32)  # segments written before MAGIC: read, never written
CURRENT = Format(MAGIC, crc32c)


def format_of(fd: int) -> Format | None:
    """A segment's format, or None while its magic is not written yet (a file just created,
    or one whose first write is under way: too short for a legacy record, so nothing in it
    is whole either way)."""
    start = os.pread(fd, len(MAGIC), 0)
    if start == MAGIC:
        return CURRENT
    if len(start) < len(MAGIC) and MAGIC.startswith(start):
        return None
    return LEGACY


def encode(
    row_id: int, source: str, received_at: float, count: int, body: bytes
) -> tuple[bytes, bytes, bytes]:
    """A record as the three pieces it is written from (no copy of the body)."""
    src = source.encode()
    head = HEADER.pack(0, row_id, received_at, count, len(body), len(src))[4:]
    crc = crc32c(body, crc32c(head + src))
    return _CRC.pack(crc) + head, src, body


class InboxLog:
    def __init__(self, directory: Path, *, fsync: str = "normal") -> None:
        self.dir = directory
        self.fsync = fsync
        self.segment_bytes = SEGMENT_BYTES
        self._fd: int | None = None  # the active segment, when this process appends
        self._size = 0
        self._next_id = 1
        self._pieces: list[bytes] = []
        self._waiting: list[tuple[asyncio.Future[int], int]] = []
        self._scheduled = False
        self._torn = False  # a failed write may have left part of a record at the end
        # where the last read stopped: (segment's first id, offset, last id read)
        self._cursor: tuple[int, int, int] | None = None

    # appending (ingest's process only)

    def open_for_append(self) -> None:
        """Find the last whole record, cut off a torn tail, and continue after it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        # a new inbox starts its ids at the clock (µs), not at 1: ids must never repeat one
        # that gateway.db still knows (progress, dedupe keys), should the inbox be replaced
        first = segments[-1] if segments else time.time_ns() // 1000
        path = self.dir / segment_name(first)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        found = format_of(fd)
        end, last = _scan(fd, first, found or CURRENT)
        if end < os.fstat(fd).st_size:
            os.ftruncate(fd, end)
        self._fd, self._size, self._next_id = fd, end, last + 1
        if found is not CURRENT:
            if last >= first:
                self._rotate()  # a legacy segment with records: leave it whole, as it was
            else:
                # nothing whole in it (a legacy file without a record, a torn magic): the
                # next write starts it again, magic first
                os.ftruncate(fd, 0)
                self._size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, source: str, received_at: float, body: bytes, count: int) -> asyncio.Future[int]:
        """Queue a record; the future resolves to its id once it is written (and synced, with
        fsync "full"). Records queued in one turn of the event loop share one write."""
        assert self._fd is not None, "inbox is not open for appending"
        loop = asyncio.get_running_loop()
        row_id = self._next_id
        self._next_id += 1
        self._pieces += encode(row_id, source, received_at, count, body)
        fut: asyncio.Future[int] = loop.create_future()
        self._waiting.append((fut, row_id))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._write)
        return fut

    def _write(self) -> None:
        self._scheduled = False
        pieces, waiting = self._pieces, self._waiting
        self._pieces, self._waiting = [], []
        fd = self._fd
        try:
            assert fd is not None, "inbox closed with writes pending"
            if self._torn:
                self._cut(fd)
            if not self._size:
                # in the segment's first write, not when it is created: a full disk has room
                # for a new empty file, not always for a block of data
                pieces.insert(0, MAGIC)
            self._size += _write_all(fd, pieces)
        except Exception as exc:
            # nothing of this group is acknowledged. What of it reached the file (a full disk
            # takes part of a write) is cut off before anything else is appended: readers stop
            # at a torn record, and a start cuts the log there, with every record after it
            self._torn = fd is not None
            if waiting:
                # nothing was appended after this group, and none of its ids was given out:
                # the next record takes the first of them, so ids stay contiguous across
                # segments (a reader moves to the next segment only at the next id)
                self._next_id = waiting[0][1]
            if fd is not None:
                with contextlib.suppress(OSError):
                    self._cut(fd)
                    if out_of_space(exc) and self._size:
                        # the disk is full: later appends go to a new segment, so that this
                        # one can be deleted (`reap`) as soon as it is applied
                        self._rotate()
            for fut, _ in waiting:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if self.fsync == "full":
            task = asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
            task.add_done_callback(lambda t: _settle(waiting, t.exception()))
        else:
            _settle(waiting, None)
        if self._size >= self.segment_bytes:
            self._rotate()

    def _cut(self, fd: int) -> None:
        """Shorten the segment to its last whole record (needs no free space)."""
        os.ftruncate(fd, self._size)
        self._torn = False

    def _rotate(self) -> None:
        assert self._fd is not None
        if self.fsync == "full":
            os.fdatasync(self._fd)
        path = self.dir / segment_name(self._next_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)  # if it fails, stay
        os.close(self._fd)
        self._fd, self._size = fd, 0

    # reading (any process)

    def segments(self) -> list[int]:
        """The first id of each segment, oldest first."""
        if not self.dir.exists():
            return []
        return sorted(int(p.name[: -len(SUFFIX)]) for p in self.dir.glob("*" + SUFFIX))

    def read_after(self, cursor: int, limit: int) -> list[InboxRow]:
        """Up to `limit` whole records with ids above `cursor`, in id order."""
        segments = self.segments()
        if not segments:
            return []
        if self._cursor is not None and self._cursor[2] == cursor and self._cursor[0] in segments:
            first, offset = self._cursor[0], self._cursor[1]
        else:
            first = max((s for s in segments if s <= cursor + 1), default=segments[0])
            offset = 0
        rows: list[InboxRow] = []
        while len(rows) < limit:
            path = self.dir / segment_name(first)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                break
            try:
                offset = _read(fd, offset, cursor, limit, rows)
            finally:
                os.close(fd)
            if rows:
                cursor = rows[-1].id
            later = [s for s in segments if s > first]
            if len(rows) >= limit or not later or later[0] > cursor + 1:
                break  # wanted all, or this segment is still being written
            first, offset = later[0], 0
        self._cursor = (first, offset, cursor)
        return rows

    def counts(self) -> dict[int, int]:
        """Every record's id and message count (headers only)."""
        found: dict[int, int] = {}
        for first in self.segments():
            found.update(self.records(first))
        return found

    def records(self, first_id: int) -> dict[int, int]:
        """The id and message count of each record of one segment (headers only)."""
        found: dict[int, int] = {}
        try:
            fd = os.open(self.dir / segment_name(first_id), os.O_RDONLY)
        except FileNotFoundError:
            return found
        try:
            fmt = format_of(fd)
            offset, size = len(fmt.magic) if fmt else 0, os.fstat(fd).st_size
            while fmt is not None and offset + HEADER.size <= size:
                _, row_id, _, count, body_len, src_len = HEADER.unpack(
                    os.pread(fd, HEADER.size, offset)
                )
                end = offset + HEADER.size + src_len + body_len
                if end > size:
                    break
                found[row_id] = count
                offset = end
        finally:
            os.close(fd)
        return found

    def drop(self, first_id: int) -> None:
        (self.dir / segment_name(first_id)).unlink(missing_ok=True)
        if self._cursor is not None and self._cursor[0] == first_id:
            self._cursor = None


def _write_all(fd: int, pieces: list[bytes]) -> int:
    total = 0
    for i in range(0, len(pieces), IOV_MAX):
        chunk = pieces[i : i + IOV_MAX]
        size = sum(map(len, chunk))
        written = os.writev(fd, chunk)
        if written < size:  # rare: a short write; finish the rest from one buffer
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]
        total += size
    return total


def _settle(waiting: list[tuple[asyncio.Future[int], int]], exc: BaseException | None) -> None:
    for fut, row_id in waiting:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(row_id)
        else:
            fut.set_exception(exc)


def _scan(fd: int, first: int, fmt: Format) -> tuple[int, int]:
    """The end of the last whole record of a segment, and its id (first - 1 if none)."""
    offset, last, size = len(fmt.magic), first - 1, os.fstat(fd).st_size
    while True:
        record = _record_at(fd, offset, size, fmt.crc)
        if record is None:
            return offset, last
        row, end = record
        offset, last = end, row.id


def _record_at(
    fd: int, offset: int, size: int, crc32: Callable[[bytes, int], int]
) -> tuple[InboxRow, int] | None:
    """The whole record at `offset` and where it ends, or None: not (yet) whole."""
    if offset + HEADER.size > size:
        return None
    head = os.pread(fd, HEADER.size, offset)
    crc, row_id, received_at, count, body_len, src_len = HEADER.unpack(head)
    end = offset + HEADER.size + src_len + body_len
    if end > size:
        return None
    rest = os.pread(fd, src_len + body_len, offset + HEADER.size)
    if len(rest) < src_len + body_len or crc32(rest, crc32(head[4:], 0)) != crc:
        return None  # torn by a crash, or still being written
    return InboxRow(row_id, rest[:src_len].decode(), received_at, rest[src_len:], count), end


def _read(fd: int, offset: int, cursor: int, limit: int, rows: list[InboxRow]) -> int:
    fmt = format_of(fd)
    if fmt is None:
        return offset
    offset = max(offset, len(fmt.magic))
    size = os.fstat(fd).st_size
    while len(rows) < limit:
        record = _record_at(fd, offset, size, fmt.crc)
        if record is None:
            break
        row, end = record
        if row.id > cursor:
            rows.append(row)
        offset = end
    return offset
