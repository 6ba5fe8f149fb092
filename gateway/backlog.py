"""How much accepted work is not yet forwarded: the bound behind ingest's 503.

Ingest and the pipeline may run in two processes (see `gateway.worker`), so the counters
live in a small array that both can map: a file in the data directory. Each counter has
one writer, ingest or the pipeline, so no lock is needed: a reader sees each 8-byte
counter whole.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# slot: writer
ACCEPTED = 0  # ingest: messages committed to the inbox since the counters were made
APPLIED = 1  # pipeline: messages applied by an actor (or kept as dead letters)
BASE = 2  # pipeline: inbox = accepted + base - applied; `resync` sets it from the store
OUTBOX = 3  # pipeline: upstream calls queued, not yet delivered or dead-lettered
SLOTS = 4


class Backlog:
    def __init__(self, limit: int, path: Path | None = None) -> None:
        """In memory, or shared through the file at `path` (made if missing, else reused)."""
        self.limit = limit
        self.requests = 0  # ingest requests being served right now, in this process
        self._map: mmap.mmap | None = None
        if path is None:
            self._slots = memoryview(bytearray(8 * SLOTS)).cast("q")
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8 * SLOTS:
                # real blocks, not a hole: writing a hole through the map on a full disk
                # would kill the process (SIGBUS) instead of failing here, at start
                os.posix_fallocate(fd, 0, 8 * SLOTS)
            self._map = mmap.mmap(fd, 8 * SLOTS)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")

    def close(self) -> None:
        if self._map is not None:
            self._slots.release()
            self._map.close()
            self._map = None

    @property
    def inbox(self) -> int:
        """Messages accepted, not yet applied by an actor."""
        s = self._slots
        return max(0, s[ACCEPTED] + s[BASE] - s[APPLIED])

    @property
    def outbox(self) -> int:
        """Upstream calls queued, not yet delivered or dead-lettered."""
        return max(0, self._slots[OUTBOX])

    @property
    def ingest_first(self) -> bool:
        """Requests are arriving and the inbox has room: routing should give way to ingest."""
        return self.requests > 0 and self.inbox < self.limit // 2

    @property
    def total(self) -> int:
        return self.inbox + self.outbox

    @property
    def full(self) -> bool:
        return self.total >= self.limit

    # ingest's

    def accepted(self, messages: int) -> None:
        self._slots[ACCEPTED] += messages

    # the pipeline's

    def resync(self, inbox: int, outbox: int) -> None:
        """Take the store's counts as the truth (at start, and after a replay)."""
        s = self._slots
        s[BASE] = inbox - s[ACCEPTED] + s[APPLIED]
        s[OUTBOX] = outbox

    def applied(self, messages: int, calls: int) -> None:
        self._slots[APPLIED] += messages
        self._slots[OUTBOX] += calls

    def sent(self, calls: int = 1) -> None:
        self._slots[OUTBOX] = max(0, self._slots[OUTBOX] - calls)
