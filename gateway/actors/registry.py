"""The live actors, one per (source, account), activated on first message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.actors.actor import Actor, Envelope
from gateway.config import Settings, Source
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.backlog import Backlog
    from gateway.observability.metrics import Metrics


class Actors:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        metrics: Metrics,
        backlog: Backlog,
        on_calls: Callable[[str], None],
        disk_full: Callable[[], bool],
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.backlog = backlog
        self._on_calls = on_calls
        self._disk_full = disk_full
        self._live: dict[tuple[str, str], Actor] = {}
        self._asked: set[Actor] = set()  # asked to passivate, not gone yet
        self._room = asyncio.Event()
        self._all_gone = asyncio.Event()
        self._all_gone.set()

    def __len__(self) -> int:
        return len(self._live)

    async def deliver(self, env: Envelope, source: Source, account: str) -> None:
        key = (source.id, account)
        actor = self._live.get(key)
        if actor is None:
            while len(self._live) >= self.settings.max_actors:
                # crowded: ask the longest-lived quarter to flush and passivate (one scan frees
                # many places, so admissions stay cheap), then wait for a place
                self._room.clear()
                if not self._asked:  # else those already asked are still flushing: wait
                    self._evict(max(1, self.settings.max_actors // 4))
                await self._room.wait()
            actor = self._live.get(key)
            if actor is None:
                actor = self._start(source, account, key)
        await actor.put(env)

    def _evict(self, wanted: int) -> None:
        for other in self._live.values():  # insertion order: oldest activation first
            if wanted <= 0:
                break
            # busy ones too: the router waits meanwhile, so an actor asked to leave gets no
            # more messages, works through its mailbox, flushes and goes
            if not other.leaving:
                other.leave_soon()
                self._asked.add(other)
                wanted -= 1

    def _start(self, source: Source, account: str, key: tuple[str, str]) -> Actor:
        actor = Actor(
            source, account, store=self.store, settings=self.settings, metrics=self.metrics,
            on_flushed=self._flushed, on_exit=self._exited, disk_full=self._disk_full,
        )
        self._live[key] = actor
        self._all_gone.clear()
        self.metrics.active_actors.set(len(self._live))
        actor.task = asyncio.create_task(actor.run(), name=f"actor:{source.id}")
        return actor

    def _flushed(self, actor: Actor, messages: int, calls: int) -> None:
        self.backlog.applied(messages, calls)
        if calls:
            self._on_calls(actor.source.id)

    def _exited(self, actor: Actor) -> None:
        key = (actor.source.id, actor.account)
        if self._live.get(key) is actor:
            del self._live[key]
        self._asked.discard(actor)
        self.metrics.active_actors.set(len(self._live))
        self._room.set()
        if not self._live:
            self._all_gone.set()

    async def stop(self, within: float) -> bool:
        """Ask every actor to flush and end; True when all did within the timeout."""
        for actor in list(self._live.values()):
            actor.stop()
        try:
            async with asyncio.timeout(within):
                await self._all_gone.wait()
        except TimeoutError:
            return False
        return True
