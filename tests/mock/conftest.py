from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.mock.mock_helpers import Ingest, Process


@pytest.fixture
async def ingest(mock_accoil: Any) -> AsyncIterator[Ingest]:
    async with aiohttp.ClientSession() as session:
        yield Ingest(session, mock_accoil.url)


@pytest.fixture
def spawn() -> Iterator[type[Process]]:
    started: list[Process] = []

    class Tracked(Process):
        def __init__(self, *flags: str) -> None:
            super().__init__(*flags)
            started.append(self)

    yield Tracked
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)
