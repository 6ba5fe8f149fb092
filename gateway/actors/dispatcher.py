"""The dispatcher: reads the inbox in commit order, runs the actors that have mail, and
commits their state in turns (DESIGN 4).

One loop, no task per actor. It reads inbox records, the router hands each message to its
account's actor (activated on first message: a dict entry), and the actors with mail take
it into their pending state. A turn ends when the messages held (read and not committed)
reach `max_in_flight`, when the oldest has waited `flush_interval`, when the inbox runs dry
after a backlog, when the live actors reach `max_actors`, or at shutdown; then the state of
every actor that took mail commits as one transaction (`gateway.actors.turn`), with the
turn's progress through the inbox. Messages held are bounded in total, so memory stays flat
whatever the backlog and the number of accounts. A partitioned store (Redis, SCALING.md) commits each partition's state
apart: an actor is per (source, account, partition), and a turn is one transaction per
partition (SQLite mode has one partition). After a turn every actor holds nothing: those idle for `actor_idle`
are passivated by dropping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from gateway.actors.actor import Actor
from gateway.actors.envelope import Envelope
from gateway.actors.fast import TAKE
from gateway.actors.router import Router
from gateway.actors.turn import Flush, Outcome, commit
from gateway.config import Settings, Source
from gateway.disk import out_of_space
from gateway.rules.ledger import LedgerKey, Row
from gateway.store import InboxRow, Store
from gateway.store.base import PartitionLost

if TYPE_CHECKING:
    from gateway.backlog import Backlog
    from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.actors")

READ_AHEAD = 16  # inbox records read at once
# while ingest is busy in this process, route one record per pause: a trickle that keeps
# actors and forwarders moving but leaves most of the CPU to the requests
YIELD = 0.05
POLL = 0.02  # seconds between looks at an empty inbox (ingest may be another process)
RETRY = 1.0  # seconds before a turn whose commit failed is tried again
RETAKE = 1.0  # seconds between attempts to record takes the store refused
SPARE = 1000  # passivated actors kept for reuse: activation allocates nothing
LEDGER_CACHE = 100_000  # ledger rows the actors remember between turns, all together
# a partitioned store's turn, while the inbox has more ready, may wait this many flush
# intervals to fill (`_due`)
BEHIND = 5
DRAINED = 16  # full reads between two that found the inbox dry: a backlog (`_drained`)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        router: Router,
        settings: Settings,
        metrics: Metrics,
        backlog: Backlog,
        on_calls: Callable[[str], None],
        disk_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self.backlog = backlog
        self._on_calls = on_calls
        self._disk_full = disk_full  # the data folder is full: turns wait
        self._modes = {s.id: s.track_mode for s in settings.sources}
        self._partitioned = settings.store == "redis"
        # live actors, least recently given mail first; one per (source, account, partition):
        # a partitioned store (Redis) commits each partition's state apart
        self._live: dict[tuple[str, str, int], Actor] = {}
        self._ready: list[Actor] = []  # actors with mail
        self._spare: list[Actor] = []  # passivated, to be activated again for any account
        self._holding: list[Actor] = []  # actors with state to commit
        self._flushes: dict[int, Flush] = {}  # the turn being read, per partition
        self._pending = 0  # messages in `_flushes`
        self._partition = 0  # the partition of the record being routed
        self._landing: asyncio.Task[None] | None = None  # the turn being committed
        self._landing_messages = 0
        self._remembered = 0  # ledger rows in the actors' memory (passivated ones' too)
        self._started: float | None = None  # when the oldest held message was read
        self._clock = time.monotonic()
        self._wake = asyncio.Event()
        self._turn = asyncio.Lock()  # a commit, or a pruning: never both at once
        self._stopping = False
        self._untaken: dict[int, int] = {}  # inbox record -> count: takes the store refused
        self._retake_at = 0.0
        self._compiled = TAKE  # None: every message goes through `_deliver`
        self._full = 0  # reads that brought all they asked for, since the inbox was dry
        self.cursor = 0  # the last inbox record routed

    def __len__(self) -> int:
        return len(self._live)

    @property
    def held(self) -> int:
        """Messages read from the inbox and not committed yet."""
        return self._pending + self._landing_messages

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Route what the inbox holds, commit, and return from `run`."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Route and commit until stopped. The store's inbox must have been restarted
        (`Store.restart_inbox`) before."""
        try:
            await self._run()
        finally:
            if self._landing is not None and not self._landing.done():
                self._landing.cancel()  # shutdown ran out of time: the inbox keeps it

    async def _run(self) -> None:
        s = self.settings
        # a turn is committed while the next one is read: half the bound each
        turn = max(1, s.max_in_flight // 2)
        while True:
            self._wake.clear()
            if self._untaken and time.monotonic() >= self._retake_at:
                self._retake()
            rows = []
            read = self.held < s.max_in_flight
            if read:
                rows = await self.store.inbox_after(self.cursor, READ_AHEAD)
                await self.router.prepare(rows)
            for row in rows:
                if row.count and self.backlog.ingest_first:
                    # the inbox is durable: while requests arrive, answer them first and
                    # route a record at a time in the gaps (a burst is absorbed, not refused)
                    await asyncio.sleep(YIELD)
                await self._route(row)
                if len(self._live) >= s.max_actors:
                    # crowded: commit what the actors hold, so that they can go at once (what
                    # they held is in the turn now; the next one is read while it lands)
                    await self._commit()
                    self._passivate()
                elif self._pending >= turn:
                    await self._commit()
            drained = read and self._drained(len(rows))
            if self._pending and (
                    self._due(len(rows)) or drained or (self._stopping and not rows)):
                await self._commit()
            if not rows:
                if self._stopping and not self._pending:
                    await self._landed()
                    return
                self._passivate()
                wait = POLL
                if self._started is not None:
                    wait = min(wait, max(0.0, self._started + s.flush_interval - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    def _due(self, read: int = 0) -> bool:
        """The oldest message held has waited `flush_interval`; `read`: rows the last read
        brought. In a partitioned store a turn commits each partition it touches apart, so
        a small turn costs more per event (each partition's ledger rows, known traits and
        fenced script), and the worker, slowed, cuts the next one smaller still: while the
        inbox has more ready (the read brought all it asked for) such a turn waits to fill
        to `max_in_flight / 2`, for at most `BEHIND` intervals. Caught up, the interval
        holds as it is."""
        if self._started is None:
            return False
        interval = self.settings.flush_interval
        if self._partitioned and read >= READ_AHEAD:
            interval *= BEHIND
        return time.monotonic() - self._started >= interval

    def _drained(self, read: int) -> bool:
        """`read`: rows a read brought. True when the inbox ran dry after a backlog (since
        it was last found dry, `DRAINED` reads brought all they asked for, and this one
        found nothing): the turn held is the backlog's tail, and waiting for
        `flush_interval` would only leave the worker idle before it lands (most of a second
        of a few seconds' apply, measured). Nothing found, not a short read: a partitioned
        store's streams run out one by one, their last reads short. A trickle does not make
        one (its reads are short), nor a stream the worker keeps up with (it finds the inbox
        dry between a few full reads)."""
        if read >= READ_AHEAD:
            self._full += 1
            return False
        if read:
            return False
        drained, self._full = self._full >= DRAINED, 0
        return drained

    async def _route(self, row: InboxRow) -> None:
        self.cursor = row.id
        if row.count == 0:  # wholly applied before a restart
            return
        self._clock = time.monotonic()
        if self._started is None:
            self._started = self._clock
        self._take(row.id, row.count)
        self._partition = row.partition
        try:
            dead = await self.router.route(row, self._deliver, self._counted, self._work)
        except Exception:
            # the store could not be read (`StoreFailed`; a record that fails by itself is
            # kept as dead letters by the router): leave the record pending in the inbox,
            # the next start routes it again
            log.exception("routing failed", source_id=row.source, inbox_id=row.id)
            for actor in self._ready:
                actor.mail.clear()
            self._ready.clear()
            return
        f = self._flush_of(row.partition)
        f.dead += dead
        f.inbox[row.id] = f.inbox.get(row.id, 0) + row.count
        f.messages += row.count
        self._pending += row.count
        self._work()

    def _work(self) -> None:
        """The actors given mail take it (after a record: the next one's messages are
        routed, and the compiled take's hits taken, after these, as in a row of its own)."""
        metrics = self.metrics
        for actor in self._ready:
            if not actor.held:
                self._holding.append(actor)
            actor.work(metrics)
        self._ready.clear()

    def _take(self, row_id: int, count: int) -> None:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                # until it is recorded, the record's segment is never deleted; made again
                # later (a take and the turns that apply the record add up in any order)
                self._untaken[row_id] = count
                self._retake_at = time.monotonic() + RETAKE

        taken = self.store.take(row_id, count)
        if taken is not None:
            taken.add_done_callback(done)

    def _retake(self) -> None:
        untaken, self._untaken = self._untaken, {}
        for row_id, count in untaken.items():
            self._take(row_id, count)

    def _flush_of(self, partition: int) -> Flush:
        f = self._flushes.get(partition)
        if f is None:
            f = self._flushes[partition] = Flush(self._modes, partial(self._cached, partition))
        return f

    def _deliver(self, env: Envelope, source: Source, account: str) -> None:
        key = (source.id, account, self._partition)
        actor = self._live.get(key)
        if actor is None or not actor.mail:
            # first mail of this record: to the end of the registry, most recently used
            if actor is None:
                actor = self._activate(source, account)
            else:
                del self._live[key]
                self._live[key] = actor
                actor.last = self._clock
            self._ready.append(actor)
        actor.mail.append(env)

    def _counted(
        self, source: Source, prefix: bytes, known: dict[str, str | None], messages: list[Any]
    ) -> list[int] | None:
        """The record's ledger hits taken in C, as `_deliver` and the actors' `_take` would
        (`gateway.actors.fast`); None where it was not built, or when it took none."""
        if self._compiled is None:
            return None
        return self._compiled(messages, prefix, known, source.id, self._partition, self._live,
                              self._holding, self._clock, partial(self._activate, source))

    def _activate(self, source: Source, account: str) -> Actor:
        """An actor for the account that has none live, at the end of the registry (the C
        take's `_deliver` when the account's actor is not live)."""
        actor = self._spare.pop().become(source, account) if self._spare else Actor(
            source, account
        )
        actor.partition = self._partition
        actor.last = self._clock
        self._live[(source.id, account, self._partition)] = actor
        return actor

    async def _commit(self) -> None:
        """End the turn: its state leaves the actors and commits in the background while
        the next turn is read. Turns land in order: this waits for the one before."""
        await self._landed()
        if not self._pending:
            return
        for actor in self._holding:
            self._flush_of(actor.partition).add(actor)
            actor.reset()
        self._holding.clear()
        flushes, self._flushes = self._flushes, {}
        self._started = None
        self._landing_messages, self._pending = self._pending, 0
        self._landing = asyncio.create_task(self._land(flushes), name="turn")

    async def _landed(self) -> None:
        if self._landing is not None:
            await self._landing
            self._landing = None

    async def _land(self, flushes: dict[int, Flush]) -> None:
        """Commit the turn, a transaction per partition (one in SQLite mode)."""
        async with self._turn:
            outcomes = await asyncio.gather(*(self._land_one(p, f) for p, f in flushes.items()))
        self._landing_messages = 0
        live = self._live
        for (p, f), outcome in zip(flushes.items(), outcomes, strict=True):
            if outcome is None:
                continue
            # a row per ledger key the turn counted: with many accounts, about one an event
            remembered = 0
            for row in outcome.rows:
                key = row.key
                if (actor := live.get((key.source, key.account, p))) is not None:
                    ledger = actor.ledger
                    if key not in ledger:
                        remembered += 1
                    ledger[key] = row
            self._remembered += remembered
            self._report(f, outcome)
        if self._remembered > LEDGER_CACHE:
            # the rows of past days, mostly: forget them all (one turn fetches what is
            # still wanted) rather than track which are old
            for actor in live.values():
                actor.ledger.clear()
            self._remembered = 0
        self._passivate()
        self._wake.set()

    async def _land_one(self, partition: int, f: Flush) -> Outcome | None:
        """Commit `f`; when the store refuses it, try again after a pause (the inbox still
        holds every message of it, and nothing later commits before it). None: the
        partition is no longer this gateway's, and its new owner applies these messages."""
        refused = 0  # tries in a row the store refused
        while True:
            if self._disk_full():
                # the space the reserve freed is for outcomes and deletions: hold the turn
                # (the inbox has it too) until the folder has room again
                await asyncio.sleep(RETRY)
                continue
            try:
                outcome = await self.store.transact(lambda tx: commit(f, tx), partition=partition)
                break
            except PartitionLost:
                log.warning("turn dropped: partition lost", partition=partition,
                            messages=f.messages)
                self._forget_partition(partition)
                return None
            except Exception as exc:
                # one line per run of refusals; a full disk is reported once, by `Disk`
                if refused == 0 and not out_of_space(exc):
                    log.exception("turn commit failed; trying again", messages=f.messages)
                refused += 1
                await asyncio.sleep(RETRY)
        if refused:
            log.info("turn committed after refusals", messages=f.messages, refused=refused)
        return outcome

    def _forget_partition(self, partition: int) -> None:
        for actor in self._live.values():
            if actor.partition == partition:
                actor.ledger.clear()

    def forget(self) -> None:
        """This gateway's partitions changed: what the actors and the router remember of the
        store (ledger rows, users' accounts) may have been changed by another gateway."""
        for actor in self._live.values():
            actor.ledger.clear()
        self._remembered = 0
        self.router.forget()

    async def prune(self, before: float) -> int:
        """Forget what is older than `before` (dedupe keys, ledger rows), in the store and
        in the actors' memory of it."""
        async with self._turn:
            for actor in self._live.values():
                actor.ledger.clear()
            self._remembered = 0
            return await self.store.prune(before)

    def _cached(self, partition: int, key: LedgerKey) -> Row | None:
        actor = self._live.get((key.source, key.account, partition))
        return None if actor is None else actor.ledger.get(key)

    def _report(self, f: Flush, outcome: Outcome) -> None:
        m = self.metrics
        for src, n in outcome.duplicates.items():
            m.deduplicated.labels(src).inc(n)
        for (src, kind), n in outcome.suppressed.items():
            m.coalesced.labels(src, kind).inc(n)
        for letter in outcome.dead:
            m.dead_letters.labels(letter.source, letter.stage).inc()
        if outcome.dead:
            first = outcome.dead[0]
            log.warning(
                "messages not forwardable", source_id=first.source, account=first.account,
                count=len(outcome.dead), reason=first.reason,
            )
        self.backlog.applied(f.messages, sum(outcome.calls.values()))
        for src in outcome.calls:
            self._on_calls(src)

    def _passivate(self) -> None:
        """Drop the actors idle for `actor_idle` (or the oldest, past `max_actors`) that hold
        nothing."""
        s = self.settings
        idle_before = time.monotonic() - s.actor_idle
        crowded = len(self._live) - s.max_actors * 3 // 4
        live, spare = self._live, self._spare
        # the oldest first, collected before any goes: a copy of every key (thousands, with
        # many accounts) at each call cost more than the few that go
        going: list[tuple[str, str, int]] = []
        for key, actor in live.items():
            if actor.held or actor.mail:
                break
            if actor.last > idle_before and crowded <= 0:
                break
            going.append(key)
            crowded -= 1
        for key in going:
            actor = live.pop(key)
            if len(spare) < SPARE:
                spare.append(actor)
        self.metrics.active_actors.set(len(live))
