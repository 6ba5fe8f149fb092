"""`python -m mock_accoil` as a real process, and the CLI's fault flags."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from mock_accoil.cli import build_parser, faults_from_args, main
from mock_accoil.faults import Fault
from mock_accoil.state import MockAccoil
from tests.mock.mock_helpers import KEY, Process, request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_process_serves_journals_counts_and_exits_0(
    spawn: type[Process], sig: signal.Signals
) -> None:
    mock = spawn("--log-format", "json")
    auth = {"Authorization": f"Basic {KEY}", "Content-Type": "application/json"}
    assert request(mock.url + "/v2/identify", {"userId": "u1", "groupId": "g1"}, auth)[0] == 202
    assert (
        request(mock.url + "/v2/group", {"groupId": "g1", "traits": {"plan": "x"}}, auth)[0] == 202
    )
    assert (
        request(mock.url + "/v2/track", {"userId": "u1", "event": "Report_Created"}, auth)[0] == 202
    )
    status, reply = request(mock.url + "/v2/track", {"event": "Report_Created"}, auth)
    assert (status, reply["field"]) == (400, "userId")

    _, calls = request(mock.url + "/_mock/calls")
    assert [(c["path"], c["status"]) for c in calls] == [
        ("/v2/identify", 202),
        ("/v2/group", 202),
        ("/v2/track", 202),
        ("/v2/track", 400),
    ]
    today = datetime.now(UTC).date().isoformat()
    _, counts = request(mock.url + f"/_mock/counts?userId=u1&event=Report_Created&day={today}")
    assert counts == [
        {"api_key": KEY, "day": today, "userId": "u1", "event": "Report_Created", "count": 1}
    ]

    code, log = mock.stop(sig)
    assert code == 0
    lines = [json.loads(line) for line in log.splitlines()]
    call_lines = [line for line in lines if line["event"] == "call"]
    assert [(line["method"], line["path"], line["status"]) for line in call_lines][:4] == [
        ("POST", "/v2/identify", 202),
        ("POST", "/v2/group", 202),
        ("POST", "/v2/track", 202),
        ("POST", "/v2/track", 400),
    ]
    assert KEY not in log  # only a fingerprint of the key is logged
    assert call_lines[0]["key"].startswith("key_")


def test_process_fault_flags(spawn: type[Process]) -> None:
    mock = spawn("--fault-status", "429", "--fault-count", "1", "--fault-path", "/v2/track")
    auth = {"Authorization": f"Basic {KEY}"}
    track = {"userId": "u", "event": "E"}
    assert request(mock.url + "/v2/identify", {"userId": "u"}, auth)[0] == 202
    assert request(mock.url + "/v2/track", track, auth)[0] == 429
    assert request(mock.url + "/v2/track", track, auth)[0] == 202
    assert mock.stop()[0] == 0


def test_busy_port_exits_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        # a subprocess: main() configures structlog for the whole process
        done = subprocess.run(
            [sys.executable, "-m", "mock_accoil", "--port", port, "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert done.returncode == 1
    assert json.loads(done.stderr.splitlines()[-1])["event"] == "cannot serve"


def parse_faults(*argv: str) -> list[Fault]:
    return faults_from_args(build_parser().parse_args(list(argv)))


def test_fault_flags() -> None:
    assert parse_faults() == []
    assert parse_faults(
        "--fault-status",
        "503",
        "--fault-rate",
        "0.2",
        "--retry-after",
        "4",
        "--fault-path",
        "/segment",
    ) == [Fault(status=503, rate=0.2, retry_after=4, path="/segment")]
    assert parse_faults("--fault-status", "500", "--fault-count", "3") == [
        Fault(status=500, count=3)
    ]
    assert parse_faults("--latency", "0.05", "--drop-rate", "0.1") == [
        Fault(latency=0.05),
        Fault(drop=True, rate=0.1),
    ]
    assert parse_faults(
        "--fault", '{"status": 503, "count": 2, "path": "/v2/track"}', "--fault", '{"latency": 1}'
    ) == [Fault(status=503, count=2, path="/v2/track"), Fault(latency=1.0)]


@pytest.mark.parametrize(
    "argv",
    [
        ["--fault-rate", "0.5"],
        ["--fault-count", "2"],
        ["--fault-status", "200"],
        ["--fault-status", "503", "--fault-rate", "2"],
        ["--drop-rate", "1.5"],
        ["--fault", "{nope"],
        ["--fault", '{"status": 503, "drop": true}'],
        ["--fault-path", "/v2/nope", "--fault-status", "503"],
    ],
)
def test_bad_fault_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_help_documents_fault_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--fault-status",
        "--fault-rate",
        "--fault-count",
        "--fault-path",
        "--latency",
        "--drop-rate",
        "--retry-after",
        "--fault ",
        "--seed",
    ):
        assert flag in out


def test_cli_faults_reach_the_state() -> None:
    state = MockAccoil()
    for fault in parse_faults("--fault-status", "503", "--fault-count", "1"):
        state.add_fault(fault)
    assert (
        state.receive("/v2/identify", authorization="Basic k", body=b'{"userId":"u"}').status == 503
    )
    assert (
        state.receive("/v2/identify", authorization="Basic k", body=b'{"userId":"u"}').status == 202
    )
