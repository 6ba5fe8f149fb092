"""The grammar of every key the pipeline stores, in one place.

- Dedupe keys: a 16-byte BLAKE2b of (source, message id). Fixed size whatever the id, and
  128 bits make a collision between two real messages of one window as likely as a disk
  error (about 1 in 10^19 after 10^9 messages): dedupe stays exact in practice, with no
  probabilistic structure that could drop an event.
- Outbox keys: one pending call per key. A ledger row's key names (day, user, account,
  event); an identify's the user; a group's the (group, user) pair; a replayed dead letter
  its id. JSON, not a separator, wherever ids may hold any character.
- Dead-letter keys: a letter with a key is kept once, however often its message is routed
  (an inbox record routed again after a crash); the key is a dedupe key.
- Ids generated for messages that came without one.
"""

from __future__ import annotations

import hashlib

import msgspec

DEDUPE_BYTES = 16

_encode = msgspec.json.encode


def dedupe_prefix(source: str) -> bytes:
    """What every dedupe key of `source` starts from: its length makes the pair unambiguous."""
    raw = source.encode()
    return len(raw).to_bytes(4, "big") + raw


def dedupe_key(prefix: bytes, message_id: str) -> bytes:
    """The dedupe key of a message of the source whose `dedupe_prefix` is `prefix`."""
    return hashlib.blake2b(prefix + message_id.encode(), digest_size=DEDUPE_BYTES).digest()


class DedupeKeys:
    """`dedupe_key(prefix, id)` for one source, once per message: the hash state after the
    prefix is kept and copied, since building a BLAKE2b (its keyword arguments parsed) costs
    more than hashing a message id."""

    __slots__ = ("_prefixed",)

    def __init__(self, prefix: bytes) -> None:
        self._prefixed = hashlib.blake2b(prefix, digest_size=DEDUPE_BYTES)

    def __call__(self, message_id: str) -> bytes:
        h = self._prefixed.copy()
        h.update(message_id.encode())
        return h.digest()


def generated_message_id(record: int, received_at: float, index: int) -> str:
    """The id of the message at `index` of inbox record `record` that came without one: the
    same each time the record is routed, and never the id of another message (record ids
    start again with a new inbox while the dedupe keys in gateway.db remain)."""
    return f"gw-{record}-{received_at!r}-{index}"


def rejected_id(record: int, received_at: float, index: int) -> str:
    """The dedupe id of a message ingest rejected (a dead letter kept once per record)."""
    return f"dl\x1f{record}\x1f{received_at!r}\x1f{index}"


def ledger_key(day: str, user: str, account: str, event: str) -> str:
    return "t" + _encode([day, user, account, event]).decode()


def identify_key(user: str) -> str:
    return f"i\x1f{user}"


def group_key(group: str, user: str | None) -> str:
    return "g" + _encode([group, user or ""]).decode()


def replay_key(letter_id: int) -> str:
    return f"r\x1f{letter_id}"
