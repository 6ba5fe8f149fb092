"""Every contract test that uses mock_accoil also checks the gateway's upstream bodies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_undocumented_fields(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test: no call the mock journaled carries a field Accoil does not document
    for its endpoint (DESIGN 3: v2 bodies carry only the documented fields)."""
    if "mock_accoil" not in request.fixturenames:
        yield
        return
    # asked for before the test runs, so that it is torn down after this check
    mock = request.getfixturevalue("mock_accoil")
    yield
    extra = [
        (c.path, c.unknown_fields) for c in mock.state.calls() if c.unknown_fields
    ]
    assert extra == [], f"upstream calls with undocumented fields: {extra}"
