"""The forwarder of one source: drains its outbox into Accoil, paced and retried.

Each outbox row is a call; a ledger row in exact mode stands for `repeat` occurrences of the
same track call, sent one by one. Pacing is the source's adaptive concurrency limit
(`gateway.forward.limiter`). A row leaves the outbox only once Accoil took it (or
refused it for good, which makes it a dead letter), so a crash can re-send only what was in
flight. A call is never sent again because its outcome could not be written: the outcome is
held (`OutcomeRecorder`) and the row stays in flight until the store has it, and nothing new
is sent meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.config import Settings, Source
from gateway.forward.backoff import delay
from gateway.forward.circuit import Circuit
from gateway.forward.client import AccoilClient
from gateway.forward.limiter import CEILING, Limit, Limiter
from gateway.forward.outcome import Delivered, Reject, Retry
from gateway.forward.recorder import OutcomeRecorder
from gateway.mapping.dialects import spoken_at
from gateway.store import OutboxItem, Store
from gateway.store.redis.partition import id_partition
from gateway.tasks import stop_tasks

if TYPE_CHECKING:
    from gateway.backlog import Backlog
    from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.forward")

_decode = msgspec.json.Decoder(dict[str, Any]).decode
IDLE_POLL = 5.0  # with nothing queued, look again this often even without a wake-up
SETTLE_POLL = 0.02  # seconds between looks at a handed-over partition's calls on the wire


class Forwarder:
    def __init__(
        self,
        source: Source,
        store: Store,
        client: AccoilClient,
        settings: Settings,
        metrics: Metrics,
        backlog: Backlog,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.backlog = backlog
        self.rng = rng or random.Random()
        self.limiter = Limiter(
            Limit(max_concurrency=source.max_concurrency, rate_per_second=source.rate_per_second)
        )
        metrics.watch_limiter(source.id, self.limiter)
        self.circuit = Circuit(settings.circuit_threshold, settings.circuit_cooldown)
        # an outcome the store refused is kept and written again; the row stays in flight
        self.recorder = OutcomeRecorder(
            source.id, on_change=metrics.outcomes_waiting.labels(source.id).set, rng=self.rng
        )
        # Calls sent and not yet recorded, on the wire or answered: what a crash can send
        # twice. The limiter's slot frees when Accoil answers (the next call need not wait
        # for the store), so this bounds the answered-but-unwritten ones too, to the cap.
        self._unrecorded = asyncio.Semaphore(source.max_concurrency or CEILING)
        self._in_flight: dict[int, int] = {}  # outbox row id -> copies on the wire
        # completions are numbered so that a read of the outbox that began before a send
        # finished (and so may still show the delivered row) is not acted on for that row
        self._tick = 0
        self._finished: dict[int, int] = {}  # outbox row id -> tick of its last completion
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        # partitions being handed to another gateway (Redis mode): none of their calls is
        # sent from here on, even one read from the outbox before the handoff began
        self._held: set[int] = set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def run(self) -> None:
        src = self.source.id
        batch = max(256, 16 * (self.source.max_concurrency or CEILING))
        while not self._stopping:
            pause = max(self.limiter.paused_for(), self.circuit.wait_time())
            self.metrics.circuit_open.labels(src).set(self.circuit.state != "closed")
            if self.recorder.blocked:
                # the store refuses writes: send nothing until the outcomes it holds land
                await self.recorder.wait_clear()
                continue
            if pause > 0:
                # a wake-up left set by a finished call would end every sleep at once, and
                # Event.wait() on a set event never yields: the loop would spin, starving ingest
                self._wake.clear()
                await self._sleep(pause)
                continue
            self._wake.clear()
            read_at = self._tick
            items = await self.store.due(src, time.time(), batch)
            started = 0
            for item in items:
                if self._finished.get(item.id, 0) > read_at:
                    continue  # possibly stale: the next read shows it as it is now
                want = item.repeat if item.kind == "track" else 1
                for _ in range(want - self._in_flight.get(item.id, 0)):
                    await self._unrecorded.acquire()
                    sent_at = await self.limiter.acquire()
                    if (self._stopping or self.recorder.blocked or not self.circuit.allow()
                            or id_partition(item.id) in self._held):
                        self.limiter.cancel()
                        self._unrecorded.release()
                        break
                    self._in_flight[item.id] = self._in_flight.get(item.id, 0) + 1
                    task = asyncio.create_task(self._send(item, sent_at))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    started += 1
            self._finished = {k: t for k, t in self._finished.items() if t > read_at}
            if started:
                continue
            if items:
                # all due calls are on the wire: the next completion wakes us
                await self._sleep(IDLE_POLL)
                continue
            nxt = await self.store.next_due(src)
            wait = IDLE_POLL if nxt is None else min(max(nxt - time.time(), 0.01), IDLE_POLL)
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _send(self, item: OutboxItem, sent_at: float) -> None:
        src = self.source.id
        call = _call_label(item)
        released = False
        try:
            # a call that took its slot just before a Retry-After paused the source must not
            # go out during the pause (which a 429 on the wire may extend)
            while (paused := self.limiter.paused_for()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(paused)
                sent_at = self.limiter.clock()
            outcome = await self.client.post(item.path, _decode(item.body))
            # the connection is free: the next call may go while this outcome is recorded
            # (the row stays marked in flight until then, so it is not sent twice)
            cut = self.limiter.done(sent_at, outcome)
            released = True
            if cut is not None:
                self.metrics.limit_cuts.labels(src, cut).inc()
                log.info("limit cut", source_id=src, reason=cut,
                         limit=round(self.limiter.limit.limit, 2))
            self.metrics.upstream_latency.labels(src, call).observe(outcome.latency)
            if isinstance(outcome, Delivered):
                self.circuit.success()
                self.metrics.forwarded.labels(src, call, str(outcome.status)).inc()
                await self.recorder.record(lambda: self.store.delivered(item))
                self.backlog.sent(1)
            elif isinstance(outcome, Retry):
                self.circuit.failure()
                self.metrics.retries.labels(src).inc()
                self.metrics.forwarded.labels(src, call, str(outcome.status or "error")).inc()
                if outcome.retry_after:
                    # Accoil asked the whole source to slow down, not just this call
                    self.limiter.pause(outcome.retry_after)
                wait = delay(
                    item.attempts, self.settings.retry_base, self.settings.retry_max,
                    outcome.retry_after, self.rng,
                )
                log.info(
                    "upstream retry", source_id=src, call=call, reason=outcome.reason,
                    status=outcome.status, attempt=item.attempts + 1, wait=round(wait, 3),
                )
                next_at, why = time.time() + wait, outcome.reason
                await self.recorder.record(lambda: self.store.retry(item, next_at, why))
            elif isinstance(outcome, Reject):
                self.circuit.success()
                self.metrics.forwarded.labels(src, call, str(outcome.status)).inc()
                self.metrics.dead_letters.labels(src, "forward").inc()
                log.warning(
                    "upstream rejected call", source_id=src, call=call, status=outcome.status
                )
                status, reason = outcome.status, f"Accoil answered {outcome.status}: {outcome.body}"
                await self.recorder.record(lambda: self.store.reject(item, status, reason))
                self.backlog.sent(item.repeat if item.kind == "track" else 1)
        except Exception:
            log.exception("forwarding failed", source_id=src, call=call)
        finally:
            self._tick += 1
            self._finished[item.id] = self._tick
            left = self._in_flight.get(item.id, 1) - 1
            if left > 0:
                self._in_flight[item.id] = left
            else:
                self._in_flight.pop(item.id, None)
            if not released:
                self.limiter.cancel()
            self._unrecorded.release()
            self._wake.set()

    def hold(self, partitions: Collection[int]) -> None:
        """Send no call of `partitions` from now on (their handoff has begun)."""
        self._held.update(partitions)

    def unhold(self, partitions: Collection[int]) -> None:
        self._held.difference_update(partitions)

    def on_wire(self, partitions: Collection[int]) -> int:
        """Calls of `partitions` sent and not yet recorded (an item's id carries its
        partition in its low bits)."""
        return sum(n for i, n in self._in_flight.items() if id_partition(i) in partitions)

    async def settle(self, partitions: Collection[int], within: float) -> bool:
        """Wait until every call of `partitions` on the wire is answered and its outcome
        recorded; False if `within` seconds passed first."""
        deadline = time.monotonic() + within
        while self.on_wire(partitions):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL)
        return True

    async def drain(self, within: float) -> bool:
        """Forward until the outbox of this source is empty; False if `within` seconds passed first."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self._tasks and await self.store.next_due(self.source.id) is None:
                return True
            self._wake.set()
            await asyncio.sleep(0.05)
        return False

    async def stop(self, within: float = 0.0) -> None:
        """Stop sending; calls on the wire get `within` seconds to be answered and recorded,
        then are cut off and stay in the outbox (the next owner sends them again)."""
        self._stopping = True
        self._wake.set()
        if self._tasks and within > 0:
            await asyncio.wait(list(self._tasks), timeout=within)
        # a call's outcome is recorded in the store, Redis in Redis mode: see `gateway.tasks`
        await stop_tasks(self._tasks)
        await self.client.close()


def _call_label(item: OutboxItem) -> str:
    return spoken_at(item.path).label(item.path)
