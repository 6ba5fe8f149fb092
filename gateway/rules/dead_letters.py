"""Dead letters: the same fault repeated is one letter with a count (DESIGN 3).

A letter marked `grouped` (a message whose own content is at fault: invalid, anonymous
only) joins the open letter of its (source, stage, reason), one not replayed yet, whose
`repeat` counts the occurrences; the first payload stands for all. Other letters are each
kept. `DeadLetter` is the record the router, the actors and the forwarder make and the
store keeps (`gateway.store` names it too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Literal

import msgspec

Stage = Literal["ingest", "mapping", "forward"]
GroupKey = tuple[str, str, str]  # source, stage, reason


class DeadLetter(msgspec.Struct, kw_only=True):
    """Something that could not be taken or forwarded, kept with the reason."""

    source: str
    stage: Stage
    reason: str
    payload: bytes  # the message (ingest, mapping) or the call body (forward), as JSON
    status: int | None = None
    path: str | None = None
    # forward stage: how many occurrences of the call this stands for; grouped letters: how
    # many messages with this reason
    repeat: int = 1
    account: str | None = None
    # one letter per (source, stage, reason) while not replayed: for messages whose own
    # content is at fault (invalid, anonymous-only), which a browser can send without end
    grouped: bool = False
    # a dedupe key (`gateway.keys`): kept once, however often its message is routed
    key: bytes | None = None


def group(
    letters: list[DeadLetter], open_groups: Mapping[GroupKey, int]
) -> tuple[list[DeadLetter], Counter[int]]:
    """The letters to keep as new ones, and the occurrences that join open letters (by id)."""
    new: list[DeadLetter] = []
    firsts: dict[GroupKey, int] = {}  # a group opened by this call: its index in `new`
    joins: Counter[int] = Counter()
    for letter in letters:
        if not letter.grouped:
            new.append(letter)
            continue
        key = (letter.source, letter.stage, letter.reason)
        if key in open_groups:
            joins[open_groups[key]] += letter.repeat
        elif key in firsts:
            first = new[firsts[key]]
            new[firsts[key]] = msgspec.structs.replace(first, repeat=first.repeat + letter.repeat)
        else:
            firsts[key] = len(new)
            new.append(letter)
    return new, joins


def group_keys(letters: list[DeadLetter]) -> set[GroupKey]:
    return {(d.source, d.stage, d.reason) for d in letters if d.grouped}
