"""`make run`: mock Accoil plus the gateway wired to it, with a demo write key.

Ctrl-C (or SIGTERM) stops both: the gateway first, so it drains into the mock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

DEMO_WRITE_KEY = "demo_write_key"
DEMO_API_KEY = "demo_api_key"
DEMO_ADMIN_TOKEN = "demo_admin_token"


def wait_until_up(url: str, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")  # type: ignore[arg-type]
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer within {seconds:.0f} s")


def main() -> int:
    host = "127.0.0.1"
    port = int(os.environ.get("GATEWAY_PORT", "8088"))
    mock_port = int(os.environ.get("MOCK_PORT", "8089"))
    data_dir = os.environ.get("GATEWAY_DATA_DIR", "./data/demo")
    mock = subprocess.Popen(
        [sys.executable, "-m", "mock_accoil", "--host", host, "--port", str(mock_port)],
        start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
    )
    wait_until_up(f"http://{host}:{mock_port}/_mock/calls", mock)
    env = {
        **os.environ,
        "GATEWAY_WRITE_KEY": DEMO_WRITE_KEY,
        "ACCOIL_API_KEY": DEMO_API_KEY,
        "ACCOIL_BASE_URL": f"http://{host}:{mock_port}",
        "GATEWAY_ADMIN_TOKEN": DEMO_ADMIN_TOKEN,
    }
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--host", host, "--port", str(port),
         "--data-dir", data_dir, "--flush-interval", "1"],
        env=env,
        start_new_session=True,
    )
    wait_until_up(f"http://{host}:{port}/healthz", gateway)
    print(
        f"""
accoil-gateway is up on http://{host}:{port} (mock Accoil on http://{host}:{mock_port}).

Send an event:
  curl -s -u {DEMO_WRITE_KEY}: -H 'Content-Type: application/json' \\
    -d '{{"batch":[{{"type":"track","userId":"u1","event":"Signed Up","context":{{"groupId":"acme"}}}}]}}' \\
    http://{host}:{port}/v1/batch

See what Accoil received (after the 1 s flush):
  curl -s http://{host}:{mock_port}/_mock/calls
  curl -s http://{host}:{mock_port}/_mock/counts
Gateway stats and dead letters:
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{host}:{port}/admin/stats
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{host}:{port}/admin/dead-letters

Ctrl-C stops both.
""",
        flush=True,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and gateway.poll() is None and mock.poll() is None:
        time.sleep(0.2)
    for proc in (gateway, mock):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
