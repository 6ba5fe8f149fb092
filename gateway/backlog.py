"""How much accepted work is not yet forwarded: the bound behind ingest's 503."""

from __future__ import annotations


class Backlog:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inbox = 0  # messages accepted, not yet applied by an actor
        self.outbox = 0  # upstream calls queued, not yet delivered or dead-lettered
        self.requests = 0  # ingest requests being served right now

    @property
    def ingest_first(self) -> bool:
        """Requests are arriving and the inbox has room: routing should give way to ingest."""
        return self.requests > 0 and self.inbox < self.limit // 2

    @property
    def total(self) -> int:
        return self.inbox + self.outbox

    @property
    def full(self) -> bool:
        return self.total >= self.limit

    def accepted(self, messages: int) -> None:
        self.inbox += messages

    def applied(self, messages: int, calls: int) -> None:
        self.inbox = max(0, self.inbox - messages)
        self.outbox += calls

    def sent(self, calls: int = 1) -> None:
        self.outbox = max(0, self.outbox - calls)
