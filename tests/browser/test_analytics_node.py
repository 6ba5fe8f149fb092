"""Segment's Node SDK (`@segment/analytics-node`, pinned in tests/browser/package.json) against
the gateway as users run it (`python -m gateway serve`): what reaches mock_accoil."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from mock_accoil.server import MockAccoilServer
from tests.browser.support import HERE, require_node_sdk
from tests.contract.test_process import WRITE_KEY, gateway_process


def test_analytics_node_reaches_accoil(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    node = require_node_sdk()
    data = tmp_path / "data"
    data.mkdir()
    with gateway_process(mock_accoil.url, data, "--flush-interval", "0.1") as (_, url):
        run = subprocess.run(
            [node, str(HERE / "analytics_node.cjs"), url, WRITE_KEY, "node-user", "acme"],
            cwd=HERE, capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "flushed"
        deadline = time.monotonic() + 20
        # identify, group, three tracks, page and screen
        while len(mock_accoil.calls()) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert mock_accoil.count("node-user", "Report Exported") == 3
    assert mock_accoil.count("node-user", "Page Viewed Getting Started") == 1
    assert mock_accoil.count("node-user", "Screen Viewed Settings") == 1
    (user,) = mock_accoil.users()
    assert user["traits"] == {"email": "node-user@acme.io", "createdAt": "2024-01-15T10:00:00.000Z"}
    (account,) = mock_accoil.accounts()
    assert account["traits"] == {"name": "Acme", "mrr": 99.5}
    assert account["members"] == ["node-user"]
    assert [c["status"] for c in mock_accoil.calls()] == [202] * 7
    assert [c for c in mock_accoil.calls() if c["unknown_fields"]] == []
