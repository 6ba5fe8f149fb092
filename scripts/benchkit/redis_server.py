"""Real `redis-server` processes: one node, or a Cluster of primaries, for the tests under
tests/redis and the Redis benchmark.

Each server runs on a free 127.0.0.1 port in a folder of its own with AOF on, so that a
caller can kill it with SIGKILL and start it again on the same folder and port, as a crash
and restart would. Nothing here fakes Redis: Lua, streams and cluster slots behave as in
production.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from benchkit.stack import free_port

SERVER = "redis-server"
CLI = "redis-cli"
START_TIMEOUT = 10.0


class PortTaken(RuntimeError):
    """Another process bound the port between its pick and the server's start."""


class RedisServer:
    """One `redis-server` with AOF on; `kill()` is SIGKILL, `start()` again reuses the
    folder and port, so what the AOF held is what the restarted server has."""

    def __init__(
        self,
        directory: Path,
        *,
        appendfsync: str = "everysec",
        cluster: bool = False,
        port: int | None = None,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.cluster = cluster
        self.conf = self.dir / "redis.conf"
        # ports picked here may be taken by someone else before the server binds them: then
        # the first start picks others (a restart keeps its port, as a crashed server would)
        self._pick_ports = port is None
        self._started = False
        self.port = port or free_port()
        self._write_conf()
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.dir}",
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
            "maxmemory-policy noeviction",
            # a replica's first sync starts at once, not after the default 5 s
            "repl-diskless-sync-delay 0",
            "logfile redis.log",
            "daemonize no",
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                "cluster-node-timeout 2000",
                # the bus port would default to port + 10000, which nobody checked is free
                f"cluster-port {free_port()}",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        for _ in range(3):
            try:
                self._start()
                self._started = True
                return
            except PortTaken:
                self.kill()  # ours, if it has not exited yet
                if self._started or not self._pick_ports:
                    raise
                self.port = free_port()
                self._write_conf()
        self._start()

    def _start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [SERVER, str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise PortTaken(tail)
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {tail}")
            try:
                # one try each, no retries: a round must not outlast the process's exit
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                                 retry=Retry(NoBackoff(), 0)) as c:
                    # LOADING while it replays the AOF: not up yet
                    pid = c.info("server")["process_id"]
                if pid == self.proc.pid:
                    return
                # an answer from another server that took the port first
                raise PortTaken(f"port {self.port} answered by pid {pid}")
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer in {START_TIMEOUT}s: {self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no AOF rewrite, no flush beyond what appendfsync already did."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a paused server cannot hear SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])


class RedisClusterNodes:
    """Three primaries (no replicas) joined with `redis-cli --cluster create`."""

    def __init__(self, directory: Path, *, size: int = 3, appendfsync: str = "everysec") -> None:
        self.nodes = [
            RedisServer(directory / f"node{i}", appendfsync=appendfsync, cluster=True)
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [CLI, "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every node says cluster_state:ok and knows every slot."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.nodes:
                with node.client() as c:
                    info = c.cluster("INFO")  # parsed into a dict of str
                    states.append(info.get("cluster_state") == "ok"
                                  and str(info.get("cluster_slots_ok")) == "16384")
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout}s: {states}")
            time.sleep(0.1)

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
