"""The `mock_accoil` pytest fixture and `MockAccoilServer`, from sync and async tests."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import aiohttp
import pytest

import mock_accoil as package
from mock_accoil.faults import Fault
from mock_accoil.server import MockAccoilError, MockAccoilServer
from mock_accoil.state import MockAccoil
from tests.mock.mock_helpers import KEY, v2_auth


def post(url: str, body: object) -> int:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=v2_auth(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        status: int = resp.status
        return status


def test_fixture_in_a_sync_test(mock_accoil: MockAccoilServer) -> None:
    assert mock_accoil.url.startswith("http://127.0.0.1:")
    assert post(mock_accoil.url + "/v2/track", {"userId": "u", "event": "E"}) == 202
    assert mock_accoil.wait_calls(1, path="/v2/track")[0]["api_key"] == KEY
    assert mock_accoil.count("u", "E") == 1
    # the same state, in-process and typed
    assert mock_accoil.state.count("u", "E") == 1
    assert mock_accoil.state.calls()[0].path == "/v2/track"


async def test_fixture_in_an_async_test(mock_accoil: MockAccoilServer) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"userId": "u", "traits": {"plan": "pro"}}
        async with session.post(
            mock_accoil.url + "/v2/identify", json=body, headers=v2_auth()
        ) as r:
            assert r.status == 202
    assert mock_accoil.users() == [{"api_key": KEY, "userId": "u", "traits": {"plan": "pro"}}]
    assert mock_accoil.state.users()[0].traits == {"plan": "pro"}


async def test_async_wait_does_not_block_the_test_loop(mock_accoil: MockAccoilServer) -> None:
    async def send_later() -> None:
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            body = {"userId": "u", "event": "E"}
            await session.post(mock_accoil.url + "/v2/track", json=body, headers=v2_auth())

    sender = asyncio.create_task(send_later())
    calls = await mock_accoil.wait_calls_async(1, path="/v2/track", within=5)
    await sender
    assert calls[0]["status"] == 202


def test_wait_gives_up(mock_accoil: MockAccoilServer) -> None:
    with pytest.raises(MockAccoilError, match="waited"):
        mock_accoil.wait_calls(1, within=0.05)


async def test_async_wait_gives_up(mock_accoil: MockAccoilServer) -> None:
    with pytest.raises(MockAccoilError, match="waited"):
        await mock_accoil.wait_calls_async(1, within=0.05)


def test_state_faults_apply_to_the_server(mock_accoil: MockAccoilServer) -> None:
    mock_accoil.state.add_fault(Fault(status=500, count=1))
    with pytest.raises(urllib.error.HTTPError) as failed:
        post(mock_accoil.url + "/v2/identify", {"userId": "u"})
    assert failed.value.code == 500
    assert post(mock_accoil.url + "/v2/identify", {"userId": "u"}) == 202
    mock_accoil.reset()
    assert mock_accoil.state.calls() == []


def test_the_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("mock_accoil")
    assert plugin is not None and plugin.__name__ == "mock_accoil.pytest_plugin"


def test_the_plugin_imports_cheaply() -> None:
    code = (
        "import sys, mock_accoil.pytest_plugin; "
        "print(sorted(m for m in ('aiohttp', 'structlog', 'mock_accoil.state') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_package_exports_load_lazily() -> None:
    assert package.MockAccoil is MockAccoil
    assert package.MockAccoilServer is MockAccoilServer
    with pytest.raises(AttributeError):
        _ = package.nothing_here


def test_server_with_given_state_and_lifecycle() -> None:
    state = MockAccoil()
    server = MockAccoilServer(state, log_calls=False)
    with server:
        assert server.state is state
        assert post(server.url + "/v2/group", {"groupId": "g"}) == 202
        with pytest.raises(RuntimeError):
            server.start()
    assert state.accounts()[0].group_id == "g"
    server.stop()  # stopping twice is harmless
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/_mock/calls", timeout=1)


def test_server_start_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError):
            MockAccoilServer(port=port, log_calls=False).start()
