"""The SQLite store under a dispatcher turn: ledger, dedupe, outbox and dead letters, each
turn atomic; and the forwarder's and admin's sides of the store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.actors.turn import Flush, Outcome, PendingCall, commit
from gateway.config import TrackMode
from gateway.keys import dedupe_key, dedupe_prefix, identify_key
from gateway.rules.ledger import Hit, LedgerKey, count
from gateway.rules.traits import Pending
from gateway.store import DeadLetter, Known, SqliteStore, Turn, window
from gateway.store import sqlite as sqlite_store


def hit(
    mid: str, *, source: str = "s", account: str = "acme", user: str = "u1",
    event: str = "Clicked", ts: str = "2026-11-28T10:00:00.000Z",
) -> tuple[bytes, Hit]:
    body = {"userId": user, "event": event, "timestamp": ts}
    key = LedgerKey(source, ts[:10], user, account, event)
    return dedupe_key(dedupe_prefix(source), mid), Hit(key, ts, "/v2/track", body)


def identify(source: str, user: str, traits: dict[str, Any], ts: str) -> PendingCall:
    body = {"userId": user, "timestamp": ts}
    p = Pending("identify", "/v2/identify", body, ts)
    p.merge("/v2/identify", body, traits, ts)
    return PendingCall(source, "a", identify_key(user), p)


async def flush(
    store: SqliteStore,
    *,
    tracks: Sequence[tuple[bytes, Hit]] = (),
    calls: Sequence[PendingCall] = (),
    dead: Sequence[DeadLetter] = (),
    inbox: dict[int, int] | None = None,
    mode: TrackMode = "exact",
    now: float | None = None,
) -> Outcome:
    f = Flush({"s": mode, "t": mode}, lambda key: None)
    for key, h in tracks:
        f.hit_keys.append(key)
        f.hit_refs.append(h.key)
        count(f.tallies, *h)
    f.calls += calls
    f.dead += dead
    f.inbox = inbox or {}

    return await store.transact(lambda tx: commit(f, tx), now)


async def test_accept_appends_an_inbox_record(store: SqliteStore) -> None:
    row = await store.accept("s", 1.0, b'{"batch":[]}', 3)
    rows = await store.inbox_after(0, 10)
    assert [(r.id, r.source, r.count, r.body) for r in rows] == [(row, "s", 3, b'{"batch":[]}')]
    assert (await store.counts()).inbox == 3
    assert [p.name for p in store.inbox.dir.iterdir()] == [f"{row:020d}.log"]


async def test_dead_letters_with_a_key_are_kept_once(store: SqliteStore) -> None:
    k1, k2 = dedupe_key(b"s", "k1"), dedupe_key(b"s", "k2")
    letter = DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"x":1}', key=k1)
    other = DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"x":2}', key=k2)
    for _ in range(2):
        await flush(store, dead=[letter, other])
    letters = await store.dead_letters(None, 0, 10, False)
    assert [d.payload for d in letters] == [b'{"x":1}', b'{"x":2}']


async def test_the_same_reason_repeated_is_one_grouped_letter(store: SqliteStore) -> None:
    def anon(i: int, reason: str = "userId is required to forward a track call",
             source: str = "web") -> DeadLetter:
        return DeadLetter(source=source, stage="mapping", reason=reason, grouped=True,
                          payload=b'{"anonymousId":"a%d"}' % i, account=f"a{i}")

    await flush(store, dead=[anon(i) for i in range(50)], now=100.0)
    await flush(store, dead=[anon(50), anon(51, reason="groupId is required")], now=200.0)
    await flush(store, dead=[anon(52, source="app")], now=200.0)
    # not grouped (a removed source's messages, forward-stage calls): each kept
    single = DeadLetter(source="web", stage="mapping", payload=b"{}",
                        reason="userId is required to forward a track call")
    await flush(store, dead=[single, single], now=200.0)
    letters = await store.dead_letters(None, 0, 10, False)
    rows = [(d.source, d.reason[:7], d.repeat, d.payload, d.created_at, d.last_at) for d in letters]
    assert rows == [
        ("web", "userId ", 51, b'{"anonymousId":"a0"}', 100.0, 200.0),
        ("web", "groupId", 1, b'{"anonymousId":"a51"}', 200.0, 200.0),
        ("app", "userId ", 1, b'{"anonymousId":"a52"}', 200.0, 200.0),
        ("web", "userId ", 1, b"{}", 200.0, 200.0),
        ("web", "userId ", 1, b"{}", 200.0, 200.0),
    ]
    assert (await store.counts()).dead_letters == 5
    # once replayed, the same reason starts a new letter
    await store.requeue([(letters[0].id, None)], 300.0)
    await flush(store, dead=[anon(60)], now=300.0)
    fresh = await store.dead_letters("web", letters[-1].id, 10, False)
    assert [(d.repeat, d.payload) for d in fresh] == [(1, b'{"anonymousId":"a60"}')]


async def test_dead_letters_are_pruned_after_their_last_occurrence(store: SqliteStore) -> None:
    def letter(reason: str) -> DeadLetter:
        return DeadLetter(source="s", stage="ingest", reason=reason, payload=b"{}", grouped=True)

    await flush(store, dead=[letter("old"), letter("recurring")], now=100.0)
    await flush(store, dead=[letter("recurring")], now=1000.0)
    assert await store.prune_dead_letters(500.0) == 1
    (kept,) = await store.dead_letters(None, 0, 10, True)
    assert (kept.reason, kept.repeat, kept.created_at, kept.last_at) == ("recurring", 2, 100.0, 1000.0)
    assert await store.prune_dead_letters(1000.5) == 1
    assert await store.dead_letters(None, 0, 10, True) == []


async def test_a_data_directory_from_before_grouping_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,"
        " stage TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL, status INTEGER,"
        " path TEXT, repeat INTEGER NOT NULL, account TEXT, created_at REAL NOT NULL,"
        " replayed_at REAL)"
    )
    conn.execute("INSERT INTO dead_letters (source, stage, reason, payload, repeat, created_at)"
                 " VALUES ('s', 'mapping', 'r', '{}', 1, 50.0)")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        (old,) = await store.dead_letters(None, 0, 10, False)
        assert (old.created_at, old.last_at) == (50.0, 50.0)
        await flush(store, now=60.0, dead=[
            DeadLetter(source="s", stage="mapping", reason="r", payload=b"{}", grouped=True)])
        # a letter from before grouping is never joined; new ones group among themselves
        old, new = await store.dead_letters(None, 0, 10, False)
        assert (old.repeat, old.last_at, new.repeat, new.last_at) == (1, 50.0, 1, 60.0)
        assert await store.prune_dead_letters(55.0) == 1
    finally:
        await store.close()


async def test_concurrent_accepts_share_commits_and_all_land(store: SqliteStore) -> None:
    ids = await asyncio.gather(*(store.accept("s", 1.0, b"{}", 1) for _ in range(200)))
    assert len(set(ids)) == 200
    assert len(await store.inbox_after(0, 1000)) == 200


async def test_a_turn_counts_each_message_id_once(store: SqliteStore) -> None:
    result = await flush(store, tracks=[hit("m1"), hit("m2"), hit("m1")])
    assert (result.counted, result.duplicates["s"], result.calls["s"]) == (2, 1, 2)
    again = await flush(store, tracks=[hit("m2")])
    assert (again.counted, again.duplicates["s"], again.calls["s"]) == (0, 1, 0)
    # the same id in another source is another message
    other = await flush(store, tracks=[hit("m1", source="t")])
    assert other.counted == 1
    ledger = await store.ledger("s", None)
    assert [(r["userId"], r["account"], r["event"], r["count"]) for r in ledger] == [
        ("u1", "acme", "Clicked", 2)
    ]
    due = await store.due("s", 1e12, 10)
    assert len(due) == 1 and due[0].repeat == 2


async def test_exact_mode_keeps_latest_timestamp_and_adds_repeats(store: SqliteStore) -> None:
    late, early = "2026-11-28T12:00:00.000Z", "2026-11-28T09:00:00.000Z"
    await flush(store, tracks=[hit("1", ts=late)])
    await flush(store, tracks=[hit("2", ts=early)])
    (item,) = await store.due("s", 1e12, 10)
    assert item.repeat == 2
    assert msgspec.json.decode(item.body)["timestamp"] == late
    (row,) = await store.ledger("s", None)
    assert (row["count"], row["lastTimestamp"]) == (2, late)


async def test_daily_unique_queues_one_call_per_key_and_day(store: SqliteStore) -> None:
    day2 = "2026-11-29T01:00:00.000Z"
    for mid in ("1", "2", "3"):
        await flush(store, tracks=[hit(mid)], mode="daily-unique")
    await flush(store, tracks=[hit("4", ts=day2), hit("5", ts=day2)], mode="daily-unique")
    due = await store.due("s", 1e12, 10)
    assert sorted(i.repeat for i in due) == [1, 1]
    counts = await store.counts()
    assert (counts.ledger_rows, counts.ledger_events, counts.outbox) == (2, 5, 2)


async def test_delivered_decrements_track_rows_and_removes_them(store: SqliteStore) -> None:
    await flush(store, tracks=[hit("1"), hit("2")])
    (item,) = await store.due("s", 1e12, 10)
    await store.delivered(item)
    (left,) = await store.due("s", 1e12, 10)
    assert left.repeat == 1
    await store.delivered(item)
    assert await store.due("s", 1e12, 10) == []
    assert (await store.counts()).outbox == 0


async def test_identify_calls_merge_traits_while_unsent(store: SqliteStore) -> None:
    r1 = await flush(store, calls=[identify("s", "u", {"a": 1, "b": 1}, "2026-11-28T01:00:00.000Z")])
    (first,) = await store.due("s", 1e12, 10)
    r2 = await flush(store, calls=[identify("s", "u", {"b": 2}, "2026-11-28T02:00:00.000Z")])
    assert (r1.calls["s"], r2.calls["s"]) == (1, 0)
    (item,) = await store.due("s", 1e12, 10)
    assert msgspec.json.decode(item.body) == {
        "userId": "u", "traits": {"a": 1, "b": 2}, "timestamp": "2026-11-28T02:00:00.000Z"
    }
    # delivering the older version leaves the newer one queued
    await store.delivered(first)
    (still,) = await store.due("s", 1e12, 10)
    assert still.version == item.version
    await store.delivered(still)
    assert await store.due("s", 1e12, 10) == []
    # the same traits again that day: nothing to send; another day: sent again
    r3 = await flush(store, calls=[identify("s", "u", {"b": 2}, "2026-11-28T03:00:00.000Z")])
    assert r3.suppressed[("s", "identify")] == 1 and await store.due("s", 1e12, 10) == []
    r4 = await flush(store, calls=[identify("s", "u", {"b": 2}, "2026-11-29T03:00:00.000Z")])
    assert r4.calls["s"] == 1


async def test_retry_postpones_and_reject_dead_letters(store: SqliteStore) -> None:
    await flush(store, tracks=[hit("1"), hit("2")])
    (item,) = await store.due("s", 1e12, 10)
    await store.retry(item, 5e11, "server_error")
    assert await store.due("s", 1e11, 10) == []
    (again,) = await store.due("s", 1e12, 10)
    assert again.attempts == 1
    await store.reject(again, 400, "Accoil answered 400: bad")
    assert await store.due("s", 1e12, 10) == []
    (letter,) = await store.dead_letters("s", 0, 10, False)
    assert (letter.stage, letter.status, letter.repeat, letter.account) == ("forward", 400, 2, "acme")


async def test_requeue_puts_calls_back_and_marks_letters(store: SqliteStore) -> None:
    await flush(store, tracks=[hit("1")])
    (item,) = await store.due("s", 1e12, 10)
    await store.reject(item, 422, "no")
    await flush(store, dead=[
        DeadLetter(source="s", stage="ingest", reason="bad", payload=b'{"type":"track"}'),
    ])
    letters = await store.replayable(None, "s")
    assert [d.stage for d in letters] == ["forward", "ingest"]
    assert [d.id for d in await store.replayable([letters[1].id], None)] == [letters[1].id]
    requeue = [(letters[0].id, "track"), (letters[1].id, None)]
    assert await store.requeue(requeue, 10.0) == 2
    assert await store.requeue(requeue, 10.0) == 0  # once
    (requeued,) = await store.due("s", 1e12, 10)
    assert (requeued.kind, requeued.repeat) == ("track", 1)
    assert await store.dead_letters("s", 0, 10, False) == []
    assert await store.replayable(None, None) == []


async def test_flush_completes_inbox_records_restart_and_reap(store: SqliteStore) -> None:
    store.inbox.segment_bytes = 1  # a segment a record
    row = await store.accept("s", 1.0, b"{}", 3)
    done = await store.accept("s", 1.0, b"{}", 1)
    newest = await store.accept("s", 1.0, b"{}", 1)
    store.take(row, 3)
    store.take(done, 1)
    await flush(store, inbox={row: 2, done: 1})
    assert (await store.counts()).inbox == 2  # one of row, and newest (not taken yet)
    # after a restart: a record partly applied is pending again; one wholly applied comes
    # back with nothing to route
    await store.restart_inbox()
    assert [(r.id, r.count) for r in await store.inbox_after(0, 10)] == [
        (row, 3), (done, 0), (newest, 1)
    ]
    assert (await store.counts()).inbox == 4
    store.take(row, 3)
    await flush(store, inbox={row: 3})
    # reaping stops at what the router has not taken since the start, and at a record
    # still pending; it never drops the newest segment
    assert await store.reap(taken=row) == 1
    assert [r.id for r in await store.inbox_after(0, 10)] == [done, newest]
    assert await store.reap(taken=done) == 1
    store.take(newest, 1)
    assert await store.reap(taken=newest) == 0  # taken, not applied
    await flush(store, inbox={newest: 1})
    assert await store.reap(taken=newest) == 1
    assert await store.inbox_after(0, 10) == []
    assert [p.name for p in store.inbox.dir.iterdir()] == [f"{newest + 1:020d}.log"]
    assert (await store.counts()).inbox == 0


async def test_a_refused_take_keeps_its_segment_until_it_is_recorded(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.inbox.segment_bytes = 1  # a segment a record
    row = await store.accept("s", 1.0, b"{}", 2)
    await store.accept("s", 1.0, b"{}", 1)  # the newest segment is never reaped
    real = sqlite_store._progress

    def refuse_takes(conn: sqlite3.Connection, row_id: int, change: int) -> None:
        if change > 0:
            raise sqlite3.OperationalError("database or disk is full")
        real(conn, row_id, change)

    monkeypatch.setattr(sqlite_store, "_progress", refuse_takes)
    with pytest.raises(sqlite3.OperationalError):
        await store.take(row, 2)
    monkeypatch.setattr(sqlite_store, "_progress", real)
    # the row's messages are in an actor, not flushed: its segment must stay
    assert await store.reap(taken=row) == 0
    await flush(store, inbox={row: 1})
    assert await store.reap(taken=row) == 0  # one of two flushed, and the take not recorded
    await flush(store, inbox={row: 1})
    assert await store.reap(taken=row) == 0  # all flushed, but the take is still missing
    await store.take(row, 2)  # made again, after the flushes: they add up in any order
    assert await store.reap(taken=row) == 1
    assert [r.id for r in await store.inbox_after(0, 10)] == [row + 1]


async def test_inbox_ids_continue_after_reopen_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    first = await s.accept("s", 1.0, b'{"batch":[1]}', 1)
    await s.accept("s", 1.0, b'{"batch":[2]}', 1)
    await s.close()
    (segment,) = s.inbox.dir.iterdir()
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # the last record torn, as by a crash mid-write
    s = SqliteStore(tmp_path / "g.db")
    await s.open()
    assert [r.body for r in await s.inbox_after(0, 10)] == [b'{"batch":[1]}']
    third = await s.accept("s", 1.0, b'{"batch":[3]}', 1)
    assert third == first + 1  # the torn record was never acknowledged: its id is free
    assert [r.body for r in await s.inbox_after(0, 10)] == [b'{"batch":[1]}', b'{"batch":[3]}']
    await s.close()


async def test_fsync_full_syncs_before_the_ack(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "g.db", fsync="full")
    await s.open()
    ids = await asyncio.gather(*(s.accept("s", 1.0, b"{}", 1) for _ in range(50)))
    assert ids == list(range(ids[0], ids[0] + 50))
    await s.close()


async def test_known_traits_and_accounts(store: SqliteStore) -> None:
    def script(tx: Turn) -> None:
        tx.state.put_known([Known("s", "i\x1fu", "2026-11-28", {"plan": "pro"})])
        tx.state.put_accounts([("s", "u", "g1")])

    await store.transact(script)
    found = await store.transact(lambda tx: tx.state.known([("s", "i\x1fu"), ("s", "i\x1fv")]))
    assert found == {("s", "i\x1fu"): Known("s", "i\x1fu", "2026-11-28", {"plan": "pro"})}
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
    await flush(s, tracks=[hit("m1")])
    await s.close()
    s2 = SqliteStore(tmp_path / "g.db")
    await s2.open()
    try:
        r = await flush(s2, tracks=[hit("m1")])
        assert r.duplicates["s"] == 1
        assert (await s2.counts()).outbox == 1
    finally:
        await s2.close()


async def test_dedupe_keys_are_kept_by_day_and_pruned_a_day_at_once(store: SqliteStore) -> None:
    day = 86400.0
    await flush(store, tracks=[hit("m1")], now=10 * day)
    await flush(store, tracks=[hit("m2")], now=11 * day + 5)
    assert (await flush(store, tracks=[hit("m1"), hit("m2")], now=12 * day)).counted == 0
    # the window ends inside day 11: day 10's keys go, day 11's stay
    assert await store.prune(11 * day + 100) >= 1
    again = await flush(store, tracks=[hit("m1"), hit("m2")], now=12 * day)
    assert (again.counted, again.duplicates["s"]) == (1, 1)


async def test_remember_names_exactly_the_keys_stored_before(store: SqliteStore) -> None:
    keys = [dedupe_key(b"s", f"message-{i}") for i in range(2000)]
    others = [dedupe_key(b"t", f"message-{i}") for i in range(10)]
    assert await store.transact(lambda tx: tx.state.remember(keys)) == set()
    found = await store.transact(lambda tx: tx.state.remember(keys[::100] + others))
    assert found == set(keys[::100])
    assert await store.transact(lambda tx: tx.state.remember(others)) == set(others)


async def test_dedupe_keys_survive_the_move_to_the_large_table(store: SqliteStore) -> None:
    store._dedupe.MERGE = 50  # move every 50 keys
    keys = [dedupe_key(b"s", f"m{i}") for i in range(120)]
    for i in range(0, 120, 30):
        assert await remember(store, keys[i : i + 30]) == set()
    assert await remember(store, keys) == set(keys)


async def remember(store: SqliteStore, keys: list[bytes], now: float | None = None) -> set[bytes]:
    return await store.transact(lambda tx: tx.state.remember(keys), now)


DAY = 20000 * 86400.0  # 2024-10-04, UTC


def dedupe_tables(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        names = [n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE name GLOB 'dedupe_*' ORDER BY name")]
        return {n: conn.execute(f"SELECT COUNT(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        conn.close()


async def test_a_full_large_table_makes_the_day_start_another(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = SqliteStore(path)
    await store.open()
    store._dedupe.MERGE, store._dedupe.CAP = 50, 100
    keys = [dedupe_key(b"s", f"m{i}") for i in range(420)]
    for i in range(0, 420, 30):
        assert await remember(store, keys[i : i + 30], DAY) == set()
    assert await remember(store, keys[::7], DAY) == set(keys[::7])
    await store.close()
    # every large table holds CAP keys and at most one merge more; the small one the rest
    assert dedupe_tables(path) == {
        "dedupe_20241004": 120, "dedupe_20241004_1": 120, "dedupe_20241004_2": 120,
        "dedupe_20241004_3": 60, "dedupe_20241004_new": 0,
    }
    again = SqliteStore(path)  # the filter made again from the tables
    await again.open()
    fresh = [dedupe_key(b"s", f"n{i}") for i in range(5)]
    assert await remember(again, keys + fresh, DAY) == set(keys)
    assert await remember(again, fresh, DAY) == set(fresh)
    await again.close()


async def test_a_data_folder_of_the_two_table_layout_still_dedupes(tmp_path: Path) -> None:
    # the layout before a day had more than one large table: `dedupe_D` and `dedupe_D_new`
    path = tmp_path / "gateway.db"
    old, today = [dedupe_key(b"s", f"old{i}") for i in range(40)], []
    large = [dedupe_key(b"s", f"large{i}") for i in range(150)]
    small = [dedupe_key(b"s", f"small{i}") for i in range(30)]
    conn = sqlite3.connect(path)
    for table, keys in (("dedupe_20241003", old), ("dedupe_20241003_new", []),
                        ("dedupe_20241004", large), ("dedupe_20241004_new", small)):
        conn.execute(f"CREATE TABLE {table} (key BLOB PRIMARY KEY) WITHOUT ROWID")
        conn.executemany(f"INSERT INTO {table} VALUES (?)", [(k,) for k in keys])
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    await store.open()
    store._dedupe.MERGE, store._dedupe.CAP = 50, 100
    today = [dedupe_key(b"s", f"today{i}") for i in range(60)]
    assert await remember(store, old + large + small + today, DAY) == set(old + large + small)
    await store.close()
    # the large table was over CAP: the merge went to a new one
    assert dedupe_tables(path) == {
        "dedupe_20241003": 40, "dedupe_20241003_new": 0, "dedupe_20241004": 150,
        "dedupe_20241004_1": 90, "dedupe_20241004_new": 0,
    }
    again = SqliteStore(path)
    await again.open()
    every = old + large + small + today
    assert await remember(again, every, DAY) == set(every)
    await again.close()


async def test_keys_sharing_their_slots_are_still_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store._Window, "SLOTS", 64)  # every key shares slots with others
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    store._dedupe.MERGE, store._dedupe.CAP = 50, 100
    keys = [dedupe_key(b"s", f"m{i}") for i in range(300)]
    for i in range(0, 300, 40):
        assert await remember(store, keys[i : i + 40], DAY) == set()
    # a false positive is probed, and found absent: the fresh keys are new, once
    fresh = [dedupe_key(b"s", f"n{i}") for i in range(30)]
    window = store._dedupe._window
    assert set(window.check("20241004", sorted(fresh))["20241004"]) == set(fresh)
    assert await remember(store, keys[::3] + fresh, DAY) == set(keys[::3])
    assert await remember(store, fresh, DAY) == set(fresh)
    await store.close()


def window_of(slots: int, days: dict[str, list[bytes]]) -> sqlite_store._Window:
    """A window whose days (oldest first) each stored `days[day]`, as the turns make it."""
    window = sqlite_store._Window()
    window.slots, window._bits = slots, bytearray(slots)
    for day, keys in days.items():
        window.start(day)
        window.check(day, keys)
    return window


def test_the_window_names_every_day_that_holds_a_key() -> None:
    days = {f"202410{d:02}": [dedupe_key(b"s", f"{d}-{i}") for i in range(300)]
            for d in range(1, 11)}
    window = window_of(1 << 16, days)
    # ten days in eight planes: the two oldest were copied apart when a day found none free
    assert window.days() == set(days)
    assert sorted(window._apart) == ["20241001", "20241002"]
    for day, keys in days.items():
        assert set(window.check("20241010", keys).get(day, [])) == set(keys), day
    absent = [dedupe_key(b"t", str(i)) for i in range(2000)]
    held = window.check("20241010", absent)
    # 300 keys a day in 65,536 slots: an absent key rarely finds a day's 3 slots set
    assert all(len(keys) < 20 for day, keys in held.items() if day != "20241010")


def test_a_dropped_day_leaves_no_bits_and_its_plane_is_taken_again() -> None:
    first = [dedupe_key(b"s", f"a{i}") for i in range(500)]
    second = [dedupe_key(b"s", f"b{i}") for i in range(500)]
    window = window_of(1 << 16, {"20241001": first, "20241002": second})
    plane = window._planes.index("20241001")
    window.drop("20241001")
    assert window.days() == {"20241002"}
    assert not any(v >> plane & 1 for v in window._bits)
    window.start("20241003")
    assert window._planes.index("20241003") == plane
    held = window.check("20241003", first + second)
    # the first day's keys are gone but for the few that find the second's slots set
    assert "20241001" not in held and set(second) <= set(held["20241002"])
    assert len(held["20241002"]) < len(second) + 10
    # a day copied apart is dropped too
    window = window_of(1 << 12, {f"202410{d:02}": first[d::10] for d in range(1, 10)})
    assert list(window._apart) == ["20241001"]
    window.drop("20241001")
    assert window.days() == {f"202410{d:02}" for d in range(2, 10)}
    assert "20241001" not in window.check("20241009", first)


def test_a_plane_copied_apart_holds_what_the_plane_held() -> None:
    keys = [dedupe_key(b"s", f"m{i}") for i in range(3000)]
    window = window_of(1 << 15, {"20241001": keys})
    for plane in range(8):
        apart = sqlite_store._Apart.of_plane(window._bits, plane)
        assert all(
            (apart._bits[i >> 3] >> (i & 7) & 1) == (window._bits[i] >> plane & 1)
            for i in range(window.slots)
        )
    apart = sqlite_store._Apart.of_plane(window._bits, window._planes.index("20241001"))
    assert apart.holds(keys) == keys


@pytest.mark.parametrize("loops", ["built", "python"])
@pytest.mark.parametrize("slots", [1 << 24, 64])
async def test_older_days_are_probed_for_the_keys_their_bits_may_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: int, loops: str
) -> None:
    if loops == "python":
        monkeypatch.setattr(window, "loops", window.PURE)
    # at 64 slots, every day's plane has every slot set: every key is probed everywhere
    monkeypatch.setattr(sqlite_store._Window, "SLOTS", slots)
    path = tmp_path / "gateway.db"
    store = SqliteStore(path)
    await store.open()
    store._dedupe.MERGE, store._dedupe.CAP = 50, 100
    first = [dedupe_key(b"s", f"a{i}") for i in range(230)]  # 2 large tables and a small one
    for i in range(0, 230, 40):
        assert await remember(store, first[i : i + 40], DAY) == set()
    second = [dedupe_key(b"s", f"b{i}") for i in range(60)]
    # the day turns, in this process
    assert await remember(store, first[::5] + second, DAY + 86400) == set(first[::5])
    assert await remember(store, first + second, DAY + 86400) == set(first + second)
    await store.close()
    again = SqliteStore(path)  # the window's bits made again from the tables
    await again.open()
    third = [dedupe_key(b"s", f"c{i}") for i in range(20)]
    every = first + second + third
    assert await remember(again, every, DAY + 2 * 86400) == set(first + second)
    assert await remember(again, every, DAY + 2 * 86400) == set(every)
    await again.close()


@pytest.mark.parametrize("loops", ["built", "python"])
async def test_a_key_of_any_day_of_a_long_window_is_deduped_across_turns_and_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loops: str
) -> None:
    if loops == "python":  # the window's loops where gateway/_window.c did not build
        monkeypatch.setattr(window, "loops", window.PURE)
    # eleven days: more than the window's planes, so the oldest days are held apart, in
    # the process that saw the days turn and in one that made the bits from the tables
    monkeypatch.setattr(sqlite_store._Window, "SLOTS", 1 << 12)
    path = tmp_path / "gateway.db"
    store = SqliteStore(path)
    await store.open()
    store._dedupe.MERGE, store._dedupe.CAP = 20, 40
    by_day = [[dedupe_key(b"s", f"{d}-{i}") for i in range(50)] for d in range(11)]
    for d, keys in enumerate(by_day):
        assert await remember(store, keys, DAY + d * 86400) == set()
        # every earlier day's keys, and the day's own, are still known
        seen = [k for day in by_day[: d + 1] for k in day[::7]]
        assert await remember(store, seen, DAY + d * 86400) == set(seen)
    assert len(store._dedupe._window._apart) == 3
    await store.close()
    again = SqliteStore(path)
    await again.open()
    last = DAY + 10 * 86400
    every = [k for day in by_day for k in day]
    fresh = [dedupe_key(b"s", f"new{i}") for i in range(40)]
    assert await remember(again, every + fresh, last) == set(every)
    assert sorted(again._dedupe._window._apart) == ["20241004", "20241005", "20241006"]
    # pruning the three oldest frees no plane (they had none) and forgets their keys
    assert await again.prune(DAY + 3 * 86400) >= 3
    assert again._dedupe._window._apart == {}
    assert await remember(again, every, last) == set(every[150:])
    await again.close()


async def test_a_day_that_turns_in_a_rolled_back_turn_is_still_filtered_whole(
    store: SqliteStore,
) -> None:
    before = [dedupe_key(b"s", f"m{i}") for i in range(10)]
    after = [dedupe_key(b"s", f"n{i}") for i in range(10)]

    def fails(tx: Turn) -> None:
        tx.state.remember(after)
        raise RuntimeError("the turn that starts a day fails")

    assert await remember(store, before, DAY) == set()
    with pytest.raises(RuntimeError):
        await store.transact(fails, DAY + 86400)
    # the first day is the newest again, and takes keys after its filter was folded once
    assert await remember(store, after, DAY) == set()
    assert await remember(store, before + after, DAY + 86400) == set(before + after)


async def test_keys_of_a_rolled_back_turn_are_not_remembered(store: SqliteStore) -> None:
    keys = [dedupe_key(b"s", f"m{i}") for i in range(20)]

    def fails(tx: Turn) -> None:
        tx.state.remember(keys)
        raise RuntimeError("the turn fails after its dedupe")

    assert await remember(store, keys[:5], DAY) == set()
    with pytest.raises(RuntimeError):
        await store.transact(fails, DAY)
    # their filter bits stay set: they are probed, and not found
    assert await remember(store, keys, DAY) == set(keys[:5])
    assert await remember(store, keys, DAY) == set(keys)


async def test_remember_refuses_keys_of_another_size(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        await remember(store, [b"short"])


@pytest.mark.parametrize("user", ["u1", 'quote " back \\ slash', "üñï €", "nul\x00inside", "\\u0000"])
async def test_ledger_rows_keep_any_id_exactly(store: SqliteStore, user: str) -> None:
    # ids come back from the store as they were sent, whatever characters they hold
    for n in (1, 2):
        await flush(store, tracks=[hit(f"m{n}", user=user), hit(f"n{n}", user=user, event="Other")])
    rows = await store.ledger("s", None)
    assert sorted((r["userId"], r["event"], r["count"]) for r in rows) == [
        (user, "Clicked", 2), (user, "Other", 2)
    ]


@pytest.mark.parametrize("user", ["u1", 'quote " back \\ slash', "üñï €", "nul\x00inside"])
async def test_outbox_bodies_are_stored_byte_for_byte(store: SqliteStore, user: str) -> None:
    await flush(store, tracks=[hit("m1", user=user), hit("m2", user=user)])
    [item] = await store.due("s", 1e12, 10)
    assert item.repeat == 2
    assert item.body == msgspec.json.encode(
        {"userId": user, "event": "Clicked", "timestamp": "2026-11-28T10:00:00.000Z"}
    )
    assert isinstance(item.body, bytes)


async def test_a_store_that_never_dedupes_holds_no_window(tmp_path: Path) -> None:
    # the front opens the store to append to the inbox: the window's 16 MB are the worker's
    store = SqliteStore(tmp_path / "gateway.db")
    await store.open()
    assert len(store._dedupe._window._bits) == 0
    await remember(store, [dedupe_key(b"s", "m1")], DAY)
    assert len(store._dedupe._window._bits) == sqlite_store._Window.SLOTS
    await store.close()


@pytest.mark.parametrize("chunk", [1, 7, 50, 1 << 16])
def test_a_start_reads_every_key_of_a_table_in_packed_chunks(tmp_path: Path, chunk: int) -> None:
    conn = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    conn.execute("CREATE TABLE dedupe_20241004 (key BLOB PRIMARY KEY) WITHOUT ROWID")
    keys = [dedupe_key(b"s", f"m{i}") for i in range(50)] + [b"\x00" * 16, b"\xff" * 16]
    conn.executemany("INSERT INTO dedupe_20241004 VALUES (?)", [(k,) for k in keys])
    packed = list(sqlite_store._packed_keys(conn, "dedupe_20241004", chunk))
    assert len(packed) == -(-len(keys) // chunk)
    blob = b"".join(packed)
    assert sorted(blob[i : i + 16] for i in range(0, len(blob), 16)) == sorted(keys)
    conn.close()
