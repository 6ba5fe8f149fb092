"""The data folder's space reserve and full state (`gateway.disk`)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from pathlib import Path

from gateway.disk import NAME, Disk, out_of_space

MB = 1024 * 1024


def _sqlite_full(tmp_path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(tmp_path / "tiny.db")
    conn.execute("PRAGMA max_page_count = 2")
    try:
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.execute("INSERT INTO t VALUES (?)", (bytes(64 * 1024),))
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("SQLite took a row larger than its page limit")


def test_out_of_space_knows_sqlite_and_os_errors(tmp_path: Path) -> None:
    full = _sqlite_full(tmp_path)
    assert "full" in str(full) and out_of_space(full)
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("append failed") from inner
    except RuntimeError as chained:
        assert out_of_space(chained)
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(sqlite3.OperationalError("database is locked"))
    assert not out_of_space(ValueError("x"))
    assert not out_of_space(None)


def test_release_on_a_space_error_only_and_once(tmp_path: Path) -> None:
    changes: list[bool] = []
    disk = Disk(tmp_path, 2 * MB, owner=True, on_change=changes.append)
    disk.start()
    reserve = tmp_path / NAME
    assert reserve.stat().st_size == 2 * MB
    assert reserve.stat().st_blocks * 512 >= 2 * MB, "the reserve must hold real blocks"
    disk.refused(sqlite3.OperationalError("database is locked"), "gateway.db")
    assert not disk.full and reserve.exists()
    disk.refused(OSError(errno.ENOSPC, "No space left on device"), "inbox")
    assert disk.full and not reserve.exists()
    disk.refused(OSError(errno.ENOSPC, "No space left on device"), "inbox")
    assert changes == [True]


async def test_owner_restores_the_reserve_when_there_is_room(tmp_path: Path) -> None:
    changes: list[bool] = []
    owner = Disk(tmp_path, 1 * MB, owner=True, on_change=changes.append)
    other = Disk(tmp_path, 1 * MB, owner=False)
    owner.start()
    task = asyncio.create_task(owner.run())
    try:
        assert not other.full
        # the other process has a write refused: both see the folder full
        other.refused(OSError(errno.ENOSPC, "No space left on device"), "gateway.db")
        assert other.full
        # this disk has room: the owner makes the reserve again, and both see it
        for _ in range(100):
            if changes == [True, False]:
                break
            await asyncio.sleep(0.05)
        assert changes == [True, False]
        assert (tmp_path / NAME).stat().st_size == 1 * MB
        await asyncio.sleep(0.3)
        assert not owner.full and not other.full
    finally:
        task.cancel()
