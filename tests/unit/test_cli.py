"""`accoil-gateway` command line: exit codes, output, and what `serve` hands the server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.cli import main
from gateway.config import Settings

WK1, AK1 = "wk_cli_secret_1111", "ak_cli_secret_2222"
WK2, AK2 = "wk_cli_secret_3333", "stg_cli_secret_4444"
TOKEN = "tok_cli_secret_5555"
SECRETS = (WK1, AK1, WK2, AK2, TOKEN)

CONFIG = f"""
admin_token = "{TOKEN}"

[[sources]]
write_key = "{WK1}"
accoil_api_key = "{AK1}"
name = "web"

[[sources]]
write_key = "{WK2}"
accoil_api_key = "{AK2}"
api = "segment"
base_url = "http://127.0.0.1:8089"
rate_per_second = 12.5
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in list(os.environ):
        if var.startswith(("GATEWAY_", "ACCOIL_")):
            monkeypatch.delenv(var)
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "accoil-gateway"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    return str(path)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """A stand-in for gateway.server that records the settings it is started with."""
    started: list[Settings] = []

    async def serve(settings: Settings) -> None:
        structlog.get_logger("test").info("serving", note=f"key {AK1} inside")
        started.append(settings)

    module = types.ModuleType("gateway.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.server", module)
    return started


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_check_config_prints_sources(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", config]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"config ok ({config}): 2 sources\n")
    lines = out.splitlines()
    assert lines[1].split() == [
        "id", "api", "base_url", "track_mode", "rate_cap/s", "concurrency_cap"]
    # no caps by default: the adaptive limit paces the source
    assert lines[2].split() == ["web", "v2", "https://in.accoil.com", "exact", "none", "none"]
    row = lines[3].split()
    assert row[0].startswith("src_") and row[1:] == [
        "segment", "http://127.0.0.1:8089", "exact", "12.5", "none"]
    assert lines[4] == "server: 127.0.0.1:8088, data_dir ./data, admin routes on"
    assert_no_secret(out)


def test_check_config_environment_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_WRITE_KEY", WK1)
    monkeypatch.setenv("ACCOIL_API_KEY", AK1)
    monkeypatch.setenv("ACCOIL_NAME", "solo")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config ok (environment only): 1 source\n")
    assert "solo" in out and "admin routes off" in out
    assert_no_secret(out)


def test_check_config_reads_gateway_config_var(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", config)
    assert main(["check-config"]) == 0
    assert "2 sources" in capsys.readouterr().out


def test_check_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace("rate_per_second = 12.5", "rate_per_second = -3"))
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "config error: sources[1].rate_per_second: Expected float > 0.0, got -3\n"


def test_check_config_duplicate_key_hides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(CONFIG.replace(WK2, WK1))
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: sources[1].write_key: same write key as sources[0]")
    assert_no_secret(err)


def test_serve_bad_config_exits_2_without_traceback(
    server: list[Settings], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_WRITE_KEY", WK1)
    monkeypatch.setenv("ACCOIL_API_KEY", AK1)
    monkeypatch.setenv("GATEWAY_PORT", "abc")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err == 'config error: GATEWAY_PORT: expected an integer, got "abc"\n'
    assert server == []


def test_serve_without_any_source_exits_2(
    server: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("config error: sources: no source configured")
    assert server == []


def test_serve_passes_flags_and_logs_json(
    config: str, server: list[Settings], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9001")
    monkeypatch.setenv("GATEWAY_DATA_DIR", "/from/env")
    argv = ["serve", "--config", config, "--host", "0.0.0.0", "--port", "9002",
            "--flush-interval", "0.5", "--log-format", "json", "--log-level", "debug"]
    assert main(argv) == 0
    (settings,) = server
    assert (settings.host, settings.port, settings.data_dir) == ("0.0.0.0", 9002, "/from/env")
    assert (settings.flush_interval, settings.log_format, settings.log_level) == (0.5, "json", "debug")
    assert [s.name for s in settings.sources][0] == "web"
    assert settings.sources[1].name.startswith("src_")  # no name: a hash of the write key
    err = capsys.readouterr().err
    lines = {line["event"]: line for line in map(json.loads, err.splitlines())}
    assert lines["starting"]["port"] == 9002 and lines["starting"]["sources"][0] == "web"
    assert lines["serving"]["note"] == "key *** inside"
    # stdlib records (asyncio at debug level) come out as JSON lines too
    assert any(line.get("logger") == "asyncio" for line in lines.values())
    assert_no_secret(err)


def test_serve_error_is_logged_redacted_and_exits_1(
    config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def serve(settings: Settings) -> None:
        raise RuntimeError(f"upstream refused {AK2} and {WK1}")

    module = types.ModuleType("gateway.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.server", module)
    assert main(["serve", "--config", config, "--log-format", "json"]) == 1
    err = capsys.readouterr().err
    last = json.loads(err.splitlines()[-1])
    assert last["event"] == "gateway stopped on an error"
    assert "RuntimeError: upstream refused *** and ***" in last["exception"]
    assert_no_secret(err)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "check-config" in out and "Precedence" in out
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--host", "--port", "--data-dir", "--flush-interval", "--log-format"):
        assert flag in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: accoil-gateway" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "abc"])
    assert info.value.code == 2
    assert "--port: invalid int value: 'abc'" in capsys.readouterr().err


def test_module_entry_point(config: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ACCOIL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "--config", config],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "config ok" in done.stdout


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        # the default base URL: a stg_ key (any case) goes to staging, prefix stripped
        ({"ACCOIL_API": "segment", "ACCOIL_API_KEY": "Stg_key_for_staging_1"},
         "https://instaging.accoil.com"),
        # a base URL of one's own wins, and v2 keys are sent as they are
        ({"ACCOIL_API": "segment", "ACCOIL_API_KEY": "stg_key_for_staging_1",
          "ACCOIL_BASE_URL": "http://127.0.0.1:8089"}, "http://127.0.0.1:8089"),
        ({"ACCOIL_API": "v2", "ACCOIL_API_KEY": "stg_key_for_staging_1"}, "https://in.accoil.com"),
    ],
)
def test_check_config_shows_where_a_staging_key_goes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str], shown: str,
) -> None:
    monkeypatch.setenv("GATEWAY_WRITE_KEY", WK1)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2].split()[2] == shown
    staging = [line for line in lines if "stg_ key" in line]
    if shown.startswith("https://instaging"):
        assert staging == [
            f"  {lines[2].split()[0]}: stg_ key on the segment dialect: calls go to "
            "https://instaging.accoil.com/segment with the prefix stripped"
        ]
    else:
        assert staging == []
    assert "key_for_staging" not in out


def test_serve_waits_for_an_unreachable_redis_and_hides_the_password(tmp_path: Path) -> None:
    # the real command in a process of its own: Redis is not there, so it says so in one
    # line and keeps trying (a gateway started before its Redis comes up by itself)
    password = "redis_cli_password_9"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ACCOIL_"))}
    env.update({
        "GATEWAY_WRITE_KEY": WK1, "ACCOIL_API_KEY": AK1, "GATEWAY_STORE": "redis",
        "GATEWAY_REDIS_URL": f"redis://:{password}@127.0.0.1:1/0",
        "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_PORT": "0",
        "GATEWAY_LOG_FORMAT": "json",
    })
    out = tmp_path / "out.log"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], stdout=sink, stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 30
            while "Redis unreachable" not in out.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, out.read_text()  # waiting, not exited
                time.sleep(0.1)
            time.sleep(1.5)  # another try or two
            assert proc.poll() is None, out.read_text()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    text = out.read_text()
    lines = [json.loads(line) for line in text.splitlines() if "Redis unreachable" in line]
    assert len(lines) == 1  # one line, not one per try
    assert "redis://127.0.0.1:1/0" in lines[0]["error"]
    assert "Traceback" not in text
    assert password not in text


def test_check_config_shows_the_redis_store_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GATEWAY_WRITE_KEY", WK1)
    monkeypatch.setenv("ACCOIL_API_KEY", AK1)
    monkeypatch.setenv("GATEWAY_STORE", "redis")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://app:redis_cli_password_9@10.1.2.3:6379/0")
    monkeypatch.setenv("GATEWAY_PARTITIONS", "32")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "store: redis at redis://10.1.2.3:6379/0, 32 partitions, WAIT for 0 replicas "
        "(not contacted here)"
    )
    assert "redis_cli_password_9" not in out
