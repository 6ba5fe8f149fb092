"""Configuration: the sources (one per Segment write key) and the server settings.

Types only validate shape and ranges; `gateway.cli` builds a `Settings` from a TOML
file, flags and environment variables.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

DEFAULT_BASE_URL = "https://in.accoil.com"
# the largest max_concurrency accepted: one keep-alive connection each
MAX_CONCURRENCY = 4096

Api = Literal["v2", "segment"]
TrackMode = Literal["exact", "daily-unique"]
Fsync = Literal["off", "normal", "full"]
PipelineMode = Literal["process", "inline"]
StoreKind = Literal["sqlite", "redis"]
# a page or screen call without a name: skipped (and counted), or named from its properties
UnnamedPages = Literal["skip", "title", "path"]

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class Source(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One Segment source: the write key clients send, and where its calls go."""

    write_key: Annotated[str, msgspec.Meta(min_length=1)]
    accoil_api_key: Annotated[str, msgspec.Meta(min_length=1)]
    name: str = ""
    api: Api = "v2"
    base_url: str = DEFAULT_BASE_URL
    # optional hard caps on top of the adaptive limit, which finds Accoil's pace by itself
    rate_per_second: Positive | None = None
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONCURRENCY)] | None = None
    track_mode: TrackMode = "exact"
    timeout: Positive = 10.0
    # analytics.js's default `page()` has no name: "skip" counts it and sends nothing;
    # "title" / "path" name it "Page Viewed <properties.title | properties.path>"
    unnamed_pages: UnnamedPages = "skip"

    def __post_init__(self) -> None:
        # computed once: the id names the source on every message's path
        if not self.name:
            self.name = _fingerprint(self.write_key)

    @property
    def id(self) -> str:
        """A stable, secret-free name for logs, metrics and the store: `name`, or else
        `src_` and a hash of the write key."""
        return self.name


def _fingerprint(secret: str) -> str:
    import hashlib

    return "src_" + hashlib.sha256(secret.encode()).hexdigest()[:10]


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    sources: list[Source] = []
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8088
    data_dir: str = "./data"
    admin_token: str | None = None
    flush_interval: Positive = 2.0
    # messages read from the inbox and not yet committed, all actors together: past it the
    # dispatcher commits a turn before it reads more (memory flat whatever the backlog)
    max_in_flight: PositiveInt = 100_000
    actor_idle: Positive = 10.0
    max_actors: PositiveInt = 5000
    # accepted events not yet forwarded; past it ingest answers 503
    max_backlog: PositiveInt = 5_000_000
    retry_after: PositiveInt = 5
    dedupe_window: Positive = 7 * 86400.0
    # seconds a dead letter is kept after its last occurrence (30 days)
    dead_letter_retention: Positive = 30 * 86400.0
    fsync: Fsync = "normal"
    # "process": router, actors and forwarders run in a worker process of their own, so that
    # ingest keeps a core; "inline": everything in one process (tests, one-core machines)
    pipeline: PipelineMode = "process"
    # the worker's CPU priority below ingest's (os.nice): under contention, acks come first
    pipeline_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    shutdown_timeout: Positive = 10.0
    # bytes kept free in the data folder by a preallocated file (`reserve`), released when the
    # disk is full so that outcomes and deletions can still be written (see `gateway.disk`)
    disk_reserve: Annotated[int, msgspec.Meta(ge=0)] = 16 * 1024 * 1024
    # a client has this long to send a request's headers and body, and an idle keep-alive
    # connection is closed after it: a slow or stalled client cannot hold a handler for ever
    read_timeout: Positive = 30.0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    # retry backoff, seconds: full jitter over min(max, base * 2**attempt)
    retry_base: Positive = 0.5
    retry_max: Positive = 60.0
    # consecutive upstream failures that open a source's circuit, and how long it stays open
    circuit_threshold: PositiveInt = 5
    circuit_cooldown: Positive = 5.0
    # "sqlite": the embedded store under data_dir (one gateway); "redis": many gateways on one
    # Redis or Redis Cluster (SCALING.md)
    store: StoreKind = "sqlite"
    # redis://[:password@]host:port[/db], rediss:// for TLS, unix:///path; a Cluster is
    # recognised by itself. Required with store = "redis"; it may hold a password (a secret)
    redis_url: str | None = None
    # how many partitions the users are hashed into; fixed when a deployment first starts
    # (kept in Redis), and a gateway started later with another count refuses to start
    partitions: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 64
    # replicas that must hold a request's messages before it is acknowledged (Redis WAIT)
    redis_wait_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
