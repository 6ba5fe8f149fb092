"""Start and stop mock_accoil, the gateway and the benchmark targets as child processes.

Each runs in its own process (and session, so a Ctrl-C reaches only the script, which stops
them in order), logging to a file in a work directory. Ports are picked free beforehand;
a child that loses the race for its port is started again on another.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

HOST = "127.0.0.1"
SCRIPTS = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS.parent
TICK = os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in these


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `finally` blocks stop the children."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


@contextlib.contextmanager
def workdir(given: Path | None, prefix: str) -> Iterator[Path]:
    """`given` (made if missing, and kept), or a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = given or Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        yield path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Keys:
    """Credentials for one benchmark run. Long random values: the gateway masks every
    configured secret in its logs, and a one-letter token would mask that letter everywhere."""

    write_key: str = field(default_factory=lambda: "wk_bench_" + secrets.token_hex(8))
    api_key: str = field(default_factory=lambda: "ak_bench_" + secrets.token_hex(8))
    admin_token: str = field(default_factory=lambda: "admin_bench_" + secrets.token_hex(8))


class Child:
    """A child process with its log file; `stop()` is SIGTERM, then SIGKILL after `grace`."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=dict(env),
            cwd=ROOT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class Service:
    child: Child
    url: str
    port: int


def wait_http(url: str, child: Child, timeout: float = 30.0) -> None:
    """Until `url` answers (any status), or fail with the child's log if it died."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(
                f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not answer {url} within {timeout:g} s")
        time.sleep(0.05)


def listening_inodes(port: int) -> set[str] | None:
    """Inodes of the sockets listening on 127.0.0.1:`port`, from /proc/net/tcp (None where
    there is no /proc)."""
    want = f"{socket.htonl(0x7F000001):08X}:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    return {r[9] for r in rows if r[1] == want and r[3] == "0A"}  # 0A: LISTEN


def listens(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants holds the socket listening on `port`: a free
    port picked beforehand may be taken by another program before the child binds it, and
    then that program answers the child's probe (True where /proc cannot tell)."""
    inodes = listening_inodes(port)
    if inodes is None:
        return True
    for each in [pid, *descendants(pid)]:
        try:
            fds = os.listdir(f"/proc/{each}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{each}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
    return False


def _start(
    name: str,
    argv_for: Callable[[int], list[str]],
    probe: str,
    workdir: Path,
    env: Mapping[str, str],
    port: int | None,
    tries: int = 3,
) -> Service:
    for attempt in range(tries):
        chosen = port if port is not None else free_port()
        child = Child(name, argv_for(chosen), workdir / f"{name}.log", env)
        url = f"http://{HOST}:{chosen}"
        try:
            wait_http(url + probe, child)
            if not listens(child.pid, chosen):
                raise RuntimeError(f"{name}: {url} answered, but another program listens there")
        except RuntimeError as exc:
            child.stop(2.0)
            lost_race = ("address already in use" in child.log_tail(200)
                         or "another program" in str(exc))
            if port is None and lost_race and attempt + 1 < tries:
                continue
            raise
        return Service(child, url, chosen)
    raise AssertionError("unreachable")


def start_mock(
    workdir: Path,
    *,
    port: int | None = None,
    max_calls: int = 200_000,
    fault_status: int | None = None,
) -> Service:
    """mock_accoil with per-call logging off (it would cost the mock most of its time)."""

    def argv(p: int) -> list[str]:
        args = [sys.executable, "-m", "mock_accoil", "--host", HOST, "--port", str(p),
                "--log-level", "warning", "--log-format", "json", "--max-calls", str(max_calls)]
        if fault_status is not None:
            args += ["--fault-status", str(fault_status)]
        return args

    return _start("mock_accoil", argv, "/_mock/faults", workdir, os.environ, port)


def gateway_env(
    keys: Keys, upstream: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "ACCOIL_"))}
    env.update({
        "GATEWAY_WRITE_KEY": keys.write_key,
        "ACCOIL_API_KEY": keys.api_key,
        "ACCOIL_BASE_URL": upstream,
        "GATEWAY_ADMIN_TOKEN": keys.admin_token,
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_LOG_FORMAT": "json",
    })
    env.update(extra or {})
    return env


def start_gateway(
    workdir: Path,
    keys: Keys,
    upstream: str,
    *,
    env: Mapping[str, str] | None = None,
    flush_interval: float = 1.0,
    port: int | None = None,
) -> Service:
    data = workdir / "gateway-data"
    data.mkdir(parents=True, exist_ok=True)

    # $BENCH_GATEWAY_CMD replaces `python -m gateway`, e.g. to run it under a profiler
    command = shlex.split(os.environ.get("BENCH_GATEWAY_CMD", "")) or [
        sys.executable, "-m", "gateway"]

    def argv(p: int) -> list[str]:
        return [*command, "serve", "--host", HOST, "--port", str(p),
                "--data-dir", str(data), "--flush-interval", str(flush_interval)]

    return _start("gateway", argv, "/healthz", workdir, gateway_env(keys, upstream, env), port)


def start_target(workdir: Path, kind: str, *args: str, port: int | None = None) -> Service:
    """One of `bench_targets.py`'s servers: `noop`, `noop_lean` or `naive`."""

    def argv(p: int) -> list[str]:
        return [sys.executable, str(SCRIPTS / "bench_targets.py"), kind, "--host", HOST,
                "--port", str(p), *args]

    return _start(kind, argv, "/healthz", workdir, os.environ, port)


@contextlib.contextmanager
def stopping(*services: Service | None) -> Iterator[None]:
    """Stop the services on the way out, last started first."""
    try:
        yield
    finally:
        for svc in reversed([s for s in services if s is not None]):
            svc.child.stop()


# reading a process and the services


class Memory(msgspec.Struct):
    rss_kb: int  # VmRSS: resident now
    hwm_kb: int  # VmHWM: the peak resident size the kernel saw


def memory(pid: int) -> Memory | None:
    """The resident memory of the process and its children (the gateway's pipeline
    worker), from /proc (None if it is gone). VmHWM is summed over the processes: each
    one's own peak, so the sum is an upper bound of their joint peak."""
    rss = hwm = 0
    pids = [pid, *descendants(pid)]
    for i, each in enumerate(pids):
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            if i == 0:
                return None
    return Memory(rss, hwm)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (not its children), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # fields after the command: state is [0], utime [11], stime [12]
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in descendants(c)]


def get_json(url: str, *, token: str | None = None, timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return msgspec.json.decode(resp.read())


def send_json(url: str, method: str, body: Any = None, timeout: float = 30.0) -> Any:
    data = None if body is None else msgspec.json.encode(body)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return msgspec.json.decode(resp.read() or b"null")


class Sampler:
    """Samples a process's resident memory in a background thread; `peak` is the highest
    VmRSS seen since the last `mark()`, `hwm` the kernel's own peak (VmHWM)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        import threading

        self.pid = pid
        self.every = every
        self.peak = 0
        self.hwm = 0
        self.last = 0
        self.series: list[tuple[float, int]] = []  # (seconds since start, VmRSS kB), 1 a second
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_keep = 0.0
        while not self._stop.is_set():
            mem = memory(self.pid)
            if mem is not None:
                self.last = mem.rss_kb
                self.peak = max(self.peak, mem.rss_kb)
                self.hwm = max(self.hwm, mem.hwm_kb)
                now = time.monotonic() - self._t0
                if now >= next_keep:
                    self.series.append((round(now, 1), mem.rss_kb))
                    next_keep = now + 1.0
            self._stop.wait(self.every)

    def mark(self) -> int:
        """The peak since the last mark, in kB; starts a new window."""
        peak, self.peak = self.peak, self.last
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(
    check: Callable[[], bool], *, timeout: float, every: float = 0.25, what: str = "condition"
) -> float:
    """Poll `check` until true; returns the seconds waited. Raises TimeoutError."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not reached within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - t0


def start_py_spy(
    pid: int, folder: Path, seconds: float, name: str = "gateway"
) -> subprocess.Popen[bytes] | None:
    """Record `pid` with py-spy for `seconds` (only the thread holding the GIL: where the
    one Python core goes) into `folder`, as collapsed stacks; None if py-spy is missing."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        print("py-spy not found: no profile (pip install py-spy)", file=sys.stderr)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = folder / f"{name}-{stamp}.txt"
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "200", "--gil", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
