"""Fixtures the unit tests share."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from gateway.store import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in a fresh folder, closed after the test."""
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def logging_reset() -> Iterator[None]:
    """Undo a test's `configure_logging`: structlog's defaults, and no gateway handler on
    the standard root logger."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "accoil-gateway"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
