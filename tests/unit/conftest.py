"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in a fresh folder, closed after the test."""
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    yield s
    await s.close()
