from __future__ import annotations

from collections.abc import Iterator

import pytest

from mock_accoil.server import MockAccoilServer


@pytest.fixture
def mock_accoil() -> Iterator[MockAccoilServer]:
    """The plugin's fixture without its per-call log lines: thousands of them would cost
    the CPU the measured processes need."""
    with MockAccoilServer(log_calls=False) as server:
        yield server
