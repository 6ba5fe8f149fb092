"""The envelope a message travels in from the router to its account's actor.

A module of its own, never compiled (`gateway.build`): mypyc drops the keywords of a class
statement (python/mypy#21938), so a compiled module cannot define this Struct with
`gc=False`. Its annotations are imported at run time: msgspec resolves them from here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from gateway.segment import Message


class Envelope(msgspec.Struct, gc=False):
    """A message on its way to its account's actor, with what the router worked out."""

    key: bytes  # its dedupe key (`gateway.keys.dedupe_key`)
    message: Message
    timestamp: datetime  # when it happened (`effective_timestamp`): timezone-aware UTC
    context: dict[str, Any] | None
    integrations: dict[str, Any] | None  # the batch's merged under the message's
    user: str | None  # `user_id(message)`
