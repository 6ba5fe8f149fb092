"""The router: reads the inbox in commit order and hands each message to its account's actor.

When ingest runs in the same process it hands over what it already decoded (so the common
case decodes once); otherwise (ingest in another process, after a restart, or when ingest
runs far ahead) the router decodes the stored body. A row holds the request's invalid
messages too: the router keeps them as dead letters, with the reason ingest gave. The
account of a message is its groupId (group calls) or `context.groupId`; else the account
last seen for that user in a group call; else the user itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.actors.actor import Envelope
from gateway.actors.registry import Actors
from gateway.config import Source
from gateway.ingest.messages import (
    Decoded,
    Group,
    InvalidBody,
    Message,
    anonymous_id,
    decode_batch,
    effective_timestamp,
    merged,
    user_id,
)
from gateway.store import DeadLetter, Flush, InboxRow, Store

if TYPE_CHECKING:
    from gateway.backlog import Backlog
    from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.router")

READ_AHEAD = 64  # inbox rows read at once
# while ingest is busy, the router routes one row per pause: a trickle that keeps actors and
# forwarders moving but leaves most of the CPU to the requests
YIELD = 0.05
HANDOFF = 64  # decoded requests kept in memory for the router; past it, it decodes again
POLL = 0.02  # seconds between looks at an empty inbox (ingest may be another process)
USERS = 200_000  # user -> account entries remembered
RETAKE = 1.0  # seconds between attempts to record takes the store refused


class Router:
    def __init__(
        self,
        store: Store,
        actors: Actors,
        sources: dict[str, Source],
        metrics: Metrics,
        backlog: Backlog,
    ) -> None:
        self.store = store
        self.actors = actors
        self.sources = sources
        self.metrics = metrics
        self.backlog = backlog
        self._handoff: dict[int, Decoded] = {}
        self._wake = asyncio.Event()
        self._users: dict[tuple[str, str], str | None] = {}
        self._stopping = False
        self._untaken: dict[int, int] = {}  # inbox row -> count, takes the store refused
        self._retake_at = 0.0
        self.cursor = 0

    def submitted(self, row_id: int, decoded: Decoded) -> None:
        """Ingest committed a request as inbox row `row_id`."""
        if len(self._handoff) < HANDOFF:
            self._handoff[row_id] = decoded
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Route until stopped, then return once the inbox is drained to the actors.

        The store's inbox must have been restarted (`Store.restart_inbox`) before."""
        while True:
            self._wake.clear()
            if self._untaken and time.monotonic() >= self._retake_at:
                self._retake()
            rows = await self.store.inbox_after(self.cursor, READ_AHEAD)
            if not rows:
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await self._wake.wait()
                continue
            for row in rows:
                if row.count == 0:  # wholly applied before a restart
                    self.cursor = row.id
                    continue
                if self.backlog.ingest_first:
                    # the inbox is durable: while requests arrive, answer them first and route
                    # a row at a time in the gaps (a burst is absorbed, not refused)
                    await asyncio.sleep(YIELD)
                try:
                    await self._route(row)
                except Exception:
                    # leave the row in the inbox: the next start routes it again
                    log.exception("routing failed", source_id=row.source, inbox_id=row.id)
                self.cursor = row.id

    async def _route(self, row: InboxRow) -> None:
        source = self.sources.get(row.source)
        self._take(row.id, row.count)
        decoded = self._handoff.pop(row.id, None)
        if decoded is None:
            try:
                decoded = decode_batch(row.body)
            except InvalidBody as exc:
                reason = f"stored body unreadable: {exc.reason}"
                await self._dead(row, source, [(row.body, reason, False)], row.count)
                return
        # the row's messages that cannot be taken: rejected by ingest, or replayed dead
        # letters that are still invalid
        # the same reason repeated is one letter with a count: these messages are at fault
        invalid = [(r.raw, r.reason, True) for r in decoded.rejected]
        if source is None:
            # each kept: they are fine, and a replay after the source is back forwards them
            gone = [(msgspec.json.encode(m), "source is no longer configured", False)
                    for m in decoded.messages]
            await self._dead(row, None, gone + invalid)
            return
        if invalid:
            await self._dead(row, source, invalid)
        received = datetime.fromtimestamp(row.received_at, UTC)
        await self._learn(source, decoded.messages)
        for index, msg in enumerate(decoded.messages):
            context = merged(decoded.context, msg.context)
            env = Envelope(
                inbox_id=row.id,
                # the same when the record is routed again, and never the id of another
                # message: record ids start again with a new inbox (a deleted or upgraded
                # data directory) while the dedupe keys in gateway.db remain
                message_id=msg.messageId or f"gw-{row.id}-{row.received_at!r}-{index}",
                message=msg,
                timestamp=effective_timestamp(msg, decoded.sent_at, received),
                context=context,
                integrations=merged(decoded.integrations, msg.integrations),
            )
            await self.actors.deliver(env, source, self._account(source, msg, context))

    def _take(self, row_id: int, count: int) -> None:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                # until it is recorded, the row's segment is never deleted; made again later
                # (a take and the row's flushes add up in any order)
                self._untaken[row_id] = count
                self._retake_at = time.monotonic() + RETAKE

        self.store.take(row_id, count).add_done_callback(done)

    def _retake(self) -> None:
        untaken, self._untaken = self._untaken, {}
        for row_id, count in untaken.items():
            self._take(row_id, count)

    def _account(self, source: Source, msg: Message, context: dict[str, Any] | None) -> str:
        user = user_id(msg)
        if isinstance(msg, Group):
            group = str(msg.groupId)
            if user is not None:
                self._remember((source.id, user), group)
            return group
        if context is not None:
            group_id = context.get("groupId")
            if isinstance(group_id, str | int) and not isinstance(group_id, bool) and group_id != "":
                return str(group_id)
        if user is not None:
            return self._users.get((source.id, user)) or user
        return anonymous_id(msg) or ""

    async def _learn(self, source: Source, messages: list[Message]) -> None:
        """Load the accounts of users this batch names that the router has not seen yet."""
        missing = {
            u for m in messages if (u := user_id(m)) is not None and (source.id, u) not in self._users
        }
        if not missing:
            return
        found = await self.store.accounts_of(source.id, sorted(missing))
        for user in missing:
            self._remember((source.id, user), found.get(user))

    def _remember(self, key: tuple[str, str], account: str | None) -> None:
        self._users.pop(key, None)
        self._users[key] = account
        if len(self._users) > USERS:
            del self._users[next(iter(self._users))]

    async def _dead(
        self,
        row: InboxRow,
        source: Source | None,
        items: list[tuple[bytes, str, bool]],
        done: int | None = None,
    ) -> None:
        """Keep `items` (payload, reason, grouped: see `DeadLetter.grouped`) as dead letters."""
        done = len(items) if done is None else done
        src = source.id if source is not None else row.source
        letters = [
            DeadLetter(source=src, stage="ingest", reason=reason, payload=payload,
                       key=f"dl\x1f{row.id}\x1f{row.received_at!r}\x1f{i}", grouped=grouped)
            for i, (payload, reason, grouped) in enumerate(items)
        ]
        await self.store.flush(
            Flush(source=src, account="", track_mode="exact", dead=letters,
                  inbox={row.id: done}, now=time.time())
        )
        for _ in letters:
            self.metrics.dead_letters.labels(src, "ingest").inc()
        self.backlog.applied(done, 0)
