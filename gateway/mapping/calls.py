"""One Segment message -> one Accoil call (DESIGN 3), in either upstream dialect.

What is forwarded, and what it says, is decided here; how the source's dialect says it
(path, body) is that dialect's object's (`gateway.mapping.dialects`). Pure: no I/O, no
clock. The caller supplies the effective timestamp and the message's context already
merged with its batch's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from gateway.config import Api, UnnamedPages
from gateway.mapping.dialects import DIALECTS, Dialect, Kind, View
from gateway.mapping.traits import iso, normalise_traits
from gateway.segment import (
    AliasCall,
    AnyMessage,
    Context,
    CountedCall,
    GroupCall,
    Page,
    PageCall,
    Screen,
    StoredPage,
    StoredScreen,
    StoredTrack,
    Track,
    TrackCall,
    ViewProperties,
    context_group,
    context_traits,
    id_str,
    user_id,
)

Counted = StoredTrack | StoredPage | StoredScreen | Track | Page | Screen


class Call(msgspec.Struct, kw_only=True):
    kind: Kind  # how calls coalesce: page and screen are counted like track
    path: str  # "/v2/identify" | "/v2/group" | "/v2/track" | "/segment"
    body: dict[str, Any]  # the JSON body to POST, "timestamp" as iso()
    user_id: str | None
    group_id: str | None  # group calls: groupId; others: context.groupId, if any
    event: str | None  # kind "track": the name Accoil counts, the same in both dialects
    traits: dict[str, Any] | None  # identify/group: normalised traits; None for track


class Skip(msgspec.Struct):
    """A message that is not forwarded, and why: a dead letter unless it is counted."""

    reason: str
    unsupported: bool = False  # alias: counted as unsupported, not an error
    # counted under this reason instead of kept as a dead letter ("unnamed")
    counted: str | None = None


def to_call(
    msg: AnyMessage,
    *,
    api: Api,
    timestamp: datetime,
    context: dict[str, Any] | Context | None,
    unnamed_pages: UnnamedPages = "skip",
) -> Call | Skip:
    dialect = DIALECTS[api]
    if isinstance(msg, CountedCall):
        hit = counted(msg, unnamed_pages)
        if isinstance(hit, Skip):
            return hit
        hit_user, event = hit
        body = counted_body(dialect, msg, hit_user, event, iso(timestamp), unnamed_pages)
        return _call("track", dialect, body, hit_user, context_group(context), event, None)

    if isinstance(msg, AliasCall):
        return Skip("alias has no Accoil equivalent", unsupported=True)
    user = user_id(msg)
    when = iso(timestamp)

    if isinstance(msg, GroupCall):
        group = id_str(msg.groupId)
        if group is None:
            return Skip("groupId is required to forward a group call")
        traits = normalise_traits("group", msg.traits or {})
        body = dialect.group(msg, user, group, traits, when)
        return _call("group", dialect, body, user, group, None, traits)

    # identify
    if user is None:
        return _no_user("identify")
    group_of_context = context_group(context)
    traits = normalise_traits("identify", msg.traits or context_traits(context))
    body = dialect.identify(msg, user, traits, group_of_context, when)
    return _call("identify", dialect, body, user, group_of_context, None, traits)


def counted(
    msg: Counted, unnamed_pages: UnnamedPages = "skip", user: str | None = None
) -> tuple[str, str] | Skip:
    """The (userId, event) a track, page or screen call is counted under (page and screen as
    "<Page|Screen> Viewed <name>"), or why it is not forwarded. What `to_call` decides for
    these kinds, without building the call: an actor builds it once per ledger key.
    `user`: the message's `user_id`, when the caller has it already."""
    if user is None:
        user = user_id(msg)
    if isinstance(msg, TrackCall):
        if user is None:
            return _no_user("track")
        if not msg.event:
            return Skip("event is required to forward a track call")
        return user, msg.event
    kind: View = "page" if isinstance(msg, PageCall) else "screen"
    if user is None:
        return _no_user(kind)
    name = _view_name(msg, unnamed_pages)
    if name is None:
        # analytics.js's default page() has no name: routine, so counted, not a dead letter
        return Skip(f"{kind} call without a name", counted="unnamed")
    return user, f"{kind.capitalize()} Viewed {name}"


def counted_body(
    dialect: Dialect, msg: Counted, user: str, event: str, when: str,
    unnamed_pages: UnnamedPages = "skip",
) -> dict[str, Any]:
    """The body of a call `counted` counts under (`user`, `event`), at `when` (`iso`): what
    `to_call` builds for it, for an actor that has the two already (its ledger key)."""
    if isinstance(msg, TrackCall):
        return dialect.track(msg, user, event, when)
    # page and screen stay page and screen, with the name they were counted under
    kind: View = "page" if isinstance(msg, PageCall) else "screen"
    name = _view_name(msg, unnamed_pages) or ""  # `counted` found one
    return dialect.view(msg, kind, user, name, event, when)


def _call(
    kind: Kind,
    dialect: Dialect,
    body: dict[str, Any],
    user: str | None,
    group: str | None,
    event: str | None,
    traits: dict[str, Any] | None,
) -> Call:
    return Call(
        kind=kind,
        path=dialect.path(kind),
        body=body,
        user_id=user,
        group_id=group,
        event=event,
        traits=traits,
    )


def _no_user(kind: str) -> Skip:
    return Skip(f"userId is required to forward {'an' if kind == 'identify' else 'a'} {kind} call")


def _view_name(
    msg: Page | Screen | StoredPage | StoredScreen, unnamed: UnnamedPages
) -> str | None:
    """`name`, else `properties.name`, else (when so configured) `properties.title` or
    `properties.path`."""
    props = msg.properties
    if isinstance(props, ViewProperties):
        named = props.name
        other = None if unnamed == "skip" else props.title if unnamed == "title" else props.path
    else:
        props = props or {}
        named = props.get("name")
        other = None if unnamed == "skip" else props.get(unnamed)
    for name in (msg.name, named, other):
        if isinstance(name, str) and name.strip():
            return name
    return None

