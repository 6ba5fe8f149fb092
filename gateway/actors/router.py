"""The router: turns an inbox record into messages for their accounts' actors.

When ingest runs in the same process it hands over what it already decoded (so the common
case decodes once); otherwise (ingest in another process, after a restart, or when ingest
runs far ahead) the router decodes the stored body. A record holds the request's invalid
messages too: the router keeps them as dead letters, with the reason ingest gave.

The account of a message (DESIGN 4) is its groupId (group calls) or `context.groupId`;
else the account last seen for that user in a group call; else the user itself.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.actors.actor import Envelope
from gateway.config import Source
from gateway.keys import dedupe_key, dedupe_prefix, generated_message_id, rejected_id
from gateway.segment import (
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
from gateway.store import DeadLetter, InboxRow

if TYPE_CHECKING:
    from gateway.store.base import ActorState

HANDOFF = 64  # decoded requests kept in memory for the router; past it, it decodes again
USERS = 200_000  # user -> account entries remembered

Deliver = Callable[[Envelope, Source, str], None]


class Router:
    def __init__(self, state: ActorState, sources: dict[str, Source]) -> None:
        self.state = state
        self.sources = sources
        self._prefixes = {sid: dedupe_prefix(sid) for sid in sources}
        self._handoff: dict[int, Decoded] = {}
        self._users: dict[tuple[str, str], str | None] = {}

    def submitted(self, row_id: int, decoded: Decoded) -> bool:
        """Ingest committed a request as inbox row `row_id`; False when not kept."""
        if len(self._handoff) >= HANDOFF:
            return False
        self._handoff[row_id] = decoded
        return True

    async def prepare(self, rows: list[InboxRow]) -> None:
        """Decode `rows` ahead of routing them, and load the accounts of their new users in
        one read per source rather than one per row (a partitioned store's rows are small:
        the part of a request that fell in one partition)."""
        users: dict[str, set[str]] = {}
        for row in rows:
            if not row.count or row.id in self._handoff or row.source not in self.sources:
                continue
            try:
                decoded = decode_batch(row.body)
            except InvalidBody:
                continue  # `route` keeps it as a dead letter
            self._handoff[row.id] = decoded
            found = users.setdefault(row.source, set())
            found.update(u for m in decoded.messages if (u := user_id(m)) is not None)
        for source, wanted in users.items():
            await self._learn(source, list(wanted))

    async def route(self, row: InboxRow, deliver: Deliver) -> list[DeadLetter]:
        """Hand each message of `row` to `deliver`; the dead letters of those that cannot be
        taken (rejected by ingest, replayed dead letters still invalid, unreadable)."""
        source = self.sources.get(row.source)
        decoded = self._handoff.pop(row.id, None)
        if decoded is None:
            try:
                decoded = decode_batch(row.body)
            except InvalidBody as exc:
                return self._dead(row, [(row.body, f"stored body unreadable: {exc.reason}", False)])
        # the same reason repeated is one letter with a count: these messages are at fault
        invalid = [(r.raw, r.reason, True) for r in decoded.rejected]
        if source is None:
            # each kept: they are fine, and a replay after the source is back forwards them
            gone = [(msgspec.json.encode(m), "source is no longer configured", False)
                    for m in decoded.messages]
            return self._dead(row, gone + invalid)
        received = datetime.fromtimestamp(row.received_at, UTC)
        messages = decoded.messages
        users = [user_id(m) for m in messages]
        await self._learn(source.id, users)
        prefix = self._prefixes[source.id]
        batch_context, batch_integrations = decoded.context, decoded.integrations
        sent_at = decoded.sent_at
        for index, (msg, user) in enumerate(zip(messages, users, strict=True)):
            context = merged(batch_context, msg.context)
            mid = msg.messageId or generated_message_id(row.id, row.received_at, index)
            env = Envelope(
                dedupe_key(prefix, mid), msg, effective_timestamp(msg, sent_at, received), context,
                merged(batch_integrations, msg.integrations),
            )
            deliver(env, source, self._account(source.id, msg, user, context))
        return self._dead(row, invalid)

    def _account(
        self, source: str, msg: Message, user: str | None, context: dict[str, Any] | None
    ) -> str:
        if isinstance(msg, Group):
            group = str(msg.groupId)
            if user is not None:
                self._remember((source, user), group)
            return group
        if context is not None:
            group_id = context.get("groupId")
            if isinstance(group_id, (str, int)) and not isinstance(group_id, bool) and group_id != "":
                return str(group_id)
        if user is not None:
            return self._users.get((source, user)) or user
        return anonymous_id(msg) or ""

    async def _learn(self, source: str, users: list[str | None]) -> None:
        """Load the accounts of users the router has not seen yet."""
        known = self._users
        missing = {u for u in users if u is not None and (source, u) not in known}
        if not missing:
            return
        found = await self.state.accounts_of(source, sorted(missing))
        for user in missing:
            self._remember((source, user), found.get(user))

    def forget(self) -> None:
        """Load users' accounts from the store again (another gateway may have changed them)."""
        self._users.clear()

    def _remember(self, key: tuple[str, str], account: str | None) -> None:
        self._users.pop(key, None)
        self._users[key] = account
        if len(self._users) > USERS:
            del self._users[next(iter(self._users))]

    def _dead(self, row: InboxRow, items: list[tuple[bytes, str, bool]]) -> list[DeadLetter]:
        """`items` (payload, reason, grouped: see `DeadLetter.grouped`) as dead letters."""
        prefix = self._prefixes.get(row.source) or dedupe_prefix(row.source)
        return [
            DeadLetter(source=row.source, stage="ingest", reason=reason, payload=payload,
                       key=dedupe_key(prefix, rejected_id(row.id, row.received_at, i)),
                       grouped=grouped)
            for i, (payload, reason, grouped) in enumerate(items)
        ]
