"""pytest plugin: the `mock_accoil` fixture, registered through the `pytest11` entry point.

Loaded into every pytest session where the package is installed, so it imports
only pytest here; aiohttp and the mock load when a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mock_accoil.server import MockAccoilServer


@pytest.fixture
def mock_accoil() -> Iterator[MockAccoilServer]:
    """A fresh mock Accoil on a free 127.0.0.1 port, served from a background thread.

    Yields a `MockAccoilServer`: `.url` is the base URL to send Accoil calls to,
    `.state` the in-process `MockAccoil` to assert on, and `.calls()`, `.counts()`,
    `.users()`, `.accounts()`, `.add_fault()`, `.clear_faults()`, `.set_capacity()`,
    `.capacity()`, `.clear_capacity()`, `.reset()`, `.wait_calls()` /
    `await .wait_calls_async()` go through the inspection API.
    Works in sync and async tests alike.
    """
    from mock_accoil.server import MockAccoilServer

    with MockAccoilServer() as server:
        yield server
