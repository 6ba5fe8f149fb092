"""The harness itself: AOF survives SIGKILL on the same folder and port; the cluster is
three primaries that share the slots; the fleet's signals reach a gateway's worker."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from mock_accoil.server import MockAccoilServer
from tests.contract.test_first_run import running
from tests.redis.fleet import Fleet
from tests.redis.redis_support import RedisClusterNodes, RedisServer, require_redis, wait_for


def test_server_keeps_an_always_fsynced_write_across_kill_9(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(appendfsync="always")
    with server.client() as c:
        assert c.config_get("appendonly") == {"appendonly": "yes"}
        assert c.config_get("appendfsync") == {"appendfsync": "always"}
        c.xadd("{p0}:inbox", {"b": "x"})
    port = server.port
    server.kill()
    server.start()
    assert server.port == port
    with server.client() as c:
        assert c.xlen("{p0}:inbox") == 1


def test_cluster_has_three_primaries_covering_every_slot(
    redis_cluster: RedisClusterNodes,
) -> None:
    owners = set()
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.execute_command("ROLE")[0] == b"master"
            slots = c.execute_command("CLUSTER SLOTS")
            owners |= {(s[0], s[1], s[2][1]) for s in slots}
    assert {port for _, _, port in owners} == {n.port for n in redis_cluster.nodes}
    assert sum(hi - lo + 1 for lo, hi, _ in owners) == 16384


def test_a_port_taken_before_the_first_start_is_replaced(tmp_path: Path) -> None:
    require_redis()
    server = RedisServer(tmp_path / "r")
    picked = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", picked))
        squatter.listen()
        # a Redis of someone else's on the next pick must not be mistaken for ours
        other = RedisServer(tmp_path / "o")
        try:
            server.start()
            assert server.port != picked
            other.port = server.port
            other._write_conf()
            other.start()
            assert other.port != server.port
            with other.client() as c:
                assert other.proc is not None
                assert c.info("server")["process_id"] == other.proc.pid
            # a restart keeps its port, as a crashed server's clients expect
            port = server.port
            server.restart()
            assert server.port == port
        finally:
            server.stop()
            other.stop()


def test_fleet_signals_reach_each_gateways_worker(
    tmp_path: Path, mock_accoil: MockAccoilServer
) -> None:
    # the fleet's mechanics on its own, in SQLite mode (each gateway its own folder): a
    # pause, a resume and a kill act on ingest and the pipeline worker together
    with Fleet(tmp_path, None, mock_accoil.url, size=2) as fleet:
        a, b = fleet
        assert all(len(gw.processes()) == 2 for gw in fleet)  # ingest and its worker
        batch = {"batch": [{"type": "track", "messageId": "h1", "userId": "u1", "event": "E"}]}
        a.pause()
        wait_for(lambda: set(a.processes().values()) == {"T"},
                 timeout=5, what="both processes stopped")
        with pytest.raises(OSError):
            a.post("/v1/batch", batch, timeout=1.0)  # nothing answers a stopped gateway
        assert b.post("/v1/batch", batch)[0] == 200
        a.resume()
        wait_for(lambda: "T" not in a.processes().values(),
                 timeout=5, what="both processes running")
        assert a.post("/v1/batch", batch)[0] == 200
        pids = a.processes()
        a.kill()
        assert a.processes() == {} and not [pid for pid in pids if running(pid)]
        assert not a.alive and fleet.alive == [b]
        a.start()  # on the same folder and port
        assert a.post("/v1/batch", batch)[0] == 200
        wait_for(lambda: mock_accoil.count("u1", "E") == 2,
                 timeout=15, what="each gateway's one event")
