"""Shared helpers of the reliability suite (a unique module name: tests/ has no packages).

`GatewayProcess` runs `python -m gateway serve` as a child process on a free loopback
port, with its log captured to a file, and can SIGKILL and restart it on the same data
directory. `record()` writes a test's figures to a JSON file (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.net import basic as basic
from tests.net import free_port as free_port

WRITE_KEY = "wk_reliability_3f9a1c77e2"
API_KEY = "ak_reliability_b81d04c6f5"
ADMIN_TOKEN = "adm_reliability_5e27aa90d1"

# Where the figures of a run go: $RELIABILITY_FIGURES, else a file in the temp directory.
FIGURES_ENV = "RELIABILITY_FIGURES"


def figures_path() -> Path:
    given = os.environ.get(FIGURES_ENV)
    if given:
        return Path(given)
    return Path(tempfile.gettempdir()) / "accoil-gateway-reliability" / "figures.json"


def record(name: str, figures: dict[str, Any]) -> None:
    """Merge one scenario's figures into the figures file, and print them (`pytest -s`)."""
    path = figures_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    current[name] = {**figures, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    print(f"\n[reliability] {name}: {json.dumps(figures, sort_keys=True)}")


def bearer(token: str = ADMIN_TOKEN) -> str:
    return f"Bearer {token}"


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """A blocking request that returns (status, headers, body) for any status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def gateway_env(
    *,
    write_key: str | None = WRITE_KEY,
    api_key: str | None = API_KEY,
    base_url: str | None = None,
    admin_token: str | None = ADMIN_TOKEN,
    **extra: str,
) -> dict[str, str]:
    """The child's environment: ours minus any GATEWAY_/ACCOIL_ variable, plus these."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "ACCOIL_"))
    }
    # the worker at the tests' own CPU priority, not `pipeline_nice`'s 10: on a busy machine
    # a worker at 10 gets a tenth of a fair share of the CPU (RELIABILITY.md, "Tests that
    # the load broke"), and a test's bound on its progress measured the machine
    env["GATEWAY_PIPELINE_NICE"] = "0"
    for name, value in (
        ("GATEWAY_WRITE_KEY", write_key),
        ("ACCOIL_API_KEY", api_key),
        ("ACCOIL_BASE_URL", base_url),
        ("GATEWAY_ADMIN_TOKEN", admin_token),
    ):
        if value is not None:
            env[name] = value
    env.update(extra)
    return env


class GatewayProcess:
    """`python -m gateway serve` as a child process; always `close()` it (try/finally)."""

    # in a session (and process group) of its own, so that a signal can reach its worker too
    new_session = False

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str],
        *,
        flush_interval: float = 0.2,
        host: str | None = "127.0.0.1",
        port: int | None = None,
        config: Path | None = None,
        log_level: str = "info",
    ) -> None:
        self.data_dir = data_dir
        self.env = env
        self.flush_interval = flush_interval
        self.host = host
        self.port = port if port is not None else free_port()
        self.config = config
        self.log_level = log_level
        self.log_path = data_dir.parent / f"{data_dir.name}-gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--flush-interval", str(self.flush_interval),
                "--log-format", "json", "--log-level", self.log_level]
        if self.host is not None:
            args += ["--host", self.host]
        if self.config is not None:
            args += ["--config", str(self.config)]
        return args

    def start(self, within: float = 20.0) -> None:
        """Start it and wait until /healthz answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args(), env=self.env, cwd=self.data_dir.parent,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        self.starts += 1
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode} on start:\n{self.log()[-3000:]}"
                )
            with contextlib.suppress(OSError):
                status, _, _ = http("GET", self.url + "/healthz", timeout=1.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not answer within {within}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, within: float = 20.0) -> int | None:
        """SIGTERM and wait for the drain; SIGKILL if it takes longer than `within`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(within)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def close(self) -> None:
        self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self) -> dict[str, Any]:
        status, _, body = http("GET", self.url + "/admin/stats", headers={"Authorization": bearer()})
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def wait_drained(self, within: float) -> float:
        """Wait until the inbox and the outbox are empty; the seconds it took."""
        started = time.monotonic()
        deadline = started + within
        while True:
            stats = self.stats()
            if stats["inbox_messages"] == 0 and stats["outbox_calls"] == 0:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"not drained within {within}s: {stats}")
            time.sleep(0.05)


# Seconds a test waits for everything acknowledged to be applied and forwarded, when the
# drain is checked, not timed: a message left for ever still fails, and a loaded 2-core
# machine (a worker given a small share of a core) is not read as one (a 30 s bound failed
# once at load 6 to 9 with one message still on its way)
DRAINED = 120.0

# Set to 1 to skip the tests that need a tmpfs mount (a non-root local run); by default a
# refused mount fails them, so a CI run cannot pass without having tried a full disk.
NO_MOUNT_ENV = "RELIABILITY_NO_MOUNT"


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` MB mounted at `path` (made if missing), unmounted after."""
    import pytest

    if os.environ.get(NO_MOUNT_ENV) == "1":
        pytest.skip(f"{NO_MOUNT_ENV}=1: tests that need a small tmpfs are skipped")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"could not mount a {size_mb} MB tmpfs at {path} (the disk-full tests run as root):"
            f" {done.stderr.strip() or done.returncode}. Set {NO_MOUNT_ENV}=1 to skip them.",
            pytrace=False,
        )
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)


def fill(path: Path, *, chunk: int = 64 * 1024) -> int:
    """Write zeros to `path` until the filesystem is full; the bytes written."""
    written = 0
    zeros = bytes(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                n = os.write(fd, zeros)
            except OSError:
                if chunk <= 512:
                    break
                chunk //= 8  # top up the last free pages with smaller writes
                zeros = bytes(chunk)
                continue
            written += n
    finally:
        os.close(fd)
    return written
