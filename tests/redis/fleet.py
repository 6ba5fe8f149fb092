"""Several gateways on one Redis: the multi-gateway harness of the scale-out tests.

Each gateway is `python -m gateway serve` with its defaults (the two-process pipeline) on a
free port, with a data folder of its own, in a session of its own: `kill()` (SIGKILL),
`pause()` (SIGSTOP) and `resume()` (SIGCONT) reach its pipeline worker too, as a crash or a
freeze of its container would. Redis is a `RedisServer` (kill -9 and restart on the same
folder and port); Accoil is the mock fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.reliability.reliability_support import (
    ADMIN_TOKEN,
    WRITE_KEY,
    GatewayProcess,
    basic,
    bearer,
    gateway_env,
    http,
)


def group(pgid: int) -> dict[int, str]:
    """The processes of a process group and their states (R, S, T: stopped...), zombies
    left out, from /proc."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            found[int(entry)] = fields[0].decode()
    return found


class FleetGateway(GatewayProcess):
    """A gateway of the fleet: signals go to its whole process group (ingest and worker)."""

    new_session = True

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to ingest and worker at once: a crashed machine or container."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while group(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)  # a worker started meanwhile
            time.sleep(0.02)

    def pause(self) -> None:
        """SIGSTOP: the gateway freezes (a long GC pause, a VM migration) and keeps its
        sockets; its leases run out while it does nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def terminate(self, within: float = 20.0) -> int | None:
        self.resume()  # a stopped process cannot act on SIGTERM
        return super().terminate(within)

    def processes(self) -> dict[int, str]:
        return {} if self.proc is None else group(self.proc.pid)

    def post(self, path: str, body: Any, timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
        """A JSON request with the fleet's write key: (status, headers, decoded reply)."""
        status, headers, raw = http(
            "POST", self.url + path, json.dumps(body).encode(),
            {"Authorization": basic(WRITE_KEY), "Content-Type": "application/json"}, timeout)
        return status, headers, json.loads(raw) if raw else None

    def admin(self, path: str) -> Any:
        status, _, raw = http("GET", self.url + path, headers={"Authorization": bearer()})
        assert status == 200, (status, raw)
        return json.loads(raw)

    def metric(self, name: str) -> float | None:
        """One unlabelled series of /metrics (the sum, for a labelled one)."""
        status, _, raw = http("GET", self.url + "/metrics")
        assert status == 200
        values = [float(line.rsplit(" ", 1)[1]) for line in raw.decode().splitlines()
                  if line.startswith(name) and line[len(name)] in " {"]
        return sum(values) if values else None


class Fleet:
    """`size` gateways sharing one Redis and one (mock) Accoil; a context manager that
    stops them all, whatever happened to them."""

    def __init__(
        self, folder: Path, redis_url: str | None, accoil_url: str, size: int = 3, **env: str
    ) -> None:
        """`redis_url` None: each gateway in SQLite mode on its own folder (the harness's
        own test)."""
        self.folder = folder
        settings = {} if redis_url is None else {
            "GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": redis_url}
        settings.update(env)
        self.env = gateway_env(base_url=accoil_url, **settings)
        self.gateways = [
            FleetGateway(self._data(i), self.env, flush_interval=0.2) for i in range(size)]

    def join(self) -> FleetGateway:
        """One more gateway, started now (a scale-up); it is the fleet's last."""
        gw = FleetGateway(self._data(len(self.gateways)), self.env, flush_interval=0.2)
        self.gateways.append(gw)
        gw.start(within=60.0)
        return gw

    def _data(self, i: int) -> Path:
        path = self.folder / f"gw{i}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __enter__(self) -> Fleet:
        try:
            for gw in self.gateways:
                gw.start(within=60.0)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> FleetGateway:
        return self.gateways[i]

    def __iter__(self) -> Iterator[FleetGateway]:
        return iter(self.gateways)

    @property
    def alive(self) -> list[FleetGateway]:
        return [gw for gw in self.gateways if gw.alive]

    def close(self) -> None:
        for gw in self.gateways:
            gw.kill()

    def logs(self) -> str:
        """The tail of every gateway's log, for an assertion's message."""
        return "\n".join(f"--- gateway {i}:\n{gw.log()[-2000:]}"
                         for i, gw in enumerate(self.gateways))


__all__ = ["ADMIN_TOKEN", "WRITE_KEY", "Fleet", "FleetGateway", "group"]
