"""The router: turns an inbox record into messages for their accounts' actors.

When ingest runs in the same process it hands over what it already decoded (so the common
case decodes once); otherwise (ingest in another process, after a restart, or when ingest
runs far ahead) the router decodes the stored body, building only what apply reads
(`decode_stored`). A record holds the request's invalid messages too: the router keeps them
as dead letters, with the reason ingest gave.

The account of a message (DESIGN 4) is its groupId (group calls) or `context.groupId`;
else the account last seen for that user in a group call; else the user itself.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gateway.actors.envelope import Envelope
from gateway.actors.fast import user_ids
from gateway.config import Source
from gateway.keys import DedupeKeys, dedupe_prefix, generated_message_id, rejected_id
from gateway.segment import (
    AnyMessage,
    Context,
    Decoded,
    GroupCall,
    InvalidBody,
    Stored,
    anonymous_id,
    context_group,
    decode_stored,
    effective_timestamp,
    in_full,
    merged,
    merged_context,
)
from gateway.store import DeadLetter, InboxRow

if TYPE_CHECKING:
    from gateway.store.base import ActorState

log = structlog.get_logger("gateway.actors")

HANDOFF = 64  # decoded requests kept in memory for the router; past it, it decodes again
USERS = 200_000  # user -> account entries remembered, per source

Deliver = Callable[[Envelope, Source, str], None]
# the dispatcher's compiled take (`gateway.actors.fast`): a record's ledger hits taken into
# their actors, given (source, dedupe prefix, users' known accounts, messages); the positions
# of the messages left to `deliver`, or None when it took none
TakeCounted = Callable[[Source, bytes, dict[str, str | None], list[Any]], list[int] | None]
_CONTEXT = operator.attrgetter("context")


class StoreFailed(Exception):
    """Reading the store failed while routing a record: the store's fault, not the record's,
    so the record is not kept as a dead letter (the dispatcher leaves it pending)."""


class Router:
    def __init__(self, state: ActorState, sources: dict[str, Source]) -> None:
        self.state = state
        self.sources = sources
        self._prefixes = {sid: dedupe_prefix(sid) for sid in sources}
        self._keys = {sid: DedupeKeys(prefix) for sid, prefix in self._prefixes.items()}
        self._handoff: dict[int, Decoded | Stored] = {}
        self._row_users: dict[int, list[str | None]] = {}  # each message's user, from `prepare`
        # a row of several records: each one's (decoded, users) from `prepare`, None where
        # it could not be read
        self._records: dict[int, list[tuple[Stored, list[str | None]] | None]] = {}
        # per source, user -> the account a group call put them in (None: none), least
        # recently learnt first
        self._users: dict[str, dict[str, str | None]] = {}

    def submitted(self, row_id: int, decoded: Decoded) -> bool:
        """Ingest committed a request as inbox row `row_id`; False when not kept."""
        if len(self._handoff) >= HANDOFF:
            return False
        self._handoff[row_id] = decoded
        return True

    async def prepare(self, rows: list[InboxRow]) -> None:
        """Decode `rows` ahead of routing them, and load the accounts of their new users in
        one read per source rather than one per row (a partitioned store's rows are small:
        the parts of requests that fell in one partition)."""
        users: dict[str, set[str | None]] = {}
        for row in rows:
            if not row.count or row.id in self._handoff or row.source not in self.sources:
                continue
            wanted = users.setdefault(row.source, set())
            if row.records is None:
                found = _prepared(row.body, wanted)
                if found is not None:
                    self._handoff[row.id], self._row_users[row.id] = found
            else:
                self._records[row.id] = [_prepared(body, wanted) for _, _, body in row.records]
        for source, wanted in users.items():
            if wanted:
                await self._learn(source, self._users.setdefault(source, {}), list(wanted))

    async def route(
        self, row: InboxRow, deliver: Deliver, take: TakeCounted | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[DeadLetter]:
        """Hand each message of `row` to `deliver` (its ledger hits to `take` first, when
        given and it takes them); the dead letters of those that cannot be taken (rejected by
        ingest, replayed dead letters still invalid, unreadable). A row of several records
        routes them in order, `between` called between two (the messages delivered so far
        are worked before the next record's are taken, as if each were a row)."""
        if row.records is None:
            return await self._routed(
                row, row.received_at, row.body, self._handoff.pop(row.id, None),
                self._row_users.pop(row.id, None), deliver, take, 0, 0)
        prepared = self._records.pop(row.id, None)
        dead: list[DeadLetter] = []
        first = 0  # the record's first message's index in the row: ids stay unique in it
        for i, (received_at, count, body) in enumerate(row.records):
            if i and between is not None:
                between()
            ready = prepared[i] if prepared is not None else None
            decoded, users = ready if ready is not None else (None, None)
            dead += await self._routed(
                row, received_at, body, decoded, users, deliver, take, first, len(dead), i)
            first += count
        return dead

    async def _routed(
        self, row: InboxRow, received_at: float, body: bytes,
        decoded: Decoded | Stored | None, users: list[str | None] | None,
        deliver: Deliver, take: TakeCounted | None, first: int, dead_at: int, record: int = 0,
    ) -> list[DeadLetter]:
        """`_route`; a record whose routing raises (a poison message: it would fail at every
        routing, and hold the inbox, a Redis partition's cursor, for ever) is kept whole as
        dead letters instead, and counts as applied.

        Its messages handed over before the exception (delivered to an actor's mail, or
        their ledger hits taken in C into an actor's state) stay there: they commit in the
        turn that counts the record as applied, in the same transaction (one partition's, in
        Redis: a row is in one), so a crash before it leaves the whole record pending and
        after it leaves nothing pending. A replay re-ingests every message of the record,
        and those applied are dropped by dedupe (within `dedupe_window`), the others applied
        once: a letter keeps the id the message was routed under, `generated_message_id`'s
        where it came without one, or its replay would be a new message."""
        try:
            return await self._route(
                row, received_at, body, decoded, users, deliver, take, first, dead_at)
        except StoreFailed:
            raise
        except Exception as exc:
            # the type only: an exception's text may quote the payload
            reason = f"routing failed: {type(exc).__name__}"
            log.exception(reason, source_id=row.source, inbox_id=row.id, record=record)
            return self._dead(row, received_at, dead_at,
                              _unroutable(row, received_at, body, decoded, first, reason))

    async def _route(
        self, row: InboxRow, received_at: float, body: bytes,
        decoded: Decoded | Stored | None, users: list[str | None] | None,
        deliver: Deliver, take: TakeCounted | None, first: int, dead_at: int,
    ) -> list[DeadLetter]:
        """One record of `row`: its messages numbered from `first` in the row, its dead
        letters from `dead_at` (a row of one record: both 0)."""
        source = self.sources.get(row.source)
        if decoded is None:
            try:
                decoded = decode_stored(body)
            except InvalidBody as exc:
                return self._dead(row, received_at, dead_at, [
                    (body, f"stored body unreadable: {exc.reason}", False)])
        # the same reason repeated is one letter with a count: these messages are at fault
        invalid = [(r.raw, r.reason, True) for r in decoded.rejected]
        if source is None:
            # each kept: they are fine, and a replay after the source is back forwards them
            return self._dead(row, received_at, dead_at, _letters(
                body, decoded, "source is no longer configured"))
        received = datetime.fromtimestamp(received_at, UTC)
        messages: Sequence[AnyMessage] = decoded.messages
        if users is None:
            users = user_ids(messages)
        if None in users and isinstance(decoded, Stored):
            # only a message without a userId can become a mapping dead letter (the mapping
            # forwards any other): it is read in full, as the dead letter keeps it
            messages = list(messages)
            anonymous = [i for i, user in enumerate(users) if user is None]
            for i, full in zip(anonymous, _in_full(body, decoded, anonymous), strict=True):
                messages[i] = full
        known = self._users.setdefault(source.id, {})
        try:
            await self._learn(source.id, known, users)
        except Exception as exc:
            raise StoreFailed(type(exc).__name__) from exc
        batch_integrations = decoded.integrations
        left: Sequence[int] | None = None
        if (take is not None and isinstance(decoded, Stored) and decoded.context is None
                and batch_integrations is None):
            # a message's own context and integrations are all there is: the common record
            left = take(source, self._prefixes[source.id], known, list(messages))
            if left is not None and not left:
                return self._dead(row, received_at, dead_at, invalid)
        if left is None:
            left = range(len(messages))
        key_of = self._keys[source.id]
        contexts = _contexts(decoded)
        sent_at = decoded.sent_at
        for index in left:
            msg, user, context = messages[index], users[index], contexts[index]
            # most batches carry no integrations of their own: no call then
            integrations = (msg.integrations if batch_integrations is None
                            else merged(batch_integrations, msg.integrations))
            mid = msg.messageId or generated_message_id(row.id, received_at, first + index)
            at = msg.timestamp
            if at is None or at.tzinfo is not UTC:  # else it is the effective timestamp
                at = effective_timestamp(msg, sent_at, received)
            env = Envelope(key_of(mid), msg, at, context, integrations, user)
            deliver(env, source, self._account(known, msg, user, context))
        return self._dead(row, received_at, dead_at, invalid)

    def _account(
        self, known: dict[str, str | None], msg: AnyMessage, user: str | None,
        context: dict[str, Any] | Context | None,
    ) -> str:
        if isinstance(msg, GroupCall):
            group = str(msg.groupId)
            if user is not None:
                _remember(known, user, group)
            return group
        group_id = context_group(context)
        if group_id is not None:
            return group_id
        if user is not None:
            return known.get(user) or user
        return anonymous_id(msg) or ""

    async def _learn(
        self, source: str, known: dict[str, str | None], users: list[str | None]
    ) -> None:
        """Load the accounts of users the router has not seen yet."""
        # in C, once per record; `difference`, not `difference_update`, which would walk
        # every user known instead of the record's
        unknown = set(users).difference(known)
        missing = sorted(u for u in unknown if u is not None)
        if not missing:
            return
        found = await self.state.accounts_of(source, missing)
        for user in missing:
            _remember(known, user, found.get(user))

    def forget(self) -> None:
        """Load users' accounts from the store again (another gateway may have changed them)."""
        self._users.clear()

    def _dead(
        self, row: InboxRow, received_at: float, start: int, items: list[tuple[bytes, str, bool]]
    ) -> list[DeadLetter]:
        """`items` (payload, reason, grouped: see `DeadLetter.grouped`) as dead letters,
        numbered in the row from `start`."""
        if not items:
            return []
        key_of = self._keys.get(row.source) or DedupeKeys(dedupe_prefix(row.source))
        return [
            DeadLetter(source=row.source, stage="ingest", reason=reason, payload=payload,
                       key=key_of(rejected_id(row.id, received_at, start + i)),
                       grouped=grouped)
            for i, (payload, reason, grouped) in enumerate(items)
        ]


def _unroutable(
    row: InboxRow, received_at: float, body: bytes, decoded: Decoded | Stored | None,
    first: int, reason: str,
) -> list[tuple[bytes, str, bool]]:
    """The dead letters (as `Router._dead` takes them) of a record whose routing failed with
    `reason`: each message as the router's other letters keep it, with the id it was routed
    under; those ingest rejected with their own reason. The stored body whole when even
    reading it fails."""
    try:
        if decoded is None:
            decoded = decode_stored(body)
        return _letters(body, decoded, reason, lambda i, msg: msg if msg.messageId else (
            msgspec.structs.replace(
                msg, messageId=generated_message_id(row.id, received_at, first + i))))
    except Exception:
        return [(body, reason, False)]


def _letters(
    body: bytes, decoded: Decoded | Stored, reason: str,
    named: Callable[[int, AnyMessage], AnyMessage] | None = None,
) -> list[tuple[bytes, str, bool]]:
    """Every message of a record kept as a letter with `reason` (as `named(index, message)`
    gives it, when given), then those ingest rejected, with their own reasons (grouped)."""
    messages = _in_full(body, decoded, range(len(decoded.messages)))
    kept = [(msgspec.json.encode(msg if named is None else named(i, msg)), reason, False)
            for i, msg in enumerate(messages)]
    return kept + [(r.raw, r.reason, True) for r in decoded.rejected]


def _contexts(decoded: Decoded | Stored) -> Sequence[dict[str, Any] | Context | None]:
    """Each message's context, the batch's merged under it (most batches carry none)."""
    if decoded.context is None:
        return list(map(_CONTEXT, decoded.messages))  # in C
    if isinstance(decoded, Stored):
        return [merged_context(decoded.context, m.context) for m in decoded.messages]
    return [merged(decoded.context, m.context) for m in decoded.messages]


def _in_full(
    body: bytes, decoded: Decoded | Stored, positions: Sequence[int]
) -> list[AnyMessage]:
    """The messages at `positions` as `decode_batch` models them (what a dead letter keeps)."""
    if isinstance(decoded, Decoded):
        return [decoded.messages[i] for i in positions]
    return in_full(body, decoded, positions)


def _prepared(
    body: bytes, users: set[str | None]
) -> tuple[Stored, list[str | None]] | None:
    """A record's body decoded and its messages' users (added to `users`); None when it
    cannot be read (`route` keeps it as a dead letter)."""
    try:
        decoded = decode_stored(body)
    except Exception:  # `route` keeps it as a dead letter, with the reason
        return None
    found = user_ids(decoded.messages)
    users.update(found)
    return decoded, found


def _remember(known: dict[str, str | None], user: str, account: str | None) -> None:
    known.pop(user, None)
    known[user] = account
    if len(known) > USERS:
        del known[next(iter(known))]
