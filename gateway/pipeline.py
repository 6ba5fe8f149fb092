"""The pipeline, everything after ingest's ack: router -> dispatcher/actors -> outbox -> forwarders.

It reads the durable inbox that ingest writes, so it can run in ingest's process (tests,
`pipeline = "inline"`) or in a process of its own (`gateway.worker`, the default): the
same object either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.actors.dispatcher import Dispatcher
from gateway.actors.router import Router
from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.disk import Disk, out_of_space
from gateway.forward.client import AccoilClient
from gateway.forward.forwarder import Forwarder
from gateway.mapping import call_kind
from gateway.observability.metrics import Metrics
from gateway.segment import Decoded
from gateway.store import Counts, Store
from gateway.store.redis.store import RedisStore
from gateway.tasks import stop_tasks

log = structlog.get_logger("gateway.pipeline")

HOUSEKEEPING = 30.0  # seconds between prunings of old message ids, ledger rows, dead letters
REAP = 1.0  # seconds between deletions of wholly applied inbox segments
RESYNC = 10.0  # seconds between readings of a shared store's backlog (Redis mode)
RESTART_RETRY = 0.5  # seconds between tries to reset the inbox's progress on a full disk
WIRE_GRACE = 2.0  # seconds of a stop's drain kept for the calls on the wire


class Pipeline:
    def __init__(
        self, settings: Settings, store: Store, metrics: Metrics, backlog: Backlog, disk: Disk
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.backlog = backlog
        self.sources = {s.id: s for s in settings.sources}
        self.forwarders: dict[str, Forwarder] = {}
        self.disk = disk
        self.router = Router(store, self.sources)
        self.actors = Dispatcher(
            store, self.router, settings, metrics, backlog, self._calls_queued, lambda: disk.full
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatcher_task: asyncio.Task[None] | None = None
        # what to do when the dispatcher fails: the worker process exits, and the front
        # starts another that replays the inbox from the store
        self.on_failure: Callable[[BaseException], None] | None = None
        if isinstance(store, RedisStore):
            # another gateway may have changed what this one remembers of its new partitions
            store.on_owner_change = self.actors.forget

    def _calls_queued(self, source_id: str) -> None:
        fwd = self.forwarders.get(source_id)
        if fwd is not None:
            fwd.wake()

    def committed(self, row_id: int, decoded: Decoded) -> None:
        """Ingest, in this process, committed inbox row `row_id`: route it from memory."""
        if self.router.submitted(row_id, decoded):
            self.actors.wake()

    async def start(self) -> Counts:
        # every inbox row not wholly applied counts as unapplied again: the router replays
        # it from the start, and dedupe drops what was already applied
        restarted = await self._restart_inbox()
        counts = await self.store.counts()
        self.backlog.resync(counts.inbox, counts.outbox)
        for source in self.settings.sources:
            client = AccoilClient.for_source(source)
            fwd = Forwarder(source, self.store, client, self.settings, self.metrics, self.backlog)
            self.forwarders[source.id] = fwd
            self._tasks.append(asyncio.create_task(fwd.run(), name=f"forward:{source.id}"))
        if restarted:
            self._dispatch()
        else:
            self._tasks.append(asyncio.create_task(self._restart_when_room(), name="restart"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self._tasks.append(asyncio.create_task(self._reaping(), name="reaping"))
        if isinstance(self.store, RedisStore):
            self._tasks.append(asyncio.create_task(self._resyncing(), name="resync"))
            if self.store.leases is not None:
                # the sources' caps are the deployment's: this gateway holds its share
                self.store.leases.on_owned = self._share
                self.store.leases.on_revoke = self._revoke
                self._share(len(self.store.leases.owned))
        return counts

    def _share(self, owned: int) -> None:
        for fwd in self.forwarders.values():
            fwd.limiter.set_share(owned / self.settings.partitions)
            leases = self.store.leases if isinstance(self.store, RedisStore) else None
            if leases is not None:
                # a partition held again (under a new epoch) is sent from again
                fwd.unhold(set(leases.owned) - leases.leaving)

    async def _revoke(self, partitions: list[int], within: float) -> set[int]:
        """A handoff: no call of `partitions` starts from here, and those on the wire are
        answered and recorded while this gateway still holds their leases; the partitions
        whose calls are not all recorded within `within` seconds."""
        for fwd in self.forwarders.values():
            fwd.hold(partitions)
        settled = await asyncio.gather(
            *(fwd.settle(partitions, within) for fwd in self.forwarders.values()))
        if all(settled):
            return set()
        busy = {p for p in partitions if any(fwd.on_wire([p]) for fwd in self.forwarders.values())}
        log.warning("handoff: calls not recorded yet; those partitions are kept until the next "
                    "round", calls=sum(fwd.on_wire(partitions) for fwd in self.forwarders.values()),
                    partitions=len(busy), within_s=round(within, 2))
        return busy

    def _dispatch(self) -> None:
        task = asyncio.create_task(self.actors.run(), name="dispatcher")
        task.add_done_callback(self._dispatcher_done)
        self._dispatcher_task = task

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        # nothing awaits this task before a stop: an exception escaping it would stop
        # applying in silence (entries wait in the inbox while the process sits idle)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error("dispatcher failed: nothing more is applied", error=repr(exc), exc_info=exc)
        if self.on_failure is not None:
            self.on_failure(exc)

    async def _restart_inbox(self) -> bool:
        """Reset the inbox's progress for a replay; False if the disk has no room for it."""
        try:
            await self.store.restart_inbox()
        except Exception as exc:
            if not out_of_space(exc):
                raise
            return False
        return True

    async def _restart_when_room(self) -> None:
        """Started on a full disk: the gateway comes up (not ready, `Disk` says why) and
        forwards what is queued, but applies nothing until the inbox's progress is reset,
        since a record half applied before the stop would otherwise be counted from the
        middle."""
        while True:
            await asyncio.sleep(RESTART_RETRY)
            if await self._restart_inbox():
                break
        counts = await self.store.counts()
        self.backlog.resync(counts.inbox, counts.outbox)
        self._dispatch()

    async def stop(self, within: float) -> None:
        """Drain: route the inbox, flush actors, forward what `within` seconds allow, keep
        the rest."""
        deadline = time.monotonic() + within

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self._dispatcher_task is not None:
            self.actors.stop()
            try:
                async with asyncio.timeout(max(left(), 1.0)):
                    await self._dispatcher_task
            except TimeoutError:
                log.warning("shutdown: inbox not fully applied; the rest waits in the store")
            except Exception:  # it failed earlier, and `_dispatcher_done` said so
                pass
            self._dispatcher_task = None
        # the last part is for the calls on the wire: answered and recorded before the
        # leases go, they are not sent again by the partitions' next owners
        on_wire = min(WIRE_GRACE, within / 4)
        for fwd in self.forwarders.values():
            await fwd.drain(max(0.0, left() - on_wire))
        await asyncio.gather(*(fwd.stop(max(left(), on_wire)) for fwd in self.forwarders.values()))
        # the resync and housekeeping loops talk to the store: see `gateway.tasks`
        await stop_tasks(self._tasks)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.store.reap(self.actors.cursor)

    async def metrics_text(self) -> bytes:
        return self.metrics.render_pipeline()

    async def stats(self) -> dict[str, Any]:
        return {
            "active_actors": len(self.actors),
            "circuits": {sid: fwd.circuit.state for sid, fwd in self.forwarders.items()},
            "forwarding": {sid: fwd.limiter.stats() for sid, fwd in self.forwarders.items()},
            "busy": any(f.busy for f in self.forwarders.values()),
        }

    async def requeue(self, ids: list[int]) -> int:
        """Mark dead letters replayed (their messages are back in the inbox); calls go back
        to the outbox."""
        wanted = {letter.id: letter for letter in await self.store.replayable(ids, None)}
        letters = [
            (i, call_kind(letter.path, letter.payload) if letter.stage == "forward" else None)
            for i in ids if (letter := wanted.get(i)) is not None
        ]
        n = await self.store.requeue(letters, time.time())
        counts = await self.store.counts()
        self.backlog.resync(counts.inbox, counts.outbox)
        self.actors.wake()
        for fwd in self.forwarders.values():
            fwd.wake()
        return n

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            try:
                now = time.time()
                await self.actors.prune(now - self.settings.dedupe_window)
                await self.store.prune_dead_letters(now - self.settings.dead_letter_retention)
            except Exception as exc:
                if not out_of_space(exc):  # a full disk is reported once, by `Disk`
                    log.exception("housekeeping failed")

    async def _resyncing(self) -> None:
        """Redis mode: every gateway accepts and applies, so this one's counters drift from
        the deployment's backlog; take the store's counts as the truth, often (the backlog
        bound is then the deployment's)."""
        while True:
            await asyncio.sleep(RESYNC)
            try:
                counts = await self.store.counts()
                self.backlog.resync(counts.inbox, counts.outbox)
            except Exception as exc:
                log.warning("reading the backlog from Redis failed", error=str(exc))

    async def _reaping(self) -> None:
        while True:
            await asyncio.sleep(REAP)
            try:
                if self.disk.full:
                    # the log would grow into the little space left: have it reused instead
                    await self.store.checkpoint()
                await self.store.reap(self.actors.cursor)
            except Exception as exc:
                if not out_of_space(exc):
                    log.exception("reaping the inbox failed")
