"""Where a source's calls go, and the Authorization header they carry."""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from gateway.config import DEFAULT_BASE_URL, Source

STAGING_BASE_URL = "https://instaging.accoil.com"
_STAGING_PREFIX = "stg_"


class Upstream(msgspec.Struct, frozen=True):
    base_url: str  # no trailing slash
    authorization: str  # the full Authorization header value: a secret

    def __repr__(self) -> str:
        return f"Upstream(base_url={self.base_url!r}, authorization=<redacted>)"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # msgspec's own __rich_repr__ would list the header value.
        return [("base_url", self.base_url), ("authorization", "<redacted>")]


def upstream(source: Source) -> Upstream:
    """v2: `Basic <API_KEY>`. segment: `Basic base64(API_KEY + ":")`, and a `stg_` key
    (any case) goes to Accoil's staging host, prefix stripped, unless the source sets
    its own base URL."""
    key = source.accoil_api_key
    base_url = source.base_url.rstrip("/")
    if source.api == "v2":
        return Upstream(base_url=base_url, authorization=f"Basic {key}")
    if key[: len(_STAGING_PREFIX)].lower() == _STAGING_PREFIX and base_url == DEFAULT_BASE_URL:
        key = key[len(_STAGING_PREFIX) :]
        base_url = STAGING_BASE_URL
    token = base64.b64encode(f"{key}:".encode()).decode("ascii")
    return Upstream(base_url=base_url, authorization=f"Basic {token}")
