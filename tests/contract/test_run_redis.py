"""`make run-redis`, as a user meets it: a local redis-server, three gateways on consecutive
ports sharing it and the mock; the printed curls through each gateway; Ctrl-C, and nothing
left running (Redis included)."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from pathlib import Path

import redis

from mock_accoil.server import MockAccoilClient
from tests.contract.test_first_run import (
    curl,
    demo,
    descendants,
    port_free,
    running,
    wait_until,
)
from tests.contract.test_process import free_port
from tests.redis.redis_support import require_redis

MAKEFILE = Path(__file__).parents[2] / "Makefile"


def consecutive_free_ports(count: int) -> int:
    """The first of `count` free consecutive ports."""
    for _ in range(200):
        first = free_port()
        if first + count <= 65536 and all(port_free(first + i) for i in range(count)):
            return first
    raise AssertionError(f"no {count} free consecutive ports")


def owned(port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r"^accoil_gateway_partitions_owned (\S+)$", text, flags=re.M)
    return None if found is None else float(found.group(1))


def test_make_run_redis_is_a_target() -> None:
    text = MAKEFILE.read_text()
    assert "run-redis: $(STAMP)" in text
    assert "$(PY) scripts/run_demo.py --store redis" in text


def test_run_redis_starts_three_gateways_on_one_redis_and_stops_everything(
    tmp_path: Path,
) -> None:
    require_redis()
    port, mock_port, redis_port = consecutive_free_ports(3), free_port(), free_port()
    ports = [port, port + 1, port + 2]
    env = {"GATEWAY_PORT": str(port), "MOCK_PORT": str(mock_port),
           "REDIS_PORT": str(redis_port)}
    with demo(tmp_path, "--store", "redis", **env) as (proc, out, err):
        try:
            out.wait_for("Ctrl-C stops everything.", proc, within=120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr:\n{err.text[-3000:]}") from None
        started = descendants(proc.pid)
        # redis, the mock, three gateways and their three workers
        assert len(started) >= 8, started

        # Redis as SCALING.md sets it for fsync = "normal", its folder under ./data
        folder = tmp_path / "data" / f"demo-redis-{redis_port}"
        assert (folder / "appendonlydir").is_dir()
        with redis.Redis(host="127.0.0.1", port=redis_port) as r:
            assert r.config_get("appendonly") == {"appendonly": "yes"}
            assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

        # one curl per gateway, as printed; each user's event reaches Accoil once
        block = out.text.split("Send an event to each gateway", 1)[1].split("\n\n", 1)[0]
        commands = re.findall(r"curl -s -u .*?/v1/batch", block, flags=re.S)
        assert [re.findall(r":(\d+)/v1/batch", c) for c in commands] == [
            [str(p)] for p in ports]
        for command in commands:
            assert curl(command, port, mock_port) == (200, {"success": True})
        mock = MockAccoilClient(f"http://127.0.0.1:{mock_port}")
        wait_until(lambda: len(mock.counts(event="Signed Up")) == 3, within=60)
        assert sorted((c["userId"], c["count"]) for c in mock.counts(event="Signed Up")) == [
            ("u1", 1), ("u2", 1), ("u3", 1)]

        # they share the partitions: every one owned, by one gateway each
        wait_until(lambda: sorted(owned(p) or 0 for p in ports) == [21, 21, 22], within=60)

        started |= descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0, err.text
    assert not [pid for pid in started if running(pid)], err.text
    assert all(port_free(p) for p in (*ports, mock_port, redis_port))
    assert "Traceback" not in err.text


def test_run_redis_refuses_ports_that_clash(tmp_path: Path) -> None:
    port = consecutive_free_ports(3)
    with demo(tmp_path, "--store", "redis", GATEWAY_PORT=str(port),
              MOCK_PORT=str(port + 1)) as (proc, _, err):
        assert proc.wait(timeout=30) == 1
        time.sleep(0.1)  # the reader thread's last line
        assert err.text.strip().splitlines() == [
            f"make run-redis: GATEWAY_PORT+1 and MOCK_PORT are both {port + 1}; give them "
            "different ports"]
        assert descendants(proc.pid) == set()
    assert not (tmp_path / "data").exists()
