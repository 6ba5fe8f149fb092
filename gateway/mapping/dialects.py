"""The two upstream dialects (DESIGN 3), one object each: where a call goes, its body,
the Authorization header it carries, and the label it is counted and logged under.

`V2` is Accoil's Ingress API (`/v2/<call>`, `Basic <API_KEY>`); `SegmentApi` is what
Segment's own Accoil destination sends (every call to `/segment`, `Basic
base64(API_KEY + ":")`, `stg_` keys to the staging host). `gateway.mapping.calls` decides
*whether* and *what* to send and asks the source's dialect how to say it; the forwarder and
its client use the same object for the wire. Pure: no I/O.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from typing import Any, Literal

import msgspec

from gateway.config import DEFAULT_BASE_URL, Api, Source
from gateway.segment import AnyMessage, anonymous_id

STAGING_BASE_URL = "https://instaging.accoil.com"
_STAGING_PREFIX = "stg_"
SEGMENT_PATH = "/segment"

Kind = Literal["identify", "group", "track"]  # how calls coalesce: page and screen count as track
View = Literal["page", "screen"]


class Upstream(msgspec.Struct, frozen=True):
    """Where a source's calls go and how they authenticate."""

    base_url: str  # no trailing slash
    authorization: str  # the full Authorization header value: a secret
    # the source's API key as configured, which the client masks in Accoil's error replies
    # in every form it travels in (`gateway.observability.redaction`): a secret
    api_key: str

    def __repr__(self) -> str:
        return f"Upstream(base_url={self.base_url!r}, authorization=<redacted>, api_key=<redacted>)"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # msgspec's own __rich_repr__ would list the secrets.
        return [
            ("base_url", self.base_url), ("authorization", "<redacted>"), ("api_key", "<redacted>")
        ]


class Dialect(ABC):
    """How one upstream dialect says each call. Bodies carry `timestamp` as `iso()` text
    and leave out optional fields rather than send them as null."""

    api: Api

    @abstractmethod
    def upstream(self, source: Source) -> Upstream:
        """The base URL `source`'s calls go to, and their Authorization header."""

    @abstractmethod
    def path(self, kind: Kind) -> str:
        """The path a call of `kind` is POSTed to."""

    @abstractmethod
    def identify(
        self, msg: AnyMessage, user: str, traits: dict[str, Any], group: str | None, when: str
    ) -> dict[str, Any]:
        """`group` is the message's `context.groupId`, if any."""

    @abstractmethod
    def group(
        self, msg: AnyMessage, user: str | None, group: str, traits: dict[str, Any], when: str
    ) -> dict[str, Any]: ...

    @abstractmethod
    def track(self, msg: AnyMessage, user: str, event: str, when: str) -> dict[str, Any]: ...

    @abstractmethod
    def view(
        self, msg: AnyMessage, kind: View, user: str, name: str, event: str, when: str
    ) -> dict[str, Any]:
        """A page or screen call: `event` is "<Page|Screen> Viewed <name>"."""

    @abstractmethod
    def label(self, path: str) -> str:
        """The `call` label of a call to `path`, in metrics and logs (a fixed set)."""

    @abstractmethod
    def kind(self, path: str, body: bytes) -> Kind:
        """The kind of a call as it was queued, from its path and encoded body."""


class V2(Dialect):
    """Accoil's Ingress API: one path per kind, and only the fields Accoil documents there."""

    api: Api = "v2"

    def upstream(self, source: Source) -> Upstream:
        key = source.accoil_api_key
        return Upstream(base_url=source.base_url.rstrip("/"), authorization=f"Basic {key}", api_key=key)

    def path(self, kind: Kind) -> str:
        return _V2_PATHS[kind]

    def identify(
        self, msg: AnyMessage, user: str, traits: dict[str, Any], group: str | None, when: str
    ) -> dict[str, Any]:
        return _present(userId=user, traits=traits, groupId=group, timestamp=when)

    def group(
        self, msg: AnyMessage, user: str | None, group: str, traits: dict[str, Any], when: str
    ) -> dict[str, Any]:
        return _present(groupId=group, userId=user, traits=traits, timestamp=when)

    def track(self, msg: AnyMessage, user: str, event: str, when: str) -> dict[str, Any]:
        # Accoil's /v2/track documents userId, event and timestamp: nothing else goes (none
        # is None here: a literal, not `_present`, on the path every track call takes)
        return {"userId": user, "event": event, "timestamp": when}

    def view(
        self, msg: AnyMessage, kind: View, user: str, name: str, event: str, when: str
    ) -> dict[str, Any]:
        return {"userId": user, "event": event, "timestamp": when}

    def label(self, path: str) -> str:
        return path.rsplit("/", 1)[-1]

    def kind(self, path: str, body: bytes) -> Kind:
        if path.endswith("/identify"):
            return "identify"
        return "group" if path.endswith("/group") else "track"


class SegmentApi(Dialect):
    """Segment's Accoil destination: every call to `/segment`, typed in its body; page and
    screen stay page and screen."""

    api: Api = "segment"

    def upstream(self, source: Source) -> Upstream:
        """A `stg_` key (any case) goes to Accoil's staging host, prefix stripped, unless
        the source sets its own base URL."""
        key = source.accoil_api_key
        base_url = source.base_url.rstrip("/")
        if key[: len(_STAGING_PREFIX)].lower() == _STAGING_PREFIX and base_url == DEFAULT_BASE_URL:
            key = key[len(_STAGING_PREFIX) :]
            base_url = STAGING_BASE_URL
        token = base64.b64encode(f"{key}:".encode()).decode("ascii")
        return Upstream(
            base_url=base_url, authorization=f"Basic {token}", api_key=source.accoil_api_key
        )

    def path(self, kind: Kind) -> str:
        return SEGMENT_PATH

    def identify(
        self, msg: AnyMessage, user: str, traits: dict[str, Any], group: str | None, when: str
    ) -> dict[str, Any]:
        return _segment("identify", msg, user, when, traits=traits)

    def group(
        self, msg: AnyMessage, user: str | None, group: str, traits: dict[str, Any], when: str
    ) -> dict[str, Any]:
        return _segment("group", msg, user, when, groupId=group, traits=traits)

    def track(self, msg: AnyMessage, user: str, event: str, when: str) -> dict[str, Any]:
        return _segment("track", msg, user, when, event=event)

    def view(
        self, msg: AnyMessage, kind: View, user: str, name: str, event: str, when: str
    ) -> dict[str, Any]:
        return _segment(kind, msg, user, when, name=name)

    def label(self, path: str) -> str:
        return "segment"

    def kind(self, path: str, body: bytes) -> Kind:
        kind = msgspec.json.decode(body).get("type")
        return kind if kind in ("identify", "group") else "track"


_V2_PATHS: dict[Kind, str] = {k: f"/v2/{k}" for k in ("identify", "group", "track")}
DIALECTS: dict[Api, Dialect] = {"v2": V2(), "segment": SegmentApi()}


def dialect(api: Api) -> Dialect:
    return DIALECTS[api]


def spoken_at(path: str) -> Dialect:
    """The dialect a queued call to `path` was written in: its source's dialect when it was
    queued, which is what its body follows (a source may have changed `api` since)."""
    return DIALECTS["segment" if path == SEGMENT_PATH else "v2"]


def upstream(source: Source) -> Upstream:
    return DIALECTS[source.api].upstream(source)


def call_kind(path: str | None, body: bytes) -> Kind:
    """The kind of a call as it was queued (a call without a path counts as track)."""
    return "track" if path is None else spoken_at(path).kind(path, body)


def _present(**fields: Any) -> dict[str, Any]:
    # Optional fields are left out rather than sent as null.
    return {k: v for k, v in fields.items() if v is not None}


def _segment(type: str, msg: AnyMessage, user: str | None, when: str, **fields: Any) -> dict[str, Any]:
    """The body Segment's own Accoil destination sends to `/segment`."""
    return _present(type=type, userId=user, anonymousId=anonymous_id(msg), timestamp=when, **fields)
