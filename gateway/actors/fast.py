"""gateway/_route.c, where it was built: a record's ledger hits taken in C.

`take_counted` does for the track, page and screen calls of a stored record what the
router, the dispatcher's `_deliver` and the actors' `_take` do for them in Python (docs/
internals.md "The compiled take"); it takes a record whole or not at all (None), and leaves
identify, group and alias calls to the Python path. `user_ids` is `user_id` over a list.
Without a C compiler at install the extension is not built: `TAKE` is None and the Python
path routes every record, with the same outcome (tests/unit/test_route_kernel.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

import msgspec

from gateway.actors.actor import Actor
from gateway.compiled import load
from gateway.rules.ledger import Latest, LedgerKey
from gateway.segment import (
    AnyMessage,
    Context,
    CountedCall,
    GroupCall,
    StoredPage,
    StoredScreen,
    StoredTrack,
    ViewProperties,
    user_id,
)

# (messages, dedupe prefix, known accounts, source id, partition, live actors, actors
# holding state, clock, activate) -> the positions left to Python, or None
Take = Callable[
    [list[Any], bytes, dict[str, str | None], str, int, dict[tuple[str, str, int], Actor],
     list[Actor], float, Callable[[str], Actor]],
    list[int] | None,
]


def _compiled() -> tuple[Take, Callable[[list[Any]], list[str | None]]] | None:
    route = load("_route")
    if route is None:
        return None
    route.setup(StoredTrack, StoredPage, StoredScreen, CountedCall, GroupCall, Context,
                ViewProperties, UTC, msgspec.UNSET, LedgerKey, Latest, Actor)
    return route.take_counted, route.user_ids


_kernel = _compiled()
TAKE: Take | None = None if _kernel is None else _kernel[0]


def user_ids(messages: Sequence[AnyMessage]) -> list[str | None]:
    """Each message's `user_id`."""
    if _kernel is not None and isinstance(messages, list):
        return _kernel[1](messages)
    return [user_id(m) for m in messages]
