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


@pytest.fixture(scope="session")
def mock_accoil_server() -> Iterator[MockAccoilServer]:
    """The mock Accoil of the whole session, on a free 127.0.0.1 port (started once)."""
    from mock_accoil.server import MockAccoilServer

    with MockAccoilServer() as server:
        yield server


@pytest.fixture
def mock_accoil(mock_accoil_server: MockAccoilServer) -> Iterator[MockAccoilServer]:
    """A mock Accoil with nothing in it: the session's server, its state, journal, faults and capacity
    cleared before the test (as pytest-httpserver's fixture does), so a test never sees
    another's calls and the server starts once.

    Yields a `MockAccoilServer`: `.url` is the base URL to send Accoil calls to,
    `.state` the in-process `MockAccoil` to assert on, and `.calls()`, `.counts()`,
    `.users()`, `.accounts()`, `.add_fault()`, `.clear_faults()`, `.set_capacity()`,
    `.capacity()`, `.clear_capacity()`, `.reset()`, `.wait_calls()` /
    `await .wait_calls_async()` go through the inspection API.
    Works in sync and async tests alike. A test that needs a server of its own (another
    state, stopped and started) makes a `MockAccoilServer` itself.
    """
    mock_accoil_server.state.reset(renumber=True)
    yield mock_accoil_server
