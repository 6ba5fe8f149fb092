"""Dead letters: the same fault repeated is one letter with a count (DESIGN 3).

A letter marked `grouped` (a message whose own content is at fault: invalid, anonymous
only) joins the open letter of its (source, stage, reason), one not replayed yet, whose
`repeat` counts the occurrences; the first payload stands for all. Other letters are each
kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec

from gateway.store.base import DeadLetter

GroupKey = tuple[str, str, str]  # source, stage, reason


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
