"""Accoil's three wire dialects: auth, body types and their validation. No I/O.

`parse()` turns one ingest request (path, `Authorization` header, raw body)
into an `Outcome`: the reply status and body, the API key it authenticated
with and, when accepted, one normalised operation for the state engine.

Validation is stricter than Accoil's where strictness catches a sender's bug:
ids must be non-empty strings, optional fields may be absent but not `null`,
v2 timestamps need a timezone, v1 timestamps must be milliseconds, and a v2
call authenticated with Segment's `base64(key + ":")` is refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, UnsetType

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Traits = dict[str, Any]
# Anything below is Unix seconds sent by mistake (10**11 ms is March 1973).
Millis = Annotated[int, msgspec.Meta(ge=10**11, le=10**14)]


# -- normalised operations: what the state engine applies ---------------------


class IdentifyOp(msgspec.Struct, kw_only=True, frozen=True):
    user_id: str
    traits: Traits
    group_id: str | None = None
    timestamp: datetime | None = None


class GroupOp(msgspec.Struct, kw_only=True, frozen=True):
    group_id: str
    traits: Traits
    user_id: str | None = None
    timestamp: datetime | None = None


class TrackOp(msgspec.Struct, kw_only=True, frozen=True):
    user_id: str
    event: str
    group_id: str | None = None
    timestamp: datetime | None = None


Op = IdentifyOp | GroupOp | TrackOp


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    status: int
    reply: dict[str, Any]
    api_key: str | None = None
    body: Any = None
    op: Op | None = None
    # top-level body fields Accoil does not document for the endpoint, sorted
    unknown_fields: list[str] = []


# -- v2: Authorization: Basic <API_KEY>, camelCase, ISO 8601 timestamps ---------


class V2Identify(msgspec.Struct, kw_only=True):
    userId: NonEmpty
    traits: Traits | UnsetType = UNSET
    groupId: NonEmpty | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class V2Group(msgspec.Struct, kw_only=True):
    groupId: NonEmpty
    userId: NonEmpty | UnsetType = UNSET
    traits: Traits | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class V2Track(msgspec.Struct, kw_only=True):
    # Accoil documents userId, event and timestamp: no groupId, no properties
    userId: NonEmpty
    event: NonEmpty
    timestamp: Timestamp | UnsetType = UNSET


# -- segment: what Segment's Accoil destination sends to POST /segment ---------


class SegIdentify(msgspec.Struct, kw_only=True, tag_field="type", tag="identify"):
    userId: NonEmpty
    anonymousId: str | UnsetType = UNSET
    traits: Traits | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class SegGroup(msgspec.Struct, kw_only=True, tag_field="type", tag="group"):
    groupId: NonEmpty
    userId: NonEmpty | UnsetType = UNSET
    anonymousId: str | UnsetType = UNSET
    traits: Traits | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class SegTrack(msgspec.Struct, kw_only=True, tag_field="type", tag="track"):
    userId: NonEmpty
    event: NonEmpty
    anonymousId: str | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class SegPage(msgspec.Struct, kw_only=True, tag_field="type", tag="page"):
    userId: NonEmpty
    name: NonEmpty
    anonymousId: str | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


class SegScreen(msgspec.Struct, kw_only=True, tag_field="type", tag="screen"):
    userId: NonEmpty
    name: NonEmpty
    anonymousId: str | UnsetType = UNSET
    timestamp: Timestamp | UnsetType = UNSET


SegmentCall = SegIdentify | SegGroup | SegTrack | SegPage | SegScreen


# -- v1 (legacy): api_key in the body, snake_case, timestamp in ms -------------


class V1User(msgspec.Struct, kw_only=True):
    api_key: NonEmpty
    timestamp: Millis
    user_id: NonEmpty
    group_id: NonEmpty | UnsetType = UNSET
    traits: Traits | UnsetType = UNSET


class V1Group(msgspec.Struct, kw_only=True):
    api_key: NonEmpty
    timestamp: Millis
    group_id: NonEmpty
    user_id: NonEmpty | UnsetType = UNSET
    traits: Traits | UnsetType = UNSET


class V1Event(msgspec.Struct, kw_only=True):
    api_key: NonEmpty
    timestamp: Millis
    user_id: NonEmpty
    event: NonEmpty


# -- the fields each endpoint documents ------------------------------------------

_V2_FIELDS = {
    "/v2/identify": frozenset(V2Identify.__struct_fields__),
    "/v2/group": frozenset(V2Group.__struct_fields__),
    "/v2/track": frozenset(V2Track.__struct_fields__),
}
_SEGMENT_FIELDS = {
    t.__struct_config__.tag: frozenset(("type", *t.__struct_fields__))
    for t in (SegIdentify, SegGroup, SegTrack, SegPage, SegScreen)
}
_V1_FIELDS = {
    "/v1/users": frozenset(V1User.__struct_fields__),
    "/v1/groups": frozenset(V1Group.__struct_fields__),
    "/v1/events": frozenset(V1Event.__struct_fields__),
}


def unknown_fields(path: str, body: dict[str, Any]) -> list[str]:
    """The top-level fields of `body` that Accoil does not document for `path`, sorted.

    Accoil ignores them today, or may refuse them tomorrow: a sender should not rely on
    either. For `/segment` the documented set depends on `type`; an unknown type lists
    nothing here (it is refused as invalid)."""
    if path == "/segment":
        known = _SEGMENT_FIELDS.get(body.get("type"))  # type: ignore[arg-type]
    else:
        known = _V2_FIELDS.get(path) or _V1_FIELDS.get(path)
    if known is None:
        return []
    return sorted(k for k in body if k not in known)


# -- auth ----------------------------------------------------------------------


class AuthError(Exception):
    """Why a request is not authenticated. The message never contains the key."""


def _basic_token(authorization: str | None) -> str:
    if authorization is None:
        raise AuthError("missing Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise AuthError("Authorization must use the Basic scheme")
    token = token.strip()
    if not token:
        raise AuthError("empty API key")
    return token


def _segment_user(token: str) -> str | None:
    """The user name if `token` is base64 of `user:` (empty password), else None."""
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or password or not user:
        return None
    return user


def v2_key(authorization: str | None) -> str:
    """The raw API key of `Authorization: Basic <API_KEY>`."""
    token = _basic_token(authorization)
    if _segment_user(token) is not None:
        raise AuthError(
            "Authorization looks like base64(API_KEY + ':'); v2 wants the raw key: Basic <API_KEY>"
        )
    return token


def segment_key(authorization: str | None) -> str:
    """The API key of `Authorization: Basic base64(API_KEY + ":")`."""
    user = _segment_user(_basic_token(authorization))
    if user is None:
        raise AuthError("Authorization must be Basic base64(API_KEY + ':') with an empty password")
    return user


# -- parsing -------------------------------------------------------------------

_MISSING = re.compile(r"(?:missing required|unknown) field `([^`]+)`")
_AT = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")


def error_field(exc: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error is about."""
    text = str(exc)
    match = _MISSING.search(text) or _AT.search(text)
    return match.group(1) if match else None


def bad_request(error: str, field: str | None = None) -> dict[str, Any]:
    return {"error": error, "field": field}


def journal_body(raw: bytes) -> Any:
    """The body as the journal shows it: parsed JSON, else the raw text."""
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode("utf-8", errors="replace")


def _unset(value: Any) -> Any:
    return None if value is UNSET else value


def _traits(value: Traits | UnsetType) -> Traits:
    return {} if isinstance(value, UnsetType) else value


def _from_millis(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _v2_op(path: str, body: dict[str, Any]) -> Op:
    if path == "/v2/identify":
        i = msgspec.convert(body, V2Identify)
        return IdentifyOp(
            user_id=i.userId,
            traits=_traits(i.traits),
            group_id=_unset(i.groupId),
            timestamp=_unset(i.timestamp),
        )
    if path == "/v2/group":
        g = msgspec.convert(body, V2Group)
        return GroupOp(
            group_id=g.groupId,
            user_id=_unset(g.userId),
            traits=_traits(g.traits),
            timestamp=_unset(g.timestamp),
        )
    t = msgspec.convert(body, V2Track)
    return TrackOp(user_id=t.userId, event=t.event, timestamp=_unset(t.timestamp))


def _segment_op(body: dict[str, Any]) -> Op:
    call = msgspec.convert(body, SegmentCall)
    ts = _unset(call.timestamp)
    if isinstance(call, SegIdentify):
        return IdentifyOp(user_id=call.userId, traits=_traits(call.traits), timestamp=ts)
    if isinstance(call, SegGroup):
        return GroupOp(
            group_id=call.groupId,
            user_id=_unset(call.userId),
            traits=_traits(call.traits),
            timestamp=ts,
        )
    if isinstance(call, SegTrack):
        return TrackOp(user_id=call.userId, event=call.event, timestamp=ts)
    prefix = "Page Viewed " if isinstance(call, SegPage) else "Screen Viewed "
    return TrackOp(user_id=call.userId, event=prefix + call.name, timestamp=ts)


def _v1_op(path: str, body: dict[str, Any]) -> Op:
    if path == "/v1/users":
        u = msgspec.convert(body, V1User)
        return IdentifyOp(
            user_id=u.user_id,
            traits=_traits(u.traits),
            group_id=_unset(u.group_id),
            timestamp=_from_millis(u.timestamp),
        )
    if path == "/v1/groups":
        g = msgspec.convert(body, V1Group)
        return GroupOp(
            group_id=g.group_id,
            user_id=_unset(g.user_id),
            traits=_traits(g.traits),
            timestamp=_from_millis(g.timestamp),
        )
    e = msgspec.convert(body, V1Event)
    return TrackOp(user_id=e.user_id, event=e.event, timestamp=_from_millis(e.timestamp))


def parse(path: str, authorization: str | None, raw: bytes) -> Outcome:
    """Authenticate and validate one ingest call; `path` must be an ingest path."""
    body = journal_body(raw)
    api_key: str | None = None
    if not path.startswith("/v1/"):
        try:
            api_key = segment_key(authorization) if path == "/segment" else v2_key(authorization)
        except AuthError as exc:
            return Outcome(status=401, reply={"error": str(exc)}, body=body)
    try:
        parsed = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return Outcome(
            status=400, reply=bad_request("body is not valid JSON"), api_key=api_key, body=body
        )
    if not isinstance(parsed, dict):
        return Outcome(
            status=400, reply=bad_request("body must be a JSON object"), api_key=api_key, body=body
        )
    if api_key is None:
        key = parsed.get("api_key")
        if not isinstance(key, str) or not key:
            return Outcome(
                status=401, reply={"error": "api_key must be a non-empty string"}, body=body
            )
        api_key = key
    unknown = unknown_fields(path, parsed)
    try:
        if path == "/segment":
            op = _segment_op(parsed)
        elif path.startswith("/v1/"):
            op = _v1_op(path, parsed)
        else:
            op = _v2_op(path, parsed)
    except msgspec.ValidationError as exc:
        reply = bad_request(str(exc), error_field(exc))
        return Outcome(
            status=400, reply=reply, api_key=api_key, body=body, unknown_fields=unknown
        )
    return Outcome(
        status=202, reply={"success": True}, api_key=api_key, body=body, op=op,
        unknown_fields=unknown,
    )
