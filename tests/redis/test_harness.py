"""The harness itself: AOF survives SIGKILL on the same folder and port; the cluster is
three primaries that share the slots."""

from __future__ import annotations

from collections.abc import Callable

from tests.redis.redis_support import RedisClusterNodes, RedisServer


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
