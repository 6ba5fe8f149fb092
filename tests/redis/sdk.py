"""Segment SDK traffic for the scale-out tests: analytics-python clients, one per gateway,
and the ledger they should leave in Accoil.

Every message has a messageId of its own, so a re-send (an SDK retry, or the same batch
sent again through another gateway, as a load balancer would route a retry) must be
dropped by dedupe, and Accoil's count per (user, event, day) must equal what was sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mock_accoil.server import MockAccoilClient
from tests.redis.fleet import WRITE_KEY
from tests.reliability.reliability_support import API_KEY


@dataclass(frozen=True)
class Message:
    message_id: str
    user: str
    account: str
    event: str


def messages(count: int, *, users: int, accounts: int, tag: str) -> list[Message]:
    """Track events with unique messageIds; half share a few names (they add up in one
    ledger row), half have a name of their own (a count of 2 anywhere is a double count)."""
    return [
        Message(f"{tag}-{i}", f"user-{i % users}", f"acct-{(i // users) % accounts}",
                f"Shared {i % 4}" if i % 2 else f"Unique {tag}-{i}")
        for i in range(count)
    ]


class Sdk:
    """One analytics-python client sending to one gateway, in its own thread (as in an
    app), with few and quick retries: a batch it gives up on lands in `failed`, to be sent
    again elsewhere."""

    def __init__(self, url: str) -> None:
        from segment.analytics.client import Client

        self.failed: list[Message] = []
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._by_id: dict[str, Message] = {}
        self.client = Client(
            WRITE_KEY, host=url, upload_size=25, upload_interval=0.05, max_retries=2,
            max_total_backoff_duration=3, timeout=5, on_error=self._on_error)

    def _on_error(self, error: Exception, batch: list[dict[str, Any]]) -> None:
        with self._lock:
            self.errors.append(error)
            self.failed.extend(self._by_id[m["messageId"]] for m in batch)

    def send(self, msg: Message) -> None:
        with self._lock:
            self._by_id[msg.message_id] = msg
        self.client.track(msg.user, msg.event, {"n": 1}, context={"groupId": msg.account},
                          message_id=msg.message_id)

    def flush(self) -> None:
        """Until every queued message was sent, or given up on."""
        self.client.flush()

    def close(self) -> None:
        self.client.join()


def counted(sent: list[Message]) -> Counter[tuple[str, str]]:
    """What Accoil must count per (user, event): each messageId once."""
    unique = {m.message_id: m for m in sent}
    return Counter((m.user, m.event) for m in unique.values())


def observed(mock: MockAccoilClient) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for row in mock.counts(api_key=API_KEY):
        out[(row["userId"], row["event"])] += int(row["count"])
    return out


def difference(
    expected: Counter[tuple[str, str]], seen: Counter[tuple[str, str]]
) -> tuple[int, int]:
    """(events lost, events counted twice or more)."""
    lost = sum(max(0, n - seen[k]) for k, n in expected.items())
    doubled = sum(max(0, n - expected[k]) for k, n in seen.items())
    return lost, doubled
