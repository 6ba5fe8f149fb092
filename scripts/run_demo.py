"""`make run`: mock Accoil plus the gateway wired to it, with a demo write key.

Ctrl-C (or SIGTERM) stops both: the gateway first, so it drains into the mock. Whatever
ends the demo (a signal, a child that fails to start or dies, an error here), both
children and everything they started are stopped before it exits: each runs in a process
group of its own, and the whole group is ended.

GATEWAY_PORT and MOCK_PORT move the ports. Each gateway port has its own store,
./data/demo-<port> (GATEWAY_DATA_DIR overrides it), so that two demos on different ports
never share one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from types import FrameType

DEMO_WRITE_KEY = "demo_write_key"
DEMO_API_KEY = "demo_api_key"
DEMO_ADMIN_TOKEN = "demo_admin_token"
HOST = "127.0.0.1"
START_WITHIN = 45.0  # seconds: more than a gateway waits for a data directory's lock
STOP_WITHIN = 20.0  # seconds a child has to stop after SIGTERM before it is killed


class DemoError(Exception):
    """The demo cannot go on; the message is the one line the user sees."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM: stop both children and exit 0."""


def main() -> int:
    _on_signal(_raise_stopped)
    children: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        try:
            run(children)
        finally:
            # a second Ctrl-C must not cut the cleanup short: from here on signals do nothing
            _on_signal(lambda *_: None)
    except Stopped:
        print("\nstopping the demo", file=sys.stderr, flush=True)
    except DemoError as exc:
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for child in reversed(children):  # the gateway first: it drains into the mock
            _end_group(child)
    return code


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def _on_signal(handler: Callable[[int, FrameType | None], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def run(children: list[subprocess.Popen[bytes]]) -> None:
    port = _port("GATEWAY_PORT", 8088)
    mock_port = _port("MOCK_PORT", 8089)
    if port == mock_port:
        raise DemoError(f"GATEWAY_PORT and MOCK_PORT are both {port}; give them different ports")
    for name, p in (("MOCK_PORT", mock_port), ("GATEWAY_PORT", port)):
        _check_free(name, p)
    data_dir = os.environ.get("GATEWAY_DATA_DIR") or f"./data/demo-{port}"
    mock = _start(
        [sys.executable, "-m", "mock_accoil", "--host", HOST, "--port", str(mock_port)], None,
        children,
    )
    _wait_until_up("mock Accoil", f"http://{HOST}:{mock_port}/_mock/calls", mock)
    env = {
        **os.environ,
        "GATEWAY_WRITE_KEY": DEMO_WRITE_KEY,
        "ACCOIL_API_KEY": DEMO_API_KEY,
        "ACCOIL_BASE_URL": f"http://{HOST}:{mock_port}",
        "GATEWAY_ADMIN_TOKEN": DEMO_ADMIN_TOKEN,
    }
    gateway = _start(
        [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", str(port),
         "--data-dir", data_dir, "--flush-interval", "1"],
        env, children,
    )
    _wait_until_up("the gateway", f"http://{HOST}:{port}/readyz", gateway)
    print(
        f"""
accoil-gateway is up on http://{HOST}:{port} (mock Accoil on http://{HOST}:{mock_port}).
Its store is {data_dir}.

Send an event:
  curl -s -u {DEMO_WRITE_KEY}: -H 'Content-Type: application/json' \\
    -d '{{"batch":[{{"type":"track","userId":"u1","event":"Signed Up","context":{{"groupId":"acme"}}}}]}}' \\
    http://{HOST}:{port}/v1/batch

See what Accoil received (after the 1 s flush):
  curl -s http://{HOST}:{mock_port}/_mock/calls
  curl -s http://{HOST}:{mock_port}/_mock/counts
Gateway stats and dead letters:
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{HOST}:{port}/admin/stats
  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{HOST}:{port}/admin/dead-letters

Ctrl-C stops both.
""",
        flush=True,
    )
    while True:
        for name, child in (("the gateway", gateway), ("mock Accoil", mock)):
            if child.poll() is not None:
                raise DemoError(f"{name} exited with {child.returncode} (see its log above)")
        time.sleep(0.2)


def _port(var: str, default: int) -> int:
    raw = os.environ.get(var) or str(default)
    try:
        port = int(raw)
    except ValueError:
        raise DemoError(f"{var}: expected a port number, got {raw!r}") from None
    if not 1 <= port <= 65535:
        raise DemoError(f"{var}: expected a port from 1 to 65535, got {port}")
    return port


def _check_free(var: str, port: int) -> None:
    """Fail at once, before anything starts, when a port is taken (often: another demo)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise DemoError(f"cannot use {HOST}:{port} ({var}): {exc.strerror}") from None
            raise DemoError(
                f"{HOST}:{port} is in use (another `make run`?); stop it, or move this demo: "
                "GATEWAY_PORT=... MOCK_PORT=... make run"
            ) from None


def _start(
    argv: list[str], env: dict[str, str] | None, children: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Start a child in a session (and process group) of its own: Ctrl-C in the terminal
    reaches only this script, which stops the children in order, and ending the group also
    ends the gateway's worker. The child is listed for the cleanup before a signal can
    interrupt: a Ctrl-C that arrives meanwhile is held until then."""
    held: list[int] = []
    _on_signal(lambda signum, _: held.append(signum))
    try:
        children.append(subprocess.Popen(argv, env=env, start_new_session=True))
    finally:
        _on_signal(_raise_stopped)
    if held:
        raise Stopped(signal.Signals(held[0]).name)
    return children[-1]


def _wait_until_up(name: str, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_WITHIN
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{name} did not start: exited with {proc.returncode} (see above)")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise DemoError(f"{name} did not answer on {url} within {START_WITHIN:.0f} s")


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, wait for every member to go, kill what stays."""
    pgid = proc.pid  # a session leader's group id is its pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WITHIN
    while time.monotonic() < deadline:
        proc.poll()  # reap the child itself, so that it no longer counts as a member
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A zombie does not count: its parent
    (maybe a PID 1 that never reaps) owns it, and it holds nothing."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
