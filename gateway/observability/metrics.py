"""Prometheus metrics, in two registries owned by one `Metrics` instance.

Ingest's series (`registry`) and the pipeline's (`pipeline_registry`) are apart because
the pipeline may run in a process of its own (`gateway.worker`): each process updates only
its own families, and `/metrics` is ingest's exposition followed by the pipeline's, no
family in both.

Label values are bounded: `source` is `Source.id` (secret-free); `reason`, `type`, `call`,
`kind` and `stage` are names the code sets from fixed sets (a limit cut's `reason` from
`gateway.forward.limiter.Reason`); `status` is an HTTP status or "error"; `route` is a route
template, never a raw path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    generate_latest,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The classic text format every Prometheus scrapes. prometheus_client >= 0.22 labels its output
# version=1.0.0, which older scrapers reject; with plain metric names the bodies are identical.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_P = "accoil_gateway_"


class LimitLike(Protocol):
    """What the gauges read of a source's concurrency limit (`gateway.forward.limiter.Limit`)."""

    @property
    def limit(self) -> float: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def share(self) -> float: ...


class LimiterLike(Protocol):
    """What the gauges read of a forwarder's limiter (`gateway.forward.limiter.Limiter`):
    metrics sit below forwarding and do not import it."""

    @property
    def limit(self) -> LimitLike: ...

    def paused_for(self) -> float: ...


class Batched:
    """A counter's child whose increments add up in a plain int, handed to the child when
    its registry is collected (a scrape): the request path counts each request several
    times, and a Prometheus child's `inc()` takes a lock and checks its argument each call.
    Increments and scrapes both run on the event loop, so none is lost between them."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            self.child.inc(self.pending)
            self.pending = 0.0


class _Flush(Collector):
    """Registered before every family of its registry: a collection first hands the
    batched increments to their children, so every reader of the registry sees them."""

    def __init__(self, batched: dict[tuple[int, tuple[str, ...]], Batched]) -> None:
        self._batched = batched

    def collect(self) -> Iterable[Metric]:
        for each in self._batched.values():
            each.flush()
        return ()


class Metrics:
    def __init__(self, sources: Iterable[str] = ()) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.pipeline_registry = p = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Batched] = {}
        flush = _Flush(self._children)
        r.register(flush)
        p.register(flush)
        self.received = Counter(
            _P + "messages_received", "Messages received by ingest, valid or not.",
            ["source"], registry=r)
        self.accepted = Counter(
            _P + "messages_accepted", "Messages made durable and acknowledged.",
            ["source"], registry=r)
        self.rejected = Counter(
            _P + "messages_rejected", "Messages refused at ingest, by reason.",
            ["source", "reason"], registry=r)
        self.deduplicated = Counter(
            _P + "messages_deduplicated", "Messages dropped as repeats of a messageId already seen.",
            ["source"], registry=p)
        self.coalesced = Counter(
            _P + "messages_coalesced",
            "Messages merged into a pending call instead of becoming their own call.",
            ["source", "kind"], registry=p)
        self.unsupported = Counter(
            _P + "messages_unsupported", "Messages with no Accoil equivalent (alias), by type.",
            ["source", "type"], registry=p)
        self.skipped = Counter(
            _P + "messages_skipped",
            "Messages not forwarded by design, by reason: integrations (turned off for Accoil"
            " by the sender) or unnamed (a page or screen without a name).",
            ["source", "reason"], registry=p)
        self.forwarded = Counter(
            _P + "calls_forwarded", "Calls sent to Accoil, by call and HTTP status (or error).",
            ["source", "call", "status"], registry=p)
        self.retries = Counter(
            _P + "retries", "Calls to Accoil retried after 429, 5xx, timeout or connection error.",
            ["source"], registry=p)
        self.dead_letters = Counter(
            _P + "dead_letters", "Messages or calls kept as dead letters, by stage.",
            ["source", "stage"], registry=p)
        self.backlog = Gauge(
            _P + "backlog", "Events accepted and not yet forwarded.", registry=r)
        self.inbox = Gauge(
            _P + "inbox_messages", "Messages in the durable inbox, not yet taken by an actor.",
            registry=r)
        self.active_actors = Gauge(
            _P + "active_actors", "Account actors currently in memory.", registry=p)
        self.upstream_latency = Histogram(
            _P + "upstream_latency_seconds", "Time of one call to Accoil, response or error.",
            ["source", "call"], buckets=LATENCY_BUCKETS, registry=p)
        self.requests = Counter(
            _P + "http_requests", "HTTP requests served, by route template and status.",
            ["route", "status"], registry=r)
        self.circuit_open = Gauge(
            _P + "circuit_open", "1 while a source's circuit is open (forwarding paused).",
            ["source"], registry=p)
        self.limit = Gauge(
            _P + "forward_limit",
            "A source's adaptive concurrency limit: calls to Accoil it lets be in flight.",
            ["source"], registry=p)
        self.in_flight = Gauge(
            _P + "forward_in_flight", "Calls to Accoil in flight now.", ["source"], registry=p)
        self.paused = Gauge(
            _P + "forward_paused_seconds",
            "Seconds left of the pause Accoil asked for with Retry-After (0 when none).",
            ["source"], registry=p)
        self.share = Gauge(
            _P + "forward_share",
            "This gateway's share of a source's caps (rate_per_second, max_concurrency): 1 with "
            "one gateway; with store = \"redis\", the partitions it owns over all of them.",
            ["source"], registry=p)
        self.limit_cuts = Counter(
            _P + "forward_limit_cuts",
            "Times a source's limit was cut, by reason: rate_limited (429), unavailable (503), "
            "timeout, latency (round trip well above its baseline).",
            ["source", "reason"], registry=p)
        self.outcomes_waiting = Gauge(
            _P + "outcomes_waiting",
            "Call outcomes the store refused to record, held in memory and retried; while any "
            "is held the source sends nothing new.", ["source"], registry=p)
        self.disk_full = Gauge(
            _P + "disk_full",
            "1 while the data folder is full (its space reserve released): ingest answers 503.",
            registry=r)
        self.ready = Gauge(
            _P + "ready", "1 while the gateway accepts traffic, 0 while starting or draining.",
            registry=r)
        for source in sources:
            self.add_source(source)

    def add_source(self, source: str) -> None:
        """Create a source's series at zero, so dashboards and rate() see them from the start."""
        for counter in (self.received, self.accepted, self.deduplicated, self.retries):
            counter.labels(source=source)
        self.circuit_open.labels(source=source).set(0)
        self.outcomes_waiting.labels(source=source).set(0)

    def watch_limiter(self, source: str, limiter: LimiterLike) -> None:
        """Read a forwarder's limiter at each scrape rather than on every call."""
        self.limit.labels(source).set_function(lambda: limiter.limit.limit)
        self.in_flight.labels(source).set_function(lambda: limiter.limit.in_flight)
        self.paused.labels(source).set_function(limiter.paused_for)
        self.share.labels(source).set_function(lambda: limiter.limit.share)

    def child(self, metric: Counter, *labels: str) -> Batched:
        """`metric.labels(*labels)`, remembered and batched (`Batched`): for the request
        path, where `labels()` and `inc()` would each take a lock on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = Batched(metric.labels(*labels))
        return found

    def render_ingest(self) -> bytes:
        return generate_latest(self.registry)

    def render_pipeline(self) -> bytes:
        return generate_latest(self.pipeline_registry)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of both registries: (body, content type)."""
        return self.render_ingest() + self.render_pipeline(), CONTENT_TYPE
