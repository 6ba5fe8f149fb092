"""The Segment message model: the messages' types (Structs, ids, timestamps), and decoding
request bodies into them. Used by ingest, the router and mapping alike.

Decoding is on the request path (DESIGN 8). A well-formed batch costs one
`msgspec` call in C; only a batch that fails validation, or a body large
enough to hold an oversized message, is looked at message by message.
Validation lives in the types, so the fast path and the per-message path
accept exactly the same messages; the one rule a type cannot say (a message
needs userId or anonymousId) is checked after decoding, by both paths.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeAlias, TypeVar, final

import msgspec

from gateway.compiled import load

MAX_BATCH = 2500
MAX_MESSAGE_BYTES = 32 * 1024
MAX_MESSAGE_ID = 200

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
MessageId = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_ID)]

# `in` compares with ==, so the integer id 0 is present and "" is missing.
_MISSING = (None, "")


# gc=False: decoded from JSON, a message holds only plain data and can never be part of a
# reference cycle, so the cyclic collector need not track the many each request makes
class _Fields(msgspec.Struct, kw_only=True, gc=False):
    """Fields every Segment call has, apart from its nested objects."""

    messageId: MessageId | None = None
    userId: str | int | None = None
    anonymousId: str | int | None = None
    timestamp: datetime | None = None
    originalTimestamp: datetime | None = None
    sentAt: datetime | None = None

    @property
    def anonymous(self) -> bool:
        """Neither userId nor anonymousId: not a valid message."""
        return self.userId in _MISSING and self.anonymousId in _MISSING


# One plain class per call type, a base of both its model type and its stored type (below),
# so that one isinstance finds a track call decoded either way. Plain, not msgspec, types:
# an isinstance against a msgspec type that fails calls `__instancecheck__`, against a
# plain class it walks the MRO in C.
class CountedCall:
    """Track, page and screen: counted in the ledger."""

    __slots__ = ()


class TrackCall(CountedCall):
    __slots__ = ()


class PageCall(CountedCall):
    __slots__ = ()


class ScreenCall(CountedCall):
    __slots__ = ()


class IdentifyCall:
    __slots__ = ()


class GroupCall:
    __slots__ = ()


class AliasCall:
    __slots__ = ()


class MessageBase(_Fields, kw_only=True, tag_field="type", gc=False):
    """Fields every Segment call has. Unknown fields are ignored, as Segment does.

    "userId or anonymousId is required" is the one rule checked after decoding (`ANONYMOUS`):
    as a `__post_init__` it would be a call from C into Python per message."""

    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None


@final
class Identify(MessageBase, IdentifyCall, kw_only=True, tag="identify"):
    traits: dict[str, Any] | None = None


@final
class Group(MessageBase, GroupCall, kw_only=True, tag="group"):
    groupId: NonEmpty | int
    traits: dict[str, Any] | None = None


@final
class Track(MessageBase, TrackCall, kw_only=True, tag="track"):
    event: NonEmpty
    properties: dict[str, Any] | None = None


@final
class Page(MessageBase, PageCall, kw_only=True, tag="page"):
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


@final
class Screen(MessageBase, ScreenCall, kw_only=True, tag="screen"):
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None


@final
class Alias(MessageBase, AliasCall, kw_only=True, tag="alias"):
    previousId: NonEmpty | int


Message: TypeAlias = Identify | Group | Track | Page | Screen | Alias


class Batch(msgspec.Struct, kw_only=True):
    batch: Annotated[list[Message], msgspec.Meta(max_length=MAX_BATCH)]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


# The same messages as seen by `check_batch`: every field the types above validate, with the
# same rules, except that nested objects (context, traits, properties) are skipped in C
# instead of built into dicts; ingest only needs the verdict when the pipeline decodes the
# stored body in another process. tests/unit/test_messages.py checks both agree.
class _Object(msgspec.Struct, gc=False):
    """Any JSON object: what a `dict[str, Any]` field accepts, without building it."""


class _CheckBase(_Fields, kw_only=True, tag_field="type", gc=False):
    context: _Object | None = None
    integrations: _Object | None = None
    # not a field of the model (unknown fields are ignored): analytics.js's batching mode
    # puts the write key in every message, and msgspec finds it here, escaped or not, for
    # less than a scan of the body costs
    writeKey: Any = None


class _CheckIdentify(_CheckBase, kw_only=True, tag="identify"):
    traits: _Object | None = None


class _CheckGroup(_CheckBase, kw_only=True, tag="group"):
    groupId: NonEmpty | int
    traits: _Object | None = None


class _CheckTrack(_CheckBase, kw_only=True, tag="track"):
    event: NonEmpty
    properties: _Object | None = None


class _CheckPage(_CheckBase, kw_only=True, tag="page"):
    name: str | None = None
    category: str | None = None
    properties: _Object | None = None


class _CheckScreen(_CheckPage, kw_only=True, tag="screen"):
    pass


class _CheckAlias(_CheckBase, kw_only=True, tag="alias"):
    previousId: NonEmpty | int


_CheckMessage: TypeAlias = (
    _CheckIdentify | _CheckGroup | _CheckTrack | _CheckPage | _CheckScreen | _CheckAlias
)


class _CheckBatch(msgspec.Struct, kw_only=True, gc=False):
    batch: Annotated[list[_CheckMessage], msgspec.Meta(max_length=MAX_BATCH)]
    context: _Object | None = None
    integrations: _Object | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


# The batch a server SDK sends, checked by the decode alone: every message has a userId
# (not empty) and no writeKey of its own, so no pass over the messages is left to make.
# These types accept a subset of what the `_Check` types accept; a batch they refuse, valid
# or not, is checked again by those (a message without a userId or with a writeKey fails
# here at once, before the rest of the batch is read).
class _FastIdentify(_CheckIdentify, kw_only=True, tag="identify"):
    userId: NonEmpty | int
    writeKey: None = None


class _FastGroup(_CheckGroup, kw_only=True, tag="group"):
    userId: NonEmpty | int
    writeKey: None = None


class _FastTrack(_CheckTrack, kw_only=True, tag="track"):
    userId: NonEmpty | int
    writeKey: None = None


class _FastPage(_CheckPage, kw_only=True, tag="page"):
    userId: NonEmpty | int
    writeKey: None = None


class _FastScreen(_CheckScreen, kw_only=True, tag="screen"):
    userId: NonEmpty | int
    writeKey: None = None


class _FastAlias(_CheckAlias, kw_only=True, tag="alias"):
    userId: NonEmpty | int
    writeKey: None = None


_FastMessage: TypeAlias = (
    _FastIdentify | _FastGroup | _FastTrack | _FastPage | _FastScreen | _FastAlias
)


class _FastBatch(msgspec.Struct, kw_only=True, gc=False):  # `_CheckBatch`, those messages
    batch: Annotated[list[_FastMessage], msgspec.Meta(max_length=MAX_BATCH)]
    context: _Object | None = None
    integrations: _Object | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


# The same messages as apply reads them (`decode_stored`): every field validated as the model
# validates it, but only what the router and the mapping read is built. A track call's
# properties are never forwarded, so they are skipped in C like the `_Check` types' objects;
# of a context only the account and identify's fallback traits are built, of a page's
# properties only the fields that may name it. tests/unit/test_messages.py holds this decode
# to `decode_batch`.
class Context(msgspec.Struct, kw_only=True, gc=False):
    """What apply reads of a `context` object; its other fields are skipped. UNSET: the
    field is absent (a null is None, which in a merge hides the batch's value)."""

    groupId: Any = msgspec.UNSET
    traits: Any = msgspec.UNSET


class ViewProperties(msgspec.Struct, kw_only=True, gc=False):
    """What apply reads of a page or screen call's `properties`: what may name the view."""

    name: Any = None
    title: Any = None
    path: Any = None


class _StoredBase(_Fields, kw_only=True, tag_field="type", gc=False):
    context: Context | None = None
    integrations: dict[str, Any] | None = None


@final
class StoredIdentify(_StoredBase, IdentifyCall, kw_only=True, tag="identify"):
    traits: dict[str, Any] | None = None


@final
class StoredGroup(_StoredBase, GroupCall, kw_only=True, tag="group"):
    groupId: NonEmpty | int
    traits: dict[str, Any] | None = None


@final
class StoredTrack(_StoredBase, TrackCall, kw_only=True, tag="track"):
    event: NonEmpty
    properties: _Object | None = None  # never forwarded


@final
class StoredPage(_StoredBase, PageCall, kw_only=True, tag="page"):
    name: str | None = None
    category: str | None = None
    properties: ViewProperties | None = None


@final
class StoredScreen(_StoredBase, ScreenCall, kw_only=True, tag="screen"):
    name: str | None = None
    category: str | None = None
    properties: ViewProperties | None = None


@final
class StoredAlias(_StoredBase, AliasCall, kw_only=True, tag="alias"):
    previousId: NonEmpty | int


StoredMessage: TypeAlias = (
    StoredIdentify | StoredGroup | StoredTrack | StoredPage | StoredScreen | StoredAlias
)
# A message as the router, the actors and the mapping take it: from ingest in the same
# process (`decode_batch`), or read back from the inbox (`decode_stored`).
AnyMessage: TypeAlias = Message | StoredMessage


class _StoredBatch(msgspec.Struct, kw_only=True, gc=False):
    batch: Annotated[list[StoredMessage], msgspec.Meta(max_length=MAX_BATCH)]
    context: Context | None = None
    integrations: dict[str, Any] | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


class Checked(msgspec.Struct):
    """A batch's verdict without its messages: what ingest replies and stores."""

    count: int  # messages, valid or not
    valid: int
    rejected: list[Rejected]
    write_key: str | None
    body: bytes  # as `Decoded.body`


class Rejected(msgspec.Struct):
    index: int  # position in the client's batch
    messageId: str | None  # if it could be read
    reason: str
    raw: bytes  # the message's JSON as sent, for the dead letter


class Decoded(msgspec.Struct):
    messages: list[Message]
    rejected: list[Rejected]
    context: dict[str, Any] | None
    integrations: dict[str, Any] | None
    sent_at: datetime | None
    write_key: str | None
    # What the gateway persists: the batch without its write key, which `decode_batch`
    # turns back into exactly these `messages` and `rejected` (the router keeps the
    # rejected as dead letters)
    body: bytes

    @property
    def count(self) -> int:
        return len(self.messages) + len(self.rejected)

    @property
    def valid(self) -> int:
        return len(self.messages)

    def checked(self) -> Checked:
        return Checked(self.count, self.valid, self.rejected, self.write_key, self.body)


class Stored(msgspec.Struct):
    """A stored body as apply reads it (`decode_stored`): `decode_batch`'s verdict on it,
    the messages holding only what apply reads."""

    messages: list[StoredMessage]
    rejected: list[Rejected]
    context: Context | None
    integrations: dict[str, Any] | None
    sent_at: datetime | None


class InvalidBody(Exception):
    """The body as a whole cannot be read (a 400): `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The slow path's view of a batch: messages left undecoded, so each can fail alone.
class _Envelope(msgspec.Struct, kw_only=True):
    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


class _StoredEnvelope(msgspec.Struct, kw_only=True):  # `_Envelope`, as apply reads it
    batch: list[msgspec.Raw]
    context: Context | None = None
    integrations: dict[str, Any] | None = None
    sentAt: datetime | None = None
    writeKey: str | None = None


class _Persisted(msgspec.Struct, kw_only=True, omit_defaults=True):
    batch: list[msgspec.Raw]
    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sentAt: datetime | None = None


class _MessageId(msgspec.Struct):
    messageId: str | None = None


def _double(text: str) -> float | None:
    """A JSON number with a fraction or an exponent, where a message holds any value
    (`float_hook`): beyond the double range (1e400, -1e400) it is null, as Segment's
    JavaScript reads it (JSON.parse gives Infinity, JSON.stringify sends it on as null).
    msgspec refuses such a number, but only where it builds a value: the check skips the
    objects it does not read, so without this the verdicts would differ (DESIGN 2)."""
    value = float(text)
    return None if math.isinf(value) else value


# Decoders and encoders hold no state between calls; building them once is the point.
# Each that builds a value of any type reads numbers out of range as null (`_double`,
# `_lenient`), so that the check, the model and the stored decode agree on them.
_BATCH = msgspec.json.Decoder(Batch, float_hook=_double)
# (not the check's: the one value it builds, a message's writeKey, out of range fails there,
# and `_decode_each` decides as the model does)
_CHECK = msgspec.json.Decoder(_CheckBatch)
_FAST = msgspec.json.Decoder(_FastBatch)
_ENVELOPE = msgspec.json.Decoder(_Envelope, float_hook=_double)
_MESSAGE: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message, float_hook=_double)
_MESSAGE_ID = msgspec.json.Decoder(_MessageId)
_STORED = msgspec.json.Decoder(_StoredBatch, float_hook=_double)
_STORED_ENVELOPE = msgspec.json.Decoder(_StoredEnvelope, float_hook=_double)
_STORED_MESSAGE: msgspec.json.Decoder[StoredMessage] = msgspec.json.Decoder(
    StoredMessage, float_hook=_double
)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_STR = msgspec.json.Decoder(str)
_ENCODER = msgspec.json.Encoder()

_B = TypeVar("_B", Batch, _CheckBatch, _FastBatch)
_T = TypeVar("_T")
_KEY_FIELD = b'"writeKey"'
# how `_persisted` starts: the batch first, as `_Persisted` lists it
_STORED_HEAD = b'{"batch":'
_NO_MESSAGES = _STORED_HEAD + b"[]"
_USER_ID = operator.attrgetter("userId")
_WRITE_KEY = operator.attrgetter("writeKey")

ANONYMOUS = "userId or anonymousId is required"
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


_check = load("_check")
# gateway/_check.c's `fast_check`, or None where it was not built; `check_batch` gives the
# same verdicts either way
_fast_check: Callable[[bytes], int | tuple[int, bytes, bytes] | None] | None = (
    None if _check is None else _check.fast_check
)
# Whether `check_batch` tries gateway/_check.c first: it accepts only a batch this module
# accepts with the very same `Checked`, and leaves every other body to the code below
COMPILED_CHECK = _fast_check is not None


def decode_batch(body: bytes) -> Decoded:
    """Decode a `/v1/batch` body. Raises `InvalidBody`; bad messages come back as `Rejected`."""
    return _decode(body, _maybe_keyed(body))


def decode_stored(body: bytes) -> Stored:
    """A body ingest stored, as apply reads it: `decode_batch`'s messages, rejects and
    reasons, each message holding only what apply reads (`StoredMessage`). The body holds no
    write key (ingest removed them), so it is not searched for one. Raises `InvalidBody`."""
    _check_utf8(body)
    try:
        parsed = _STORED.decode(body)
    except msgspec.ValidationError:
        return _stored_each(body, None)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None
    if len(body) > MAX_MESSAGE_BYTES:
        envelope = _lenient(_STORED_ENVELOPE, body)
        if any(len(raw) > MAX_MESSAGE_BYTES for raw in envelope.batch):
            return _stored_each(body, envelope)
    if _some_anonymous(parsed.batch):
        return _stored_each(body, None)
    return Stored(parsed.batch, [], parsed.context, parsed.integrations, parsed.sentAt)


def _stored_each(body: bytes, envelope: _StoredEnvelope | None) -> Stored:
    """`decode_stored` message by message, as `_decode_each` decodes a batch."""
    if envelope is None:
        envelope = _stored_envelope(body)
    raws = envelope.batch
    if len(raws) > MAX_BATCH:
        raise InvalidBody(
            f"a batch holds at most {MAX_BATCH:,} messages, this one has {len(raws):,}"
        )
    if envelope.writeKey is not None or _maybe_keyed(body):
        raws = _keyless(raws)  # a reject's raw never shows a key
    messages: list[StoredMessage] = []
    rejected: list[Rejected] = []
    for index, raw in enumerate(raws):
        outcome = _read_message(raw, _STORED_MESSAGE)
        if isinstance(outcome, str):
            data = bytes(raw)
            # the model's reason: msgspec spells a path inside a part built in part
            # (`context.groupId`) other than inside a dict (`context[...]`)
            reason = _decode_message(raw)
            reason = reason if isinstance(reason, str) else outcome
            rejected.append(Rejected(index, _read_message_id(data), reason, data))
        else:
            messages.append(outcome)
    return Stored(messages, rejected, envelope.context, envelope.integrations, envelope.sentAt)


def _stored_envelope(body: bytes) -> _StoredEnvelope:
    """`_strict(_ENVELOPE, ...)` as apply reads the batch, with the model's reason."""
    try:
        return _lenient(_STORED_ENVELOPE, body)
    except msgspec.ValidationError as exc:
        _strict(_ENVELOPE, body, "invalid batch")  # raises: the model rejects it too
        raise InvalidBody(f"invalid batch: {_relative(str(exc))}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def in_full(body: bytes, stored: Stored, positions: Sequence[int]) -> list[AnyMessage]:
    """The messages at `positions` of `stored.messages` (read from `body`), as
    `decode_batch` models them: for a message apply may keep as a dead letter, which holds
    the message as it always has. The model accepts every message `decode_stored` accepts
    (tests/unit/test_messages.py holds them to it); were one refused, it would come back as
    `decode_stored` read it, not stop the turn."""
    raws = _lenient(_ENVELOPE, body).batch
    if stored.rejected:
        skip = {r.index for r in stored.rejected}
        raws = [raw for i, raw in enumerate(raws) if i not in skip]
    out: list[AnyMessage] = []
    for position in positions:
        outcome = _decode_message(raws[position])
        out.append(_STORED_MESSAGE.decode(raws[position]) if isinstance(outcome, str) else outcome)
    return out


def _decode(body: bytes, keyed_body: bool) -> Decoded:
    _check_utf8(body)
    parsed, stored = _read_batch(body, _BATCH, keyed_body)
    if isinstance(parsed, Decoded):
        return parsed
    if _some_anonymous(parsed.batch):
        return _decode_each(body, None)
    return Decoded(
        messages=parsed.batch,
        rejected=[],
        context=parsed.context,
        integrations=parsed.integrations,
        sent_at=parsed.sentAt,
        write_key=parsed.writeKey,
        body=stored,
    )


def check_batch(body: bytes) -> Checked:
    """`decode_batch`'s verdict on a `/v1/batch` body, at a fraction of the cost: the
    messages are validated, not built. Raises `InvalidBody`."""
    if _fast_check is not None:
        # a common batch, every message valid: see `COMPILED_CHECK`
        found = _fast_check(body)
        if isinstance(found, int):
            return Checked(found, found, [], None, body)
        if found is not None:
            # a key at the top, as the SDKs send it: the body stored without it, as
            # `_without_keys` writes it (no message has a key of its own: fast_check takes
            # none but a null), the messages spliced in where its encoding lists none
            n, messages, top = found
            envelope = _lenient(_ENVELOPE, top)
            rest = _persisted([], envelope).removeprefix(_NO_MESSAGES)
            return Checked(n, n, [], envelope.writeKey, _STORED_HEAD + messages + rest)
    _check_utf8(body)
    parsed: _FastBatch | _CheckBatch | Decoded
    try:
        fast = _FAST.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        # not the common batch (`_FastBatch`), or not valid: read with the `_Check` types
        parsed, stored = _read_batch(body, _CHECK, None)
        if not isinstance(parsed, Decoded) and _some_anonymous(parsed.batch):
            return _decode_each(body, None).checked()
    else:
        parsed, stored = _stored(fast, body, fast.writeKey is not None)
    if isinstance(parsed, Decoded):
        return parsed.checked()
    n = len(parsed.batch)
    return Checked(n, n, [], parsed.writeKey, stored)


def _read_batch(
    body: bytes, decoder: msgspec.json.Decoder[_B], keyed_body: bool | None
) -> tuple[_B | Decoded, bytes]:
    """The whole batch in one call, and the body to store; or, when some message is
    invalid or too large, each message decoded on its own (a `Decoded`). `keyed_body`: whether
    a message may hold a `writeKey` (`_maybe_keyed`), or None where the decoded messages say.
    The caller has checked that `body` is UTF-8 (`_check_utf8`)."""
    try:
        parsed = decoder.decode(body)
    except msgspec.ValidationError:
        return _decode_each(body, None), body
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None
    # analytics.js's batching mode puts the write key in every message too
    keyed = parsed.writeKey is not None or (
        _keys_in(parsed.batch) if keyed_body is None else keyed_body
    )
    return _stored(parsed, body, keyed)


def _stored(parsed: _B, body: bytes, keyed: bool) -> tuple[_B | Decoded, bytes]:
    """`parsed` and the body to store, without its write keys (`keyed`: it may hold some);
    or, when a message is too large, each message decoded on its own."""
    if len(body) > MAX_MESSAGE_BYTES or keyed:
        envelope = _lenient(_ENVELOPE, body)
        if len(body) > MAX_MESSAGE_BYTES and any(
            len(raw) > MAX_MESSAGE_BYTES for raw in envelope.batch
        ):
            return _decode_each(body, envelope), body
        if keyed:
            # The write key is a secret: keep it out of what gets stored.
            body = _without_keys(body, envelope)
    return parsed, body


def decode_single(body: bytes, type: str) -> Decoded:
    """Decode a `/v1/<type>` body: one message whose type comes from the path.

    Raises `InvalidBody` only when the body is not a JSON object; an invalid
    message comes back as one `Rejected` at index 0.
    """
    _check_utf8(body)
    fields = _strict(_FIELDS, body, "body must be a JSON object")
    write_key = _optional_str(fields.pop("writeKey", None))
    fields["type"] = msgspec.Raw(_ENCODER.encode(type))
    raw = _ENCODER.encode(fields)
    outcome = _decode_message(raw)
    messages: list[Message] = []
    rejected: list[Rejected] = []
    if isinstance(outcome, str):
        rejected.append(Rejected(0, _read_message_id(raw), outcome, raw))
    else:
        messages.append(outcome)
    return Decoded(
        messages=messages,
        rejected=rejected,
        context=None,
        integrations=None,
        sent_at=None,
        write_key=write_key,
        body=_persisted([msgspec.Raw(raw)], None),
    )


def _decode_each(body: bytes, envelope: _Envelope | None) -> Decoded:
    if envelope is None:
        envelope = _strict(_ENVELOPE, body, "invalid batch")
    if len(envelope.batch) > MAX_BATCH:
        raise InvalidBody(
            f"a batch holds at most {MAX_BATCH:,} messages, this one has {len(envelope.batch):,}"
        )
    messages: list[Message] = []
    rejected: list[Rejected] = []
    if envelope.writeKey is not None or _maybe_keyed(body):
        body = _without_keys(body, envelope)
    for index, raw in enumerate(envelope.batch):
        outcome = _decode_message(raw)
        if isinstance(outcome, str):
            data = bytes(raw)
            rejected.append(Rejected(index, _read_message_id(data), outcome, data))
        else:
            messages.append(outcome)
    return Decoded(
        messages=messages,
        rejected=rejected,
        context=envelope.context,
        integrations=envelope.integrations,
        sent_at=envelope.sentAt,
        write_key=envelope.writeKey,
        body=body,
    )


def _decode_message(raw: bytes | msgspec.Raw) -> Message | str:
    """The message, or the reason it is rejected."""
    return _read_message(raw, _MESSAGE)


_M = TypeVar("_M", bound=_Fields)


def _read_message(raw: bytes | msgspec.Raw, decoder: msgspec.json.Decoder[_M]) -> _M | str:
    """The message as `decoder` reads it, or the reason it is rejected."""
    size = len(raw)
    if size > MAX_MESSAGE_BYTES:
        return (
            f"message is {size:,} bytes, over the limit of 32 KB ({MAX_MESSAGE_BYTES:,} bytes)"
        )
    try:
        message = _lenient(decoder, raw)
    except msgspec.ValidationError as exc:
        return _relative(str(exc))
    except RecursionError:
        return "message is nested too deeply"
    return ANONYMOUS if message.anonymous else message


def _maybe_keyed(body: bytes) -> bool:
    """Whether some message may hold a `writeKey` field: by name, or spelt with escapes."""
    return b"\\" in body or _KEY_FIELD in body


def _some_anonymous(messages: Sequence[_Fields]) -> bool:
    """Whether a message lacks both ids: the batch then goes down the path that finds each
    invalid message. `all` over `map` runs in C: when every userId is truthy no message can
    lack ids (a falsy one, such as the valid id 0, is looked at exactly)."""
    return not all(map(_USER_ID, messages)) and any(m.anonymous for m in messages)


def _keys_in(messages: Iterable[object]) -> bool:
    """Whether some message holds a write key (a `writeKey` not null)."""
    keys = list(map(_WRITE_KEY, messages))  # in C; `count` compares None by identity first
    return keys.count(None) != len(keys)


def _without_keys(body: bytes, envelope: _Envelope) -> bytes:
    """The body to store: without the batch's write key and the messages' own (the same
    body when it holds none), `envelope.batch` set to the messages kept."""
    kept = _keyless(envelope.batch)
    if kept is envelope.batch and envelope.writeKey is None:
        return body
    envelope.batch = kept
    return _persisted(kept, envelope)


def _keyless(raws: list[msgspec.Raw]) -> list[msgspec.Raw]:
    """The messages without a `writeKey` field of their own: `raws` itself when none has."""
    out = []
    changed = False
    for raw in raws:
        if _maybe_keyed(bytes(raw)):
            try:
                fields = _FIELDS.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                # not an object: rejected as it is, and it holds no writeKey field
                out.append(raw)
                continue
            key = fields.pop("writeKey", None)
            if key is not None and bytes(key) != b"null":  # a null holds no secret
                raw = msgspec.Raw(_ENCODER.encode(fields))
                changed = True
        out.append(raw)
    return out if changed else raws


def _persisted(kept: list[msgspec.Raw], envelope: _Envelope | None) -> bytes:
    if envelope is None:
        return _ENCODER.encode(_Persisted(batch=kept))
    return _ENCODER.encode(
        _Persisted(
            batch=kept,
            context=envelope.context,
            integrations=envelope.integrations,
            sentAt=envelope.sentAt,
        )
    )


def _read_message_id(raw: bytes) -> str | None:
    try:
        return _MESSAGE_ID.decode(raw).messageId
    except (msgspec.DecodeError, RecursionError):
        return None


def _optional_str(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        return _STR.decode(raw)
    except msgspec.DecodeError:
        return None


def _check_utf8(body: bytes) -> None:
    # msgspec does not check the bytes of fields it skips; a stored body must be clean text.
    if body.isascii():
        return
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBody(f"body is not valid UTF-8 (byte {exc.start})") from None


def _strict(decoder: msgspec.json.Decoder[_T], body: bytes, invalid: str) -> _T:
    """`body` decoded, or the `InvalidBody` the client is told: `invalid` and msgspec's reason."""
    try:
        return _lenient(decoder, body)
    except msgspec.ValidationError as exc:
        raise InvalidBody(f"{invalid}: {_relative(str(exc))}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def _lenient(decoder: msgspec.json.Decoder[_T], data: bytes | msgspec.Raw) -> _T:
    """`decoder.decode(data)`, where an integer too long for msgspec (over 4,300 characters,
    far beyond a double) inside an object or array reads as null, as `_double` reads a
    number beyond the double range: the check skips those objects without reading their
    numbers, so it accepts such a message, and so must every decode that builds it."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        if "Integer value out of range" not in str(exc):
            raise
        nulled = _nulled(data)
        if nulled is None:
            raise
    return decoder.decode(nulled)


# A JSON string, or an integer (not a float's part) longer than msgspec reads: 4,300
# characters, its sign included.
_STRING_OR_LONG_INT = re.compile(
    rb'"[^"\\]*(?:\\.[^"\\]*)*"|(?<![0-9.eE+-])(-[0-9]{4300,}|[0-9]{4301,})(?![0-9.eE])',
    re.DOTALL,
)


def _nulled(data: bytes | msgspec.Raw) -> bytes | None:
    """The JSON object `data` with every integer longer than msgspec reads inside the objects
    and arrays its fields hold (but a batch's messages) made null; None when there is none
    or `data` is not an object. Its fields' own values are left as they are: where a type
    reads them, the type decides."""
    try:
        fields = _FIELDS.decode(data)
    except msgspec.ValidationError:
        return None
    changed = False
    for name, value in fields.items():
        text = bytes(value)
        if name == "batch" or text[:1] not in (b"{", b"["):
            continue
        nulled = _STRING_OR_LONG_INT.sub(_null_long_int, text)
        if nulled != text:
            fields[name] = msgspec.Raw(nulled)
            changed = True
    return _ENCODER.encode(fields) if changed else None


def _null_long_int(match: re.Match[bytes]) -> bytes:
    return match.group(0) if match.group(1) is None else b"null"


def _not_json(exc: Exception) -> InvalidBody:
    if isinstance(exc, RecursionError):
        return InvalidBody("body is nested too deeply")
    return InvalidBody(f"body is not valid JSON: {exc}")


def _relative(text: str) -> str:
    """msgspec's error, with its path made relative to the message ("- at `context.ip`")."""
    match = _AT_PATH.search(text)
    if match is None:
        return text
    where = match.group(1)
    head = text[: match.start()]
    return f"{head} - at `{where}`" if where else head


# Per-event helpers, used by the router off the request path.


def effective_timestamp(
    msg: AnyMessage, batch_sent_at: datetime | None, received_at: datetime
) -> datetime:
    """When the event happened, as Segment computes it; always timezone-aware UTC.

    `timestamp` if given; else `received_at - (sentAt - originalTimestamp)`
    (the client's clock skew corrected, the message's own `sentAt` before the
    batch's); else `received_at`. Naive datetimes are taken as UTC.

    A `timestamp` whose offset takes it outside the calendar in UTC (year 1 at +01:00,
    year 9999 at -01:00) is a broken client clock, as a skew that does is: the rules after
    it decide. Raising here would fail the message's record at every routing, for ever.
    """
    if msg.timestamp is not None:
        try:
            return _utc(msg.timestamp)
        except OverflowError:
            pass
    received = _utc(received_at)
    sent_at = msg.sentAt if msg.sentAt is not None else batch_sent_at
    if msg.originalTimestamp is not None and sent_at is not None:
        try:
            return received - (_utc(sent_at) - _utc(msg.originalTimestamp))
        except OverflowError:
            # A skew that lands outside the calendar is a broken client clock.
            return received
    return received


def merged(outer: dict[str, Any] | None, inner: dict[str, Any] | None) -> dict[str, Any] | None:
    """`outer` (the batch's) under `inner` (the message's): inner wins, nested dicts merge.

    Neither argument is modified; when one side is None the other is returned as is.
    """
    if outer is None:
        return inner
    if inner is None:
        return outer
    out = dict(outer)
    for key, value in inner.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = merged(below, value)
        else:
            out[key] = value
    return out


def merged_context(outer: Context | None, inner: Context | None) -> Context | None:
    """`merged` for what apply reads of two contexts: inner wins field by field (a null
    too), and traits that are objects on both sides merge."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return Context(groupId=_under(outer.groupId, inner.groupId),
                   traits=_under(outer.traits, inner.traits))


def _under(outer: Any, inner: Any) -> Any:
    if inner is msgspec.UNSET:
        return outer
    if isinstance(inner, dict) and isinstance(outer, dict):
        return merged(outer, inner)
    return inner


def context_group(context: dict[str, Any] | Context | None) -> str | None:
    """The account a (merged) context names, its `groupId`, as Accoil takes an id."""
    if context is None:
        return None
    return id_str(context.get("groupId") if isinstance(context, dict) else context.groupId)


def context_traits(context: dict[str, Any] | Context | None) -> dict[str, Any]:
    """A (merged) context's `traits` when they are an object, else none."""
    if context is None:
        return {}
    traits = context.get("traits") if isinstance(context, dict) else context.traits
    return traits if isinstance(traits, dict) else {}


def id_str(value: object) -> str | None:
    """An identifier as Accoil takes it: a non-empty string (integers stringified), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def user_id(msg: AnyMessage) -> str | None:
    return id_str(msg.userId)


def anonymous_id(msg: AnyMessage) -> str | None:
    return id_str(msg.anonymousId)


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is UTC:  # the common case ("...Z"): as it is, once per event
        return dt
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
