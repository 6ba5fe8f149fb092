"""The SQLite store: ledger, dedupe, outbox and dead letters, each commit atomic."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from gateway.store import CallPut, DeadLetter, Flush, Known, SqliteStore, TrackHit


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    yield s
    await s.close()


def hit(mid: str, *, user: str = "u1", event: str = "Clicked", ts: str = "2026-11-28T10:00:00.000Z") -> TrackHit:
    body = {"userId": user, "event": event, "timestamp": ts}
    return TrackHit(mid, ts[:10], user, event, ts, "/v2/track", body)


async def test_accept_commits_an_inbox_row_in_its_own_file(store: SqliteStore) -> None:
    row = await store.accept("s", 1.0, b'{"batch":[]}', 3)
    rows = await store.inbox_after(0, 10)
    assert [(r.id, r.source, r.count, r.body) for r in rows] == [(row, "s", 3, b'{"batch":[]}')]
    assert (await store.counts()).inbox == 3
    with sqlite3.connect(store.inbox_path) as conn:
        assert conn.execute("SELECT id, count FROM inbox").fetchall() == [(row, 3)]


async def test_dead_letters_with_a_key_are_kept_once(store: SqliteStore) -> None:
    letter = DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"x":1}', key="k1")
    other = DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"x":2}', key="k2")
    for _ in range(2):
        await store.flush(Flush(source="s", account="", track_mode="exact", dead=[letter, other]))
    letters = await store.dead_letters(None, 0, 10, False)
    assert [d.payload for d in letters] == [b'{"x":1}', b'{"x":2}']


async def test_concurrent_accepts_share_commits_and_all_land(store: SqliteStore) -> None:
    ids = await asyncio.gather(*(store.accept("s", 1.0, b"{}", 1) for _ in range(200)))
    assert len(set(ids)) == 200
    assert len(await store.inbox_after(0, 1000)) == 200


async def test_flush_counts_each_message_id_once(store: SqliteStore) -> None:
    f = Flush(source="s", account="acme", track_mode="exact", tracks=[hit("m1"), hit("m2"), hit("m1")])
    result = await store.flush(f)
    assert (result.counted, result.duplicates, result.calls) == (2, 1, 2)
    again = await store.flush(Flush(source="s", account="acme", track_mode="exact", tracks=[hit("m2")]))
    assert (again.counted, again.duplicates, again.calls) == (0, 1, 0)
    # the same id in another source is another message
    other = await store.flush(Flush(source="t", account="acme", track_mode="exact", tracks=[hit("m1")]))
    assert other.counted == 1
    ledger = await store.ledger("s", None)
    assert [(r["userId"], r["account"], r["event"], r["count"]) for r in ledger] == [
        ("u1", "acme", "Clicked", 2)
    ]
    due = await store.due("s", 1e12, 10)
    assert len(due) == 1 and due[0].repeat == 2


async def test_exact_mode_keeps_latest_timestamp_and_adds_repeats(store: SqliteStore) -> None:
    late, early = "2026-11-28T12:00:00.000Z", "2026-11-28T09:00:00.000Z"
    await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("1", ts=late)]))
    await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("2", ts=early)]))
    (item,) = await store.due("s", 1e12, 10)
    assert item.repeat == 2
    assert msgspec.json.decode(item.body)["timestamp"] == late


async def test_daily_unique_queues_one_call_per_key_and_day(store: SqliteStore) -> None:
    day2 = "2026-11-29T01:00:00.000Z"
    for mid in ("1", "2", "3"):
        await store.flush(Flush(source="s", account="a", track_mode="daily-unique", tracks=[hit(mid)]))
    await store.flush(Flush(source="s", account="a", track_mode="daily-unique", tracks=[hit("4", ts=day2)]))
    due = await store.due("s", 1e12, 10)
    assert sorted(i.repeat for i in due) == [1, 1]
    counts = await store.counts()
    assert (counts.ledger_rows, counts.ledger_events, counts.outbox) == (2, 4, 2)


async def test_delivered_decrements_track_rows_and_removes_them(store: SqliteStore) -> None:
    await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("1"), hit("2")]))
    (item,) = await store.due("s", 1e12, 10)
    await store.delivered(item)
    (left,) = await store.due("s", 1e12, 10)
    assert left.repeat == 1
    await store.delivered(item)
    assert await store.due("s", 1e12, 10) == []
    assert (await store.counts()).outbox == 0


async def test_identify_calls_merge_traits_while_unsent(store: SqliteStore) -> None:
    body1 = {"userId": "u", "traits": {"a": 1, "b": 1}, "timestamp": "t1"}
    body2 = {"userId": "u", "traits": {"b": 2}, "timestamp": "t2"}
    r1 = await store.flush(Flush(source="s", account="a", track_mode="exact",
                                 calls=[CallPut("i\x1fu", "identify", "/v2/identify", body1)]))
    (first,) = await store.due("s", 1e12, 10)
    r2 = await store.flush(Flush(source="s", account="a", track_mode="exact",
                                 calls=[CallPut("i\x1fu", "identify", "/v2/identify", body2)]))
    assert (r1.calls, r2.calls) == (1, 0)
    (item,) = await store.due("s", 1e12, 10)
    assert msgspec.json.decode(item.body) == {"userId": "u", "traits": {"a": 1, "b": 2}, "timestamp": "t2"}
    # delivering the older version leaves the newer one queued
    await store.delivered(first)
    (still,) = await store.due("s", 1e12, 10)
    assert still.version == item.version
    await store.delivered(still)
    assert await store.due("s", 1e12, 10) == []


async def test_retry_postpones_and_reject_dead_letters(store: SqliteStore) -> None:
    await store.flush(Flush(source="s", account="acme", track_mode="exact", tracks=[hit("1"), hit("2")]))
    (item,) = await store.due("s", 1e12, 10)
    await store.retry(item, 5e11, "server_error")
    assert await store.due("s", 1e11, 10) == []
    (again,) = await store.due("s", 1e12, 10)
    assert again.attempts == 1
    await store.reject(again, 400, "Accoil answered 400: bad")
    assert await store.due("s", 1e12, 10) == []
    (letter,) = await store.dead_letters("s", 0, 10, False)
    assert (letter.stage, letter.status, letter.repeat, letter.account) == ("forward", 400, 2, "acme")


async def test_replay_requeues_calls_and_messages(store: SqliteStore) -> None:
    await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("1")]))
    (item,) = await store.due("s", 1e12, 10)
    await store.reject(item, 422, "no")
    await store.flush(Flush(source="s", account="", track_mode="exact", dead=[
        DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"type":"track"}'),
        DeadLetter(source="s", stage="ingest", reason="not json", payload=b"\xff{"),
    ]))
    assert await store.replay(None, "s", 10.0) == 2
    (requeued,) = await store.due("s", 1e12, 10)
    assert (requeued.kind, requeued.repeat) == ("track", 1)
    (row,) = await store.inbox_after(0, 10)
    assert msgspec.json.decode(row.body) == {"batch": [{"type": "track"}]}
    left = await store.dead_letters("s", 0, 10, False)
    assert [d.reason for d in left] == ["not json"]


async def test_flush_completes_inbox_rows_reap_deletes_them_restart_resets_them(
    store: SqliteStore,
) -> None:
    row = await store.accept("s", 1.0, b"{}", 3)
    done = await store.accept("s", 1.0, b"{}", 1)
    store.take(row, 3)
    store.take(done, 1)
    await store.flush(
        Flush(source="s", account="a", track_mode="exact", inbox={row: 2, done: 1})
    )
    assert (await store.counts()).inbox == 1
    # a row wholly applied is gone after a restart; one partly applied is pending again
    await store.restart_inbox()
    assert [r.id for r in await store.inbox_after(0, 10)] == [row]
    assert (await store.counts()).inbox == 3
    store.take(row, 3)
    await store.flush(Flush(source="s", account="a", track_mode="exact", inbox={row: 3}))
    assert (await store.counts()).inbox == 0
    assert [r.id for r in await store.inbox_after(0, 10)] == [row]  # until reaped
    assert await store.reap() == 1
    assert await store.inbox_after(0, 10) == []
    assert await store.reap() == 0


async def test_known_traits_and_accounts(store: SqliteStore) -> None:
    await store.flush(Flush(source="s", account="g1", track_mode="exact",
                            known=[Known("i\x1fu", "2026-11-28", {"plan": "pro"})],
                            accounts=[("u", "g1")]))
    assert await store.known("s", ["i\x1fu", "i\x1fv"], "2026-11-28") == {"i\x1fu": {"plan": "pro"}}
    assert await store.known("s", ["i\x1fu"], "2026-11-29") == {}
    assert await store.accounts_of("s", ["u", "v"]) == {"u": "g1"}


async def test_a_failing_op_does_not_undo_its_neighbours(store: SqliteStore) -> None:
    async def bad() -> None:
        await store._write(lambda conn: conn.execute("INSERT INTO nope VALUES (1)"))

    good = store.accept("s", 1.0, b"{}", 1)
    results = await asyncio.gather(bad(), good, return_exceptions=True)
    assert isinstance(results[0], sqlite3.OperationalError)
    assert isinstance(results[1], int)
    assert len(await store.inbox_after(0, 10)) == 1


async def test_state_survives_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    await s.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("m1")]))
    await s.close()
    s2 = SqliteStore(tmp_path / "g.db")
    await s2.open()
    try:
        r = await s2.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("m1")]))
        assert r.duplicates == 1
        assert (await s2.counts()).outbox == 1
    finally:
        await s2.close()


async def test_prune_forgets_old_message_ids(store: SqliteStore) -> None:
    await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("m1")], now=100.0))
    assert await store.prune(200.0) >= 1
    r = await store.flush(Flush(source="s", account="a", track_mode="exact", tracks=[hit("m1")], now=300.0))
    assert r.duplicates == 0
