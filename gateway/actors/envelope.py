"""The envelope a message travels in from the router to its account's actor.

A module of its own so that the actors' modules define no class with keywords: mypyc drops
them (python/mypy#21938), and `scripts/bench_apply.py` compiles those modules to measure
what compiling would buy (BENCHMARKS.md: no-go). Its annotations are imported at run time:
msgspec resolves them from here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from gateway.segment import AnyMessage, Context


class Envelope(msgspec.Struct, gc=False):
    """A message on its way to its account's actor, with what the router worked out."""

    key: bytes  # its dedupe key (`gateway.keys.dedupe_key`)
    # as apply reads it (`decode_stored`), or in full: from ingest in the same process, and
    # whenever it may become a dead letter, which keeps the message in full
    message: AnyMessage
    timestamp: datetime  # when it happened (`effective_timestamp`): timezone-aware UTC
    context: dict[str, Any] | Context | None  # the batch's merged under the message's
    integrations: dict[str, Any] | None  # the batch's merged under the message's
    user: str | None  # `user_id(message)`
