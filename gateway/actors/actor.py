"""One actor per (source, account): it owns that account's pending state.

Messages arrive in order through a bounded mailbox. Identify and group calls merge trait by
trait into one pending call per user (or group and user); track, page and screen become
ledger hits. Every `flush_interval`, or when the pending set is full, the actor commits all
of it in one store call, which also marks those messages done in the inbox. An idle actor
leaves the registry: everything it knew is in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.actors.integrations import enabled
from gateway.config import Settings, Source
from gateway.disk import out_of_space
from gateway.ingest.messages import Message
from gateway.mapping import Skip, iso, to_call
from gateway.observability.metrics import SKIPS, bounded
from gateway.store import CallPut, DeadLetter, Flush, Known, Store, TrackHit

if TYPE_CHECKING:
    from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.actors")


class Envelope(msgspec.Struct):
    """A message on its way to its account's actor, with what the router worked out."""

    inbox_id: int
    message_id: str
    message: Message
    timestamp: datetime
    context: dict[str, Any] | None
    integrations: dict[str, Any] | None = None  # the batch's merged under the message's


class Pending:
    """An identify or group call being merged: per trait, the value with the latest timestamp."""

    __slots__ = ("kind", "path", "body", "ts", "traits")

    def __init__(self, kind: str, path: str, body: dict[str, Any], ts: str) -> None:
        self.kind = kind
        self.path = path
        self.body = body
        self.ts = ts
        self.traits: dict[str, tuple[Any, str]] = {}

    def merge(self, path: str, body: dict[str, Any], traits: dict[str, Any], ts: str) -> None:
        if ts >= self.ts:
            self.path, self.body, self.ts = path, body, ts
        for name, value in traits.items():
            old = self.traits.get(name)
            if old is None or ts >= old[1]:
                self.traits[name] = (value, ts)


class Actor:
    def __init__(
        self,
        source: Source,
        account: str,
        *,
        store: Store,
        settings: Settings,
        metrics: Metrics,
        on_flushed: Callable[[Actor, int, int], None],
        on_exit: Callable[[Actor], None],
        disk_full: Callable[[], bool],
    ) -> None:
        self.source = source
        self.account = account
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._on_flushed = on_flushed
        self._on_exit = on_exit
        self._disk_full = disk_full
        self._refused = 0  # flushes in a row the store refused
        self._items: deque[Envelope] = deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._leave = False
        self._stopping = False
        self._known: dict[str, tuple[str, dict[str, Any]]] = {}
        self._reset()
        self.task: asyncio.Task[None] | None = None

    def _reset(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._tracks: list[TrackHit] = []
        self._seen: list[str] = []
        self._accounts: list[tuple[str, str]] = []
        self._dead: list[DeadLetter] = []
        self._inbox: dict[int, int] = {}
        self._held = 0  # messages taken since the last flush
        self._since: float | None = None

    # the router's side

    async def put(self, env: Envelope) -> None:
        while len(self._items) >= self.settings.mailbox_size:
            self._space.clear()
            await self._space.wait()
        self._items.append(env)
        self._ready.set()

    def leave_soon(self) -> None:
        """Flush now and passivate once the mailbox is empty (the registry is crowded)."""
        self._leave = True
        self._ready.set()

    def stop(self) -> None:
        """Flush everything, then end (shutdown)."""
        self._stopping = True
        self._ready.set()

    @property
    def leaving(self) -> bool:
        return self._leave or self._stopping

    # the actor's own loop

    async def run(self) -> None:
        s = self.settings
        last_active = time.monotonic()
        try:
            while True:
                while self._items and self._held < s.flush_max_pending:
                    self._take(self._items.popleft())
                if len(self._items) < s.mailbox_size:
                    self._space.set()
                now = time.monotonic()
                if self._held and (
                    self._held >= s.flush_max_pending
                    or self._leave
                    or self._stopping
                    or (self._since is not None and now - self._since >= s.flush_interval)
                ):
                    await self._flush()
                    last_active = time.monotonic()
                    continue
                if (
                    not self._held
                    and not self._items
                    and (self._stopping or self._leave or now - last_active >= s.actor_idle)
                ):
                    return  # nothing pending, nothing queued: the store has it all
                if self._items:
                    continue
                wait = (
                    s.flush_interval - (now - self._since)
                    if self._since is not None
                    else s.actor_idle - (now - last_active)
                )
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._ready.wait()
                if self._items:
                    last_active = time.monotonic()
        except Exception:
            # what it held stays in the inbox and is routed again at the next start
            log.exception("actor failed", source_id=self.source.id, account=self.account)
            raise
        finally:
            # no await between the last emptiness check and leaving the registry, so the
            # router can never hand a message to an actor that is gone
            self._on_exit(self)

    def _take(self, env: Envelope) -> None:
        self._held += 1
        if self._since is None:
            self._since = time.monotonic()
        self._inbox[env.inbox_id] = self._inbox.get(env.inbox_id, 0) + 1
        msg = env.message
        if not enabled(env.integrations):
            # turned off for Accoil by the sender (consent): counted, never a dead letter
            self._seen.append(env.message_id)
            self.metrics.skipped.labels(self.source.id, "integrations").inc()
            return
        call = to_call(
            msg, api=self.source.api, timestamp=env.timestamp, context=env.context,
            unnamed_pages=self.source.unnamed_pages,
        )
        if isinstance(call, Skip):
            if call.unsupported:
                self._seen.append(env.message_id)
                self.metrics.unsupported.labels(self.source.id, type(msg).__name__.lower()).inc()
            elif call.counted is not None:
                self._seen.append(env.message_id)
                self.metrics.skipped.labels(self.source.id, bounded(call.counted, SKIPS)).inc()
            else:
                self._dead.append(
                    DeadLetter(
                        source=self.source.id, stage="mapping", reason=call.reason,
                        payload=msgspec.json.encode(msg), account=self.account, grouped=True,
                    )
                )
            return
        ts = iso(env.timestamp)
        if call.kind == "track":
            assert call.user_id is not None and call.event is not None
            self._tracks.append(
                TrackHit(env.message_id, ts[:10], call.user_id, call.event, ts, call.path, call.body)
            )
            return
        self._seen.append(env.message_id)
        if call.kind == "identify":
            key = f"i\x1f{call.user_id}"
        else:
            # JSON keeps the pair unambiguous whatever characters the ids hold
            key = "g" + msgspec.json.encode([call.group_id, call.user_id or ""]).decode()
            if call.user_id is not None and call.group_id is not None:
                self._accounts.append((call.user_id, call.group_id))
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = Pending(call.kind, call.path, call.body, ts)
        else:
            self.metrics.coalesced.labels(self.source.id, call.kind).inc()
        pending.merge(call.path, call.body, call.traits or {}, ts)

    async def _flush(self) -> None:
        if self._disk_full():
            # the space freed by the reserve is for outcomes and deletions: hold everything
            # (the inbox has it too) until the folder has room again
            await self._later()
            return
        calls, known = await self._calls()
        flush = Flush(
            source=self.source.id, account=self.account, track_mode=self.source.track_mode,
            tracks=self._tracks, calls=calls, seen=self._seen, known=known,
            accounts=self._accounts, dead=self._dead, inbox=self._inbox, now=time.time(),
        )
        try:
            result = await self.store.flush(flush)
        except Exception as exc:
            # keep everything pending and try again later: the inbox still holds it. One line
            # per run of failures; a full disk is reported once, by the store's owner
            if self._refused == 0 and not out_of_space(exc):
                log.exception("flush failed", source_id=self.source.id, account=self.account)
            self._refused += 1
            await self._later()
            return
        if self._refused:
            log.info(
                "flush succeeded after refusals", source_id=self.source.id,
                account=self.account, refused=self._refused,
            )
            self._refused = 0
        for k in known:
            self._known[k.key] = (k.day, k.traits)
        src = self.source.id
        if result.duplicates:
            self.metrics.deduplicated.labels(src).inc(result.duplicates)
        for letter in self._dead:
            self.metrics.dead_letters.labels(src, letter.stage).inc()
        if self._dead:
            log.warning(
                "messages not forwardable", source_id=src, account=self.account,
                count=len(self._dead), reason=self._dead[0].reason,
            )
        self._on_flushed(self, self._held, result.calls)
        self._reset()

    async def _later(self) -> None:
        """Flush again after an interval (the run loop waits `flush_interval` from `_since`;
        this pause also covers a full actor, which would otherwise try again at once)."""
        self._since = time.monotonic()
        await asyncio.sleep(min(self.settings.flush_interval, 1.0))

    async def _calls(self) -> tuple[list[CallPut], list[Known]]:
        """The identify/group calls to queue: only those that change what went out today."""
        if not self._pending:
            return [], []
        wanted: dict[str, list[str]] = {}
        for key, p in self._pending.items():
            day = p.ts[:10]
            cached = self._known.get(key)
            if cached is None or cached[0] != day:
                wanted.setdefault(day, []).append(key)
        loaded: dict[str, dict[str, Any]] = {}
        for day, keys in wanted.items():
            for key, traits in (await self.store.known(self.source.id, keys, day)).items():
                loaded[key] = traits
                self._known[key] = (day, traits)
        calls: list[CallPut] = []
        known: list[Known] = []
        for key, p in self._pending.items():
            day = p.ts[:10]
            cached = self._known.get(key)
            before = cached[1] if cached is not None and cached[0] == day else None
            traits = {name: value for name, (value, _) in p.traits.items()}
            if before is not None and all(
                name in before and before[name] == value for name, value in traits.items()
            ):
                self.metrics.coalesced.labels(self.source.id, p.kind).inc()
                continue
            merged = {**(before or {}), **traits}
            body = {**p.body, "traits": merged, "timestamp": p.ts}
            calls.append(CallPut(key, p.kind, p.path, body))
            known.append(Known(key, day, merged))
        return calls, known
