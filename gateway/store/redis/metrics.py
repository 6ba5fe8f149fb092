"""The Redis backend's Prometheus series, in the registry of the process that runs the
leases (the pipeline's). `partition` labels are bounded by the partition count."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

_P = "accoil_gateway_"
CHANGES = ("acquired", "released", "lost")


class RedisMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.owned = Gauge(
            _P + "partitions_owned", "Partitions whose lease this gateway holds.",
            registry=registry)
        self.lease_changes = Counter(
            _P + "lease_changes",
            "Partition leases acquired, released (rebalance or leave) or lost (expired or "
            "taken over).", ["change"], registry=registry)
        self.lag = Gauge(
            _P + "partition_lag",
            "Inbox entries of a partition not yet applied (stream length past the cursor), "
            "for the partitions this gateway owns.", ["partition"], registry=registry)
        self.reads = Counter(
            _P + "inbox_reads",
            "Reads of the owned inbox streams that found entries (one XREAD on one node, a "
            "pipeline of XRANGEs on a Cluster).", registry=registry)
        self.entries = Counter(
            _P + "inbox_entries_read", "Inbox stream entries read by this gateway's pipeline.",
            registry=registry)
        self.commits = Counter(
            _P + "partition_commits",
            "Partition turns committed (one fenced script each, with the partition's cursor).",
            registry=registry)
        for change in CHANGES:
            self.lease_changes.labels(change)
        self._lagging: set[int] = set()

    def set_lag(self, lags: dict[int, int]) -> None:
        """The lag of the partitions owned now; the series of partitions no longer owned
        are removed, so that no gateway reports a lag it does not apply."""
        for p in self._lagging - set(lags):
            self.lag.remove(str(p))
        for p, n in lags.items():
            self.lag.labels(str(p)).set(n)
        self._lagging = set(lags)
