"""The backlog counters, shared by ingest and the pipeline through a mapped file."""

from __future__ import annotations

from pathlib import Path

from gateway.backlog import Backlog


def test_counters_in_memory() -> None:
    b = Backlog(100)
    b.accepted(10)
    b.applied(4, 3)
    assert (b.inbox, b.outbox, b.total, b.full) == (6, 3, 9, False)
    b.sent(5)  # more than queued (a grown track row) never goes below zero
    assert b.outbox == 0
    b.accepted(100)
    assert b.full


def test_two_processes_see_one_backlog(tmp_path: Path) -> None:
    ingest = Backlog(1000, tmp_path / "backlog")
    pipeline = Backlog(1000, tmp_path / "backlog")
    try:
        pipeline.resync(inbox=7, outbox=2)  # what the store held at start
        ingest.accepted(100)
        assert ingest.inbox == 107 and ingest.outbox == 2
        pipeline.applied(50, 20)
        assert (ingest.inbox, ingest.outbox) == (57, 22)
        pipeline.sent(22)
        assert ingest.total == 57
        # a replay: the pipeline recounts from the store, whatever ingest added meanwhile
        pipeline.resync(inbox=60, outbox=5)
        assert (ingest.inbox, ingest.outbox) == (60, 5)
    finally:
        ingest.close()
        pipeline.close()
    # a restart reuses the file: the pipeline's resync makes the numbers right again
    again = Backlog(1000, tmp_path / "backlog")
    again.resync(inbox=0, outbox=0)
    assert again.total == 0
    again.close()
