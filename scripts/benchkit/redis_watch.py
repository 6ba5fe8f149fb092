"""What a Redis-mode run went through, second by second: `Watch` samples, in a thread, the
gateway's own counters (the backlog file both its processes map), the worker's and the
front's CPU, and Redis's CPU (its own and its forked children's), forks, AOF rewrites and
RDB saves, so that a slow run says what it was doing and when.

Everything read here is cheap: a 32-byte read of the backlog file, /proc, and three small
INFO sections on a connection of the watch's own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from benchkit.backlog_file import backlog_counters
from benchkit.redis_server import RedisServer
from benchkit.stack import cpu_seconds


class Sample:
    __slots__ = ("t", "accepted", "applied", "cpu", "redis")

    def __init__(self, t: float, accepted: int, applied: int, cpu: dict[str, float],
                 redis: dict[str, float]) -> None:
        self.t = t
        self.accepted = accepted
        self.applied = applied
        self.cpu = cpu  # process name -> CPU seconds so far
        self.redis = redis  # Redis's counters and states


def redis_state(client: Any) -> dict[str, float]:
    """Redis's CPU (its own, its forks'), forks and rewrites so far, and what runs now."""
    cpu = client.info("cpu")
    persistence = client.info("persistence")
    stats = client.info("stats")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "children_cpu_s": float(cpu["used_cpu_user_children"])
        + float(cpu["used_cpu_sys_children"]),
        "forks": float(stats["total_forks"]),
        "fork_usec": float(stats["latest_fork_usec"]),
        "aof_rewrites": float(persistence.get("aof_rewrites", 0)),
        "rdb_saves": float(persistence.get("rdb_saves", 0)),
        "forking": float(bool(int(persistence["aof_rewrite_in_progress"])
                              or int(persistence["rdb_bgsave_in_progress"]))),
        "aof_mb": float(persistence.get("aof_current_size", 0)) / 1e6,
    }


class Watch:
    """Samples every `every` seconds until `stop()`; `phase(name)` marks where a phase
    begins (the burst, the apply)."""

    def __init__(self, server: RedisServer, backlog: Path, processes: dict[str, int],
                 every: float = 0.1) -> None:
        self.server = server
        self.backlog = backlog
        self.processes = processes
        self.every = every
        self.samples: list[Sample] = []
        self.marks: list[tuple[str, float]] = []
        self._t0 = time.monotonic()
        self._client = server.client()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="redis-watch", daemon=True)
        self._thread.start()

    def sample(self) -> Sample:
        with self._lock:  # the thread's and the caller's (`phase`, `stop`), one at a time
            accepted, applied = backlog_counters(self.backlog) or (0, 0)
            cpu = {name: used for name, pid in self.processes.items()
                   if (used := cpu_seconds(pid)) is not None}
            state = redis_state(self._client)
            s = Sample(time.monotonic() - self._t0, accepted, applied, cpu, state)
            self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # Redis going away at the end: the samples so far stand
                return
            self._stop.wait(self.every)

    def phase(self, name: str) -> None:
        """A phase begins: sampled now, so that each phase has a first and a last sample
        (the next phase's first, or the one `stop` takes), however short it is."""
        self.marks.append((name, self.sample().t))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._client.close()

    def report(self, log: Path | None = None) -> dict[str, Any]:
        """Per phase: forks, AOF rewrites, RDB saves, the seconds a fork's child ran, the
        CPU of Redis's children; and the run's timeline, one row a half second."""
        samples = self.samples
        if len(samples) < 2:
            return {}
        bounds = [t for _, t in self.marks] + [samples[-1].t]
        phases: dict[str, Any] = {}
        for (name, start), end in zip(self.marks, bounds[1:], strict=True):
            inside = [s for s in samples if start <= s.t <= end]
            if len(inside) < 2:
                continue
            a, b = inside[0], inside[-1]
            phases[name] = {
                "forks": int(b.redis["forks"] - a.redis["forks"]),
                "aof_rewrites": int(b.redis["aof_rewrites"] - a.redis["aof_rewrites"]),
                "rdb_saves": int(b.redis["rdb_saves"] - a.redis["rdb_saves"]),
                "forked_s": round(sum(
                    y.t - x.t for x, y in zip(inside, inside[1:], strict=False)
                    if x.redis["forking"]), 2),
                "children_cpu_s": round(b.redis["children_cpu_s"] - a.redis["children_cpu_s"], 2),
                "applied": b.applied - a.applied,
            }
        timeline: list[list[float]] = []
        next_at = 0.0
        prev: Sample | None = None
        for s in samples:
            if s.t < next_at and s is not samples[-1]:
                continue
            row = [round(s.t, 1), s.accepted, s.applied,
                   round(s.redis["aof_mb"], 1), int(s.redis["forks"])]
            if prev is not None:
                wall = max(s.t - prev.t, 1e-9)
                row += [round((s.cpu.get(k, 0.0) - prev.cpu.get(k, 0.0)) / wall, 2)
                        for k in ("worker", "front")]
                row.append(round((s.redis["cpu_s"] - prev.redis["cpu_s"]) / wall, 2))
            timeline.append(row)
            prev = s
            next_at = s.t + 0.5
        out: dict[str, Any] = {
            "phases": phases,
            "latest_fork_usec": int(samples[-1].redis["fork_usec"]),
            "timeline_columns": ["t", "accepted", "applied", "aof_mb", "forks",
                                 "worker_cpu", "front_cpu", "redis_cpu"],
            "timeline": timeline,
        }
        if log is not None:
            out["log"] = forks_logged(log)
        return out


def forks_logged(log: Path) -> list[str]:
    """Redis's own lines on what it forked for, and why (its log)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keys = ("Starting automatic rewriting", "Background saving started", "fork",
            "Fork CoW", "Asynchronous AOF fsync is taking too long")
    return [line.split(" ", 4)[-1] for line in lines if any(k in line for k in keys)][:40]
