"""Every contract test that uses mock_accoil also checks the gateway's upstream bodies, and
every test that builds its gateway with `harness.settings_for` runs with the pipeline in a
worker process (the default) and in the test's process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.contract import harness
from tests.redis.redis_support import RedisServer, require_redis

# the contract tests that also run with `store = "redis"` (two-process mode, one Redis): the
# end-to-end contract (mapping, dedupe, coalescing, ledger, dead letters, replay)
REDIS_MODULES = {"test_end_to_end"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "settings_for", None) is harness.settings_for:
        modes = ["process", "inline"]
        if metafunc.definition.get_closest_marker("inline"):
            modes = ["inline"]
        elif metafunc.module.__name__.rsplit(".", 1)[-1] in REDIS_MODULES:
            modes.append("redis")
        metafunc.parametrize("pipeline_mode", modes, indirect=True)


@pytest.fixture(scope="session")
def contract_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(Path(tmp_path_factory.mktemp("contract-redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def pipeline_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    mode = getattr(request, "param", "inline")
    if mode == "redis":
        server: RedisServer = request.getfixturevalue("contract_redis")
        with server.client() as c:
            c.flushall()
        harness.Mode.pipeline, harness.Mode.redis_url = "process", server.url
    else:
        harness.Mode.pipeline = mode
    yield mode
    harness.Mode.pipeline, harness.Mode.redis_url = "inline", None


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
