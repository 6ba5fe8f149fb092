"""The data folder's space: a reserve file, and whether the folder is full.

A full disk must not stop the gateway from finishing what it started: recording the outcomes
of calls Accoil already took, deleting delivered rows, checkpointing SQLite's log. So, as
databases do, the gateway keeps a preallocated file, `reserve` (`disk_reserve` bytes), in the
data folder. The first write that fails for want of space deletes it: the folder is then
*full*, ingest answers 503 with Retry-After (it must not eat the space it frees) and
`/readyz` says why, while the pipeline uses the freed space to record outcomes and drain.
Once the filesystem has room for the reserve twice over (and `SLACK` more), the reserve is
made again and the folder is no longer full.

The file is also how the two processes agree (see `gateway.worker`): either may release it
(whoever has a write refused), only the front (`owner`) makes it again, and a missing
reserve means full to both. Each change is logged once: the release by the process that
deleted the file, with the write that failed; the recovery by the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("gateway.disk")

NAME = "reserve"
POLL = 0.1  # seconds between the owner's looks at the reserve and the free space
STAT_EVERY = 0.25  # a non-owner trusts its last look at the reserve this long
SLACK = 1 << 20  # free bytes wanted beyond twice the reserve before ingest resumes
_CHUNK = 1 << 20
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(exc: BaseException | None) -> bool:
    """Whether a write failed for want of space (SQLite's "database or disk is full", or
    ENOSPC/EDQUOT from the OS), looking through chained exceptions."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class Disk:
    def __init__(
        self,
        directory: Path,
        reserve: int,
        *,
        owner: bool,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        """`owner`: this process makes the reserve (at `start` and when space returns);
        `on_change(full)` is called on each change this process sees."""
        self.dir = directory
        self.path = directory / NAME
        self.reserve = reserve
        self.owner = owner
        self._on_change = on_change
        self._full = False
        self._looked = -STAT_EVERY

    @property
    def full(self) -> bool:
        """The data folder is full: its reserve is released and not made again yet."""
        if not self.owner:
            now = time.monotonic()
            if now - self._looked >= STAT_EVERY:
                self._looked = now
                self._set(not self.path.exists())
        return self._full

    def start(self) -> None:
        """Owner: make the reserve if it is missing (a folder full at start is full)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.owner:
            return
        for stale in self.dir.glob(f"{NAME}.*.tmp"):  # a reserve a crash left half made
            stale.unlink(missing_ok=True)
        if self._present():
            return
        if not self._make():
            log.warning(
                "data folder full at start: no room for the space reserve; ingest answers 503"
                " until there is", data_dir=str(self.dir), reserve_bytes=self.reserve,
            )
            self._set(True)

    def refused(self, exc: BaseException, what: str) -> None:
        """A write of `what` failed: if for want of space, release the reserve."""
        if not out_of_space(exc):
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass  # released already, by this process or the other
        else:
            log.warning(
                "data folder full: space reserve released for outcomes and deletions; ingest"
                " answers 503 until space returns", data_dir=str(self.dir), write=what,
                reserve_bytes=self.reserve,
            )
        self._looked = time.monotonic()
        self._set(True)

    async def run(self) -> None:
        """Owner: follow the reserve, and make it again once there is room."""
        assert self.owner, "only the owner makes the reserve again"
        failed: str | None = None  # the last reason the reserve could not be made, said once
        while True:
            await asyncio.sleep(POLL)
            if not self._full:
                if not self._present():
                    self._set(True)  # the other process released it (and said so)
                continue
            try:
                made = (
                    free_bytes(self.dir) >= 2 * self.reserve + SLACK
                    and await asyncio.to_thread(self._make)
                )
            except OSError as exc:  # not for want of space (permissions, the folder gone)
                if failed != exc.strerror:
                    log.warning("cannot make the space reserve", data_dir=str(self.dir),
                                error=exc.strerror)
                    failed = exc.strerror
                continue
            if made:
                log.info(
                    "data folder has space again: reserve restored, ingest resumes",
                    data_dir=str(self.dir), free_bytes=free_bytes(self.dir),
                )
                failed = None
                self._set(False)

    def _set(self, full: bool) -> None:
        if full != self._full:
            self._full = full
            if self._on_change is not None:
                self._on_change(full)

    def _present(self) -> bool:
        try:
            return self.path.stat().st_size >= self.reserve
        except FileNotFoundError:
            return False

    def _make(self) -> bool:
        """Write the reserve beside its place, then move it in; False if there is no room."""
        tmp = self.dir / f"{NAME}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _allocate(fd, self.reserve)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in _SPACE_ERRNOS:
                return False
            raise


def _allocate(fd: int, size: int) -> None:
    """Really take `size` bytes (a sparse file would give nothing back when deleted)."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    zeros = bytes(_CHUNK)
    left = size
    while left > 0:
        left -= os.write(fd, zeros[: min(left, _CHUNK)])
