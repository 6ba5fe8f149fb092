"""A short load test against a spawned mock_accoil and gateway: the report's shape, and the
completeness check it exists for (expected == counted, per event name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import loadtest


def run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    code = loadtest.main([
        "--spawn", "--workdir", str(tmp_path / "work"), "--accounts", "8", "--users", "40",
        "--duration", "1.5", "--connections", "4", "--drain-timeout", "60", "--no-progress",
        "--json", str(out), *extra,
    ])
    report: dict[str, Any] = json.loads(out.read_text())
    assert code == 0, report["completeness"]
    return report


def check_complete(report: dict[str, Any]) -> None:
    comp = report["completeness"]
    assert comp["checked"] and comp["ok"] and comp["mode"] == "exact"
    assert comp["mismatches"] == []
    assert comp["expected_total"] == comp["counted_total"] > 0
    for row in comp["events"]:
        assert row["expected"] == row["counted"], row
    assert report["drain"]["drained"]


def test_paced_run_with_resends(tmp_path: Path) -> None:
    report = run(tmp_path, "--rate", "1000", "--batch-size", "25", "--dup-rate", "0.2")
    check_complete(report)
    ev, req = report["events"], report["requests"]
    assert req["status"] == {"200": req["sent"]}
    assert ev["resent"] > 0 and ev["accepted"] == ev["sent"]
    assert ev["accepted_distinct"] == ev["sent"] - ev["resent"]
    assert report["latency_ms"]["from"] == "due time (open loop)"
    assert report["latency_ms"]["count"] == req["sent"]
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    up = report["upstream"]
    # every counted occurrence is one /v2/track call; identify and group coalesce
    assert up["by_path"]["/v2/track"] == report["completeness"]["counted_total"]
    assert up["calls"] == sum(up["by_path"].values()) == sum(up["by_status"].values())
    assert up["calls_per_event"] == round(up["calls"] / ev["accepted_distinct"], 4)
    assert 0 < up["calls_per_event"] <= 1
    assert report["gateway_stats"]["dead_letters"] == 0


def test_open_throttle_gzip_run(tmp_path: Path) -> None:
    report = run(tmp_path, "--gzip", "--batch-size", "40", "--mix", "track=3,page=1,group=1")
    check_complete(report)
    assert report["config"]["gzip"] and report["config"]["rate"] is None
    assert report["latency_ms"]["from"] == "send time"
    assert report["throughput"]["events_per_s"] > 0
    assert "/v2/identify" not in report["upstream"]["by_path"]
