from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mock_helpers import Ingest


@pytest.fixture
async def ingest(mock_accoil: Any) -> AsyncIterator[Ingest]:
    async with aiohttp.ClientSession() as session:
        yield Ingest(session, mock_accoil.url)
