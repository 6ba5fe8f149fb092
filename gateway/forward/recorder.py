"""Outcomes of calls Accoil answered, held until the store has recorded them.

A call's outcome (delivered, retry later, rejected) must reach the store before its row may
be read and sent again: a delivered call whose `delivered` write failed would otherwise go
out a second time, and Accoil would count it twice. So a write that fails is kept here, in
memory, and tried again with backoff until it lands; meanwhile the caller keeps the row
marked in flight, and the forwarder sends nothing new (`blocked`), so what is kept is
bounded by the calls that were on the wire when the store began refusing writes.

One warning when writes start failing and one line when they land again, not a line per
failed write: on a full disk there would be one per call.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("gateway.forward")

RETRY_BASE = 0.2  # seconds before the first retry of a refused write
RETRY_MAX = 2.0  # the retries' interval grows to this


class OutcomeRecorder:
    def __init__(
        self,
        source_id: str,
        *,
        on_change: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`on_change(n)`: told the number of outcomes waiting for the store (for a gauge)."""
        self.source_id = source_id
        self._on_change = on_change
        self._rng = rng or random.Random()
        self._waiting = 0
        self._clear = asyncio.Event()
        self._clear.set()
        self._refused = 0  # failed writes in the current streak
        self._dropped = 0  # outcomes of the streak given up unrecorded (the forwarder stopped)

    @property
    def blocked(self) -> bool:
        """Some outcome is waiting for the store: send nothing new."""
        return self._waiting > 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def wait_clear(self) -> None:
        await self._clear.wait()

    async def record(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run `write` until it succeeds; returns once the store has the outcome.

        Cancelling (the forwarder stopping) leaves the outcome unrecorded: the row stays in
        the outbox and is sent again at the next start, as a call on the wire at a crash."""
        try:
            await write()
            return
        except Exception as exc:
            self._hold(exc)
        wait = RETRY_BASE
        recorded = False
        try:
            while True:
                await asyncio.sleep(wait * (0.5 + self._rng.random() / 2))
                wait = min(wait * 2, RETRY_MAX)
                try:
                    await write()
                except Exception:
                    self._refused += 1
                    continue
                recorded = True
                return
        finally:
            self._release(recorded)

    def _hold(self, exc: Exception) -> None:
        if self._waiting == 0 and self._refused == 0:
            log.warning(
                "recording call outcomes failed; forwarding paused until the store takes them",
                source_id=self.source_id, error=repr(exc),
            )
        self._refused += 1
        self._waiting += 1
        self._clear.clear()
        self._changed()

    def _release(self, recorded: bool) -> None:
        self._waiting -= 1
        self._dropped += not recorded
        if self._waiting == 0:
            if self._dropped:
                log.warning(
                    "call outcomes not recorded before the forwarder stopped; those calls go"
                    " again at the next start", source_id=self.source_id, calls=self._dropped,
                )
            else:
                log.info(
                    "call outcomes recorded again; forwarding resumes",
                    source_id=self.source_id, refused_writes=self._refused,
                )
            self._refused = self._dropped = 0
            self._clear.set()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._waiting)
