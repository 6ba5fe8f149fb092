# gateway/_route.c: a record's ledger hits taken in C (gateway/actors/fast.py)
from collections.abc import Callable
from typing import Any

def setup(
    track: type, page: type, screen: type, counted: type, group: type, context: type,
    view_properties: type, utc: Any, unset: Any, ledger_key: type, latest: type, actor: type,
) -> None: ...
# the positions of the messages left to Python, or None: nothing taken
def take_counted(
    messages: list[Any], prefix: bytes, known: dict[str, str | None], source_id: str,
    partition: int, live: dict[tuple[str, str, int], Any], holding: list[Any], clock: float,
    activate: Callable[[str], Any],
) -> list[int] | None: ...
def user_ids(messages: list[Any]) -> list[str | None]: ...
def dedupe_key(prefix: bytes, message_id: str) -> bytes: ...
def blake2b_16(data: bytes) -> bytes: ...
