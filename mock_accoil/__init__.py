"""mock_accoil: a faithful, inspectable local double of Accoil's ingestion API.

The names below load on first use, so that importing the package (as the
pytest plugin does in every session) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mock_accoil.app import create_app
    from mock_accoil.faults import Fault
    from mock_accoil.server import MockAccoilClient, MockAccoilError, MockAccoilServer
    from mock_accoil.state import MockAccoil

__all__ = [
    "Fault",
    "MockAccoil",
    "MockAccoilClient",
    "MockAccoilError",
    "MockAccoilServer",
    "create_app",
]

_HOMES = {
    "Fault": "mock_accoil.faults",
    "MockAccoil": "mock_accoil.state",
    "MockAccoilClient": "mock_accoil.server",
    "MockAccoilError": "mock_accoil.server",
    "MockAccoilServer": "mock_accoil.server",
    "create_app": "mock_accoil.app",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mock_accoil' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
