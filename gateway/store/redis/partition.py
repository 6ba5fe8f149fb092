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
from typing import Any

import msgspec

from gateway.ingest.messages import id_str

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


def lease_key(partition: int) -> str:
    """Who owns the partition now: the owner's id, with a TTL."""
    return f"{{p{partition}}}:lease"


def epoch_key(partition: int) -> str:
    """The partition's fencing epoch: raised at each new lease, never expires."""
    return f"{{p{partition}}}:epoch"


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


def split(source: str, body: bytes, partitions: int) -> dict[int, tuple[bytes, int]]:
    """A stored batch body as one body per partition, with how many messages each holds.

    Order within a partition is kept; the batch's context, integrations and sentAt go with
    every part. A body whose messages all fall in one partition is returned as it is.
    """
    ids = _IDS.decode(body).batch
    where = _partitions(ids, _seed(source), partitions)
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
