"""Partitions: which user's messages go where, and the names of a partition's Redis keys.

A message's partition key is (source, userId, else anonymousId), hashed with CRC-32 (stable
across processes, versions and machines, unlike Python's `hash()`, which is salted per
process) into P partitions. All of a user's state lives in that user's partition, and every
key of partition n starts with the hash tag `{p<n>}`: on a Redis Cluster, Redis hashes only
the tag, so all of a partition's keys sit in one slot and one Lua script can change them
atomically.

A message with neither userId nor anonymousId is invalid (ingest rejects it and the router
keeps it as a dead letter): it has no user state to sit beside, so it goes to partition 0,
a fixed place where its dead letter is made like any other.

Splitting is pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.compiled import load
from gateway.segment import InvalidBody, id_str

NO_USER_PARTITION = 0

# Deployment-wide keys, apart from any partition; one slot of their own (`{gw}`)
MEMBERS_KEY = "{gw}:members"  # live gateways, scored by when their heartbeat expires
PARTITIONS_KEY = "{gw}:partitions"  # the partition count, fixed at the first start


def partition_of(source: str, user: str | None, partitions: int) -> int:
    """The partition of a user of a source; `user` is the userId, else the anonymousId."""
    if user is None:
        return NO_USER_PARTITION
    return zlib.crc32(user.encode(), _seed(source)) % partitions


def _seed(source: str) -> int:
    # crc32 is incremental: crc32(user, crc32(source + NUL)) == crc32(source + NUL + user),
    # so a batch hashes its source once
    return zlib.crc32(source.encode() + b"\x00")


def tag(partition: int) -> str:
    return f"{{p{partition}}}"


def inbox_key(partition: int) -> str:
    """The partition's inbox: a stream of request parts, applied in order by its owner."""
    return f"{{p{partition}}}:inbox"


def progress_key(partition: int) -> str:
    """The id of the last inbox entry applied (the committed cursor)."""
    return f"{{p{partition}}}:progress"


def waiting_key(partition: int) -> str:
    """Messages in the partition's inbox not yet applied: ingest adds each part's count
    beside its XADD, the commit takes away what it trims (so counting is O(1))."""
    return f"{{p{partition}}}:waiting"


def lease_key(partition: int) -> str:
    """Who owns the partition now: the owner's id, with a TTL."""
    return f"{{p{partition}}}:lease"


def epoch_key(partition: int) -> str:
    """The partition's fencing epoch: raised at each new lease, never expires."""
    return f"{{p{partition}}}:epoch"


# The apply path's state (one key per role and partition; a day's dedupe keys and ledger
# counts in a key of their own, so that pruning drops a day whole)


def dedupe_day_key(partition: int, day: str) -> str:
    """Dedupe keys (`gateway.keys`, 16 bytes) stored on a UTC day (YYYYMMDD): a set."""
    return f"{{p{partition}}}:dd:{day}"


def dedupe_days_key(partition: int) -> str:
    """The days that have a dedupe set: a set."""
    return f"{{p{partition}}}:dd"


def ledger_counts_key(partition: int, day: str) -> str:
    """A UTC day's ledger counts (YYYY-MM-DD): a hash, packed (source, user, account,
    event) -> count."""
    return f"{{p{partition}}}:lc:{day}"


def ledger_stamps_key(partition: int, day: str) -> str:
    """A UTC day's ledger rows' latest timestamps: a hash, as `ledger_counts_key`."""
    return f"{{p{partition}}}:lt:{day}"


def ledger_days_key(partition: int) -> str:
    """The ledger's days, scored by when a row of the day was last written: a sorted set."""
    return f"{{p{partition}}}:ld"


def known_key(partition: int) -> str:
    """Traits already queued per (source, call key), with their day: a hash."""
    return f"{{p{partition}}}:known"


def accounts_key(partition: int) -> str:
    """(source, user) -> the account a group call put the user in: a hash."""
    return f"{{p{partition}}}:acct"


def outbox_key(partition: int, part: str) -> str:
    """One field per outbox item id, one hash per part of the items: `meta` (source, key,
    account, kind: never changed), `path`, `body`, `n` (repeat), `v` (version), `a`
    (attempts), `err` (last error); `keys` maps (source, key) to the item's id."""
    return f"{{p{partition}}}:ob:{part}"


def due_key(partition: int, source: str) -> str:
    """A source's outbox items by when they are due: a sorted set of ids."""
    return f"{{p{partition}}}:due:{source}"


def dead_key(partition: int, part: str) -> str:
    """Dead letters, one field per id, one hash per part: `meta` (never changed), `body`,
    `n` (repeat), `last` (last occurrence), `replayed`; `groups` maps a grouped reason to
    its open letter."""
    return f"{{p{partition}}}:dl:{part}"


def once_key(partition: int, token: str) -> str:
    """A script run recorded for a while (`scripts.ONCE_TTL`): the same run sent again (its
    reply lost with a dropped connection, the client resending) changes nothing twice."""
    return f"{{p{partition}}}:once:{token}"


def seq_key(partition: int) -> str:
    """The partition's counter for outbox and dead-letter ids."""
    return f"{{p{partition}}}:seq"


# Ids of outbox items and dead letters name their partition in their low bits, so that any
# gateway finds an id's partition (admin, replay); the counter is the partition's own
ID_BITS = 14  # partitions are at most 2**14 (`Settings.partitions`)


def id_partition(item_id: int) -> int:
    return item_id & ((1 << ID_BITS) - 1)


# The parts of a stored batch body (`Decoded.body`): the messages kept raw, the batch-level
# fields passed on as they are, so a part decodes exactly as the whole would.
class _Body(msgspec.Struct, kw_only=True, omit_defaults=True):
    batch: list[msgspec.Raw]
    context: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    integrations: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    sentAt: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Ids(msgspec.Struct, gc=False):
    # Any: an invalid message may carry any JSON here, and must still find its partition
    userId: Any = None
    anonymousId: Any = None


class _IdsBatch(msgspec.Struct, gc=False):
    batch: list[_Ids]


_BODY = msgspec.json.Decoder(_Body)
_IDS = msgspec.json.Decoder(_IdsBatch)
_ID = msgspec.json.Decoder(_Ids)
_ENCODE = msgspec.json.Encoder().encode


def user_of(ids: _Ids) -> str | None:
    return id_str(ids.userId) or id_str(ids.anonymousId)


def _partitions(ids: list[_Ids], seed: int, partitions: int) -> list[int]:
    """Each message's partition. On the request path: the common case (a non-empty string
    userId) takes no call but the hash."""
    crc32 = zlib.crc32
    out: list[int] = []
    append = out.append
    for m in ids:
        user = m.userId
        if user.__class__ is not str or not user:
            user = user_of(m)
            if user is None:
                append(NO_USER_PARTITION)
                continue
        append(crc32(user.encode(), seed) % partitions)
    return out


def _ids(body: bytes) -> list[_Ids]:
    """Each message's ids; none for a message that is not an object or whose ids msgspec
    cannot read (a number out of range: 1e400), which ingest rejected."""
    try:
        return _IDS.decode(body).batch
    except msgspec.ValidationError:
        return [_ids_of(raw) for raw in _BODY.decode(body).batch]


def _ids_of(raw: msgspec.Raw) -> _Ids:
    try:
        return _ID.decode(raw)
    except msgspec.ValidationError:
        return _Ids()


Parts = dict[int, tuple[bytes, int]]


_check = load("_check")
# gateway/_check.c's `split`, or None where it was not built; `split` makes the same parts
# either way
_fast_split: Callable[[bytes, int, int], Parts | None] | None = (
    None if _check is None else _check.split
)


def split(source: str, body: bytes, partitions: int) -> Parts:
    """A stored batch body as one body per partition, with how many messages each holds.

    Order within a partition is kept; the batch's context, integrations and sentAt go with
    every part. A body whose messages all fall in one partition is returned as it is.

    The compiled split (gateway/_check.c) slices the parts out of the body in one pass; it
    takes only a body it splits byte for byte as `_split` does, and leaves the rest (escapes
    in ids or keys, float ids, fields given twice: rare) to `_split`.

    Raises `InvalidBody` (a 400, not a store failure) for a body nested too deeply to read
    here: msgspec's depth limit is Python's recursion limit less the frames already on the
    stack, and this runs a few frames deeper than ingest's check, which read the body.
    """
    if _fast_split is not None:
        parts = _fast_split(body, _seed(source), partitions)
        if parts is not None:
            return parts
    try:
        return _split(source, body, partitions)
    except RecursionError:
        raise InvalidBody("body is nested too deeply") from None


def _split(source: str, body: bytes, partitions: int) -> Parts:
    where = _partitions(_ids(body), _seed(source), partitions)
    first = where[0] if where else NO_USER_PARTITION
    if all(p == first for p in where):
        return {first: (body, len(where))}
    whole = _BODY.decode(body)
    parts: dict[int, list[msgspec.Raw]] = {}
    for p, raw in zip(where, whole.batch, strict=True):
        parts.setdefault(p, []).append(raw)
    return {
        p: (_ENCODE(_Body(batch=raws, context=whole.context,
                          integrations=whole.integrations, sentAt=whole.sentAt)), len(raws))
        for p, raws in parts.items()
    }
