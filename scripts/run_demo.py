"""`make run`: mock Accoil plus the gateway wired to it, with a demo write key.
`make run-redis` (`--store redis`): the scale-out instead, a local `redis-server` and three
gateways on consecutive ports sharing it, with the mock.

Ctrl-C (or SIGTERM) stops both: the gateway first, so it drains into the mock. Whatever
ends the demo (a signal, a child that fails to start or dies, an error here), both
children and everything they started are stopped before it exits: each runs in a process
group of its own, and the whole group is ended.

GATEWAY_PORT and MOCK_PORT move the ports. Each gateway port has its own store,
./data/demo-<port> (GATEWAY_DATA_DIR overrides it), so that two demos on different ports
never share one.

With `--store redis`: gateways on GATEWAY_PORT and the ports after it (GATEWAYS of them, 3
by default), the mock on MOCK_PORT (default: the port after the last gateway), Redis on
REDIS_PORT (default 6390, not 6379: a Redis of the machine's own is left alone) with its
folder ./data/demo-redis-<port>: AOF on with `appendfsync everysec` and `maxmemory-policy
noeviction`, the settings SCALING.md gives for the default `fsync = "normal"`. Redis is
stopped last, after the gateways have drained into the mock.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from benchkit.redis_server import SERVER, RedisServer
from redis.exceptions import RedisError

DEMO_WRITE_KEY = "demo_write_key"
DEMO_API_KEY = "demo_api_key"
DEMO_ADMIN_TOKEN = "demo_admin_token"
HOST = "127.0.0.1"
START_WITHIN = 45.0  # seconds: more than a gateway waits for a data directory's lock
STOP_WITHIN = 20.0  # seconds a child has to stop after SIGTERM before it is killed
REDIS_PORT = 6390
MAX_GATEWAYS = 9


class DemoError(Exception):
    """The demo cannot go on; the message is the one line the user sees."""


class Stopped(Exception):
    """Ctrl-C or SIGTERM: stop both children and exit 0."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make run / make run-redis")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    store = parser.parse_args(argv).store
    _on_signal(_raise_stopped)
    children: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        try:
            if store == "redis":
                run_redis(children)
            else:
                run(children)
        finally:
            # a second Ctrl-C must not cut the cleanup short: from here on signals do nothing
            _on_signal(lambda *_: None)
    except Stopped:
        print("\nstopping the demo", file=sys.stderr, flush=True)
    except DemoError as exc:
        target = "make run-redis" if store == "redis" else "make run"
        print(f"{target}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # the gateways first: they drain into the mock (and, in Redis mode, into Redis)
        for child in reversed(children):
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
    mock = _start_mock(mock_port, children)
    gateway = _start_gateway("the gateway", port, mock_port, data_dir, {}, children)
    print(
        f"""
accoil-gateway is up on http://{HOST}:{port} (mock Accoil on http://{HOST}:{mock_port}).
Its store is {data_dir}.

Send an event:
{_curl(port, "u1")}

See what Accoil received (after the 1 s flush):
  curl -s http://{HOST}:{mock_port}/_mock/calls
  curl -s http://{HOST}:{mock_port}/_mock/counts
Gateway stats and dead letters:
{_admin(port)}

Ctrl-C stops both.
""",
        flush=True,
    )
    _watch([("the gateway", gateway), ("mock Accoil", mock)])


def run_redis(children: list[subprocess.Popen[bytes]]) -> None:
    """Redis, the mock, and GATEWAYS gateways on consecutive ports sharing the Redis."""
    port = _port("GATEWAY_PORT", 8088)
    count = _count("GATEWAYS", 3)
    ports = list(range(port, port + count))
    if ports[-1] > 65535:
        raise DemoError(f"GATEWAY_PORT {port} leaves no room for {count} gateways after it")
    mock_port = _port("MOCK_PORT", ports[-1] + 1)
    redis_port = _port("REDIS_PORT", REDIS_PORT)
    named = [*(("GATEWAY_PORT" if p == port else f"GATEWAY_PORT+{p - port}", p) for p in ports),
             ("MOCK_PORT", mock_port), ("REDIS_PORT", redis_port)]
    for i, (name, p) in enumerate(named):
        clash = [other for other, q in named[:i] if q == p]
        if clash:
            raise DemoError(f"{clash[0]} and {name} are both {p}; give them different ports")
    if shutil.which(SERVER) is None:
        raise DemoError(f"{SERVER} is not installed: `bash scripts/ensure_redis.sh` (as root) "
                        "installs the redis-server package")
    for name, p in named:
        _check_free(name, p, "make run-redis")
    redis_dir = Path(f"./data/demo-redis-{redis_port}").resolve()
    redis = RedisServer(redis_dir, port=redis_port)  # writes its redis.conf there
    server = _start([SERVER, str(redis.conf)], None, children)
    _wait_until_up("redis-server", _redis_answers(redis), server)
    mock = _start_mock(mock_port, children)
    env = {"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": redis.url}
    gateways = []
    for p in ports:
        name = f"the gateway on port {p}"
        gateways.append((name, _start_gateway(name, p, mock_port, f"./data/demo-{p}", env,
                                              children)))
    sends = "\n".join(_curl(p, f"u{i + 1}") for i, p in enumerate(ports))
    print(
        f"""
{count} accoil-gateways are up on {", ".join(f"http://{HOST}:{p}" for p in ports)},
sharing Redis at {redis.url} (its folder: {redis_dir}; AOF, appendfsync everysec,
maxmemory-policy noeviction), mock Accoil on http://{HOST}:{mock_port}.

Send an event to each gateway (any of them takes any user; each user's events are applied
and forwarded by the gateway that owns the user's partition):
{sends}

See what Accoil received (after the 1 s flush):
  curl -s http://{HOST}:{mock_port}/_mock/calls
  curl -s http://{HOST}:{mock_port}/_mock/counts
Stats and dead letters of every partition, from any gateway:
{_admin(port)}
What each gateway owns: accoil_gateway_partitions_owned in
  curl -s http://{HOST}:{port}/metrics

Ctrl-C stops everything.
""",
        flush=True,
    )
    _watch([*gateways, ("mock Accoil", mock), ("redis-server", server)])


def _start_mock(
    mock_port: int, children: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    mock = _start(
        [sys.executable, "-m", "mock_accoil", "--host", HOST, "--port", str(mock_port)], None,
        children,
    )
    _wait_until_up("mock Accoil", _http_answers(f"http://{HOST}:{mock_port}/_mock/calls"), mock)
    return mock


def _start_gateway(
    name: str, port: int, mock_port: int, data_dir: str, extra: dict[str, str],
    children: list[subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GATEWAY_WRITE_KEY": DEMO_WRITE_KEY,
        "ACCOIL_API_KEY": DEMO_API_KEY,
        "ACCOIL_BASE_URL": f"http://{HOST}:{mock_port}",
        "GATEWAY_ADMIN_TOKEN": DEMO_ADMIN_TOKEN,
        **extra,
    }
    gateway = _start(
        [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", str(port),
         "--data-dir", data_dir, "--flush-interval", "1"],
        env, children,
    )
    _wait_until_up(name, _http_answers(f"http://{HOST}:{port}/readyz"), gateway)
    return gateway


def _curl(port: int, user: str) -> str:
    return (
        f"  curl -s -u {DEMO_WRITE_KEY}: -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"batch\":[{{\"type\":\"track\",\"userId\":\"{user}\",\"event\":\"Signed Up\","
        f"\"context\":{{\"groupId\":\"acme\"}}}}]}}' \\\n"
        f"    http://{HOST}:{port}/v1/batch"
    )


def _admin(port: int) -> str:
    return "\n".join(
        f"  curl -s -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://{HOST}:{port}/admin/{what}"
        for what in ("stats", "dead-letters"))


def _watch(named: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """Until Ctrl-C, or a child exits (then the demo stops, saying which)."""
    while True:
        for name, child in named:
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


def _count(var: str, default: int) -> int:
    raw = os.environ.get(var) or str(default)
    try:
        count = int(raw)
    except ValueError:
        raise DemoError(f"{var}: expected a number of gateways, got {raw!r}") from None
    if not 1 <= count <= MAX_GATEWAYS:
        raise DemoError(f"{var}: expected 1 to {MAX_GATEWAYS} gateways, got {count}")
    return count


def _check_free(var: str, port: int, target: str = "make run") -> None:
    """Fail at once, before anything starts, when a port is taken (often: another demo)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise DemoError(f"cannot use {HOST}:{port} ({var}): {exc.strerror}") from None
            moves = "GATEWAY_PORT=... MOCK_PORT=..." + (
                " REDIS_PORT=..." if target != "make run" else "")
            raise DemoError(
                f"{HOST}:{port} is in use (another `{target}`?); stop it, or move this demo: "
                f"{moves} {target}"
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


def _wait_until_up(
    name: str, probe: tuple[str, Callable[[], bool]], proc: subprocess.Popen[bytes]
) -> None:
    """Until the probe (where, answers) says it answers, or the child exits."""
    where, answers = probe
    deadline = time.monotonic() + START_WITHIN
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{name} did not start: exited with {proc.returncode} (see above)")
        if answers():
            return
        time.sleep(0.1)
    raise DemoError(f"{name} did not answer on {where} within {START_WITHIN:.0f} s")


def _http_answers(url: str) -> tuple[str, Callable[[], bool]]:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False

    return url, answers


def _redis_answers(redis: RedisServer) -> tuple[str, Callable[[], bool]]:
    def answers() -> bool:
        try:
            with redis.client() as client:
                return bool(client.ping())
        except RedisError:  # refused, or still loading its AOF
            return False

    return redis.url, answers


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
