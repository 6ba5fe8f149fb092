"""The embedded store: SQLite in WAL mode, in two files.

`inbox.db` holds the inbox, the accepted request bodies: ingest writes it and nothing
else, so an acknowledgement never waits for the pipeline's transactions, which write
`gateway.db` (progress, dedupe keys, ledger, outbox, dead letters) and touch the inbox only
to delete rows they have wholly applied. Both files are attached to every connection.

All writes of a process go through one thread that batches whatever is queued into a
single transaction (group commit): concurrent requests and actor flushes share one commit,
and the event loop never blocks on the disk. Each operation runs in its own savepoint,
so one failing operation does not undo its neighbours. Reads use a second connection
on another thread; WAL lets them run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from gateway.store.base import (
    Counts,
    DeadLetter,
    Flush,
    FlushResult,
    InboxRow,
    OutboxItem,
    StoredLetter,
)

log = structlog.get_logger("gateway.store")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS ib.inbox (
    -- AUTOINCREMENT: ids are never reused, so the router's cursor never skips a new row
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    received_at REAL NOT NULL,
    count INTEGER NOT NULL,  -- before the body: counting rows never reads a body
    body BLOB NOT NULL
);
"""

SCHEMA = """
-- how many messages of an inbox row no actor has committed yet, from the moment the router
-- takes the row; a row at 0 is deleted from the inbox by `reap`
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY,
    pending INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS progress_done ON progress (id) WHERE pending <= 0;
CREATE TABLE IF NOT EXISTS dedupe (
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_seen ON dedupe (seen_at);
CREATE TABLE IF NOT EXISTS accounts (
    source TEXT NOT NULL,
    user_id TEXT NOT NULL,
    account TEXT NOT NULL,
    PRIMARY KEY (source, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS known (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    day TEXT NOT NULL,
    traits BLOB NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    source TEXT NOT NULL,
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    account TEXT NOT NULL,
    event TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_ts TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (source, day, user_id, account, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    account TEXT,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    body BLOB NOT NULL,
    repeat INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_error TEXT,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (source, next_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    stage TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    status INTEGER,
    path TEXT,
    repeat INTEGER NOT NULL,
    account TEXT,
    created_at REAL NOT NULL,
    replayed_at REAL
);
"""

SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL"}

_encode = msgspec.json.encode
_decode_traits = msgspec.json.Decoder(dict[str, Any]).decode


class _Writer(threading.Thread):
    """Runs queued operations in batches, one transaction per batch.

    Two lanes: acknowledgements (`urgent`: ingest's accepts) always go first and commit in a
    transaction of their own, so a client's 200 never waits behind more than one batch of
    actor flushes, which are capped at `flush_batch` operations a transaction.
    """

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="store-writer", daemon=True)
        self.conn = conn
        self.loop = loop
        self._urgent: deque[tuple[Op, asyncio.Future[Any]]] = deque()
        self._normal: deque[tuple[Op, asyncio.Future[Any]]] = deque()
        self._bare: deque[tuple[Op, asyncio.Future[Any]]] = deque()  # outside transactions
        self._ready = threading.Condition()
        self._stopping = False
        self.max_batch = 512
        self.flush_batch = 8

    def submit(self, op: Op, *, urgent: bool = False, bare: bool = False) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        lane = self._bare if bare else self._urgent if urgent else self._normal
        with self._ready:
            lane.append((op, fut))
            self._ready.notify()
        return fut

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def _next_batch(self) -> tuple[list[tuple[Op, asyncio.Future[Any]]], bool] | None:
        """The next batch, and whether it runs outside a transaction."""
        with self._ready:
            while not self._urgent and not self._normal and not self._bare:
                if self._stopping:
                    return None
                self._ready.wait()
            if self._urgent:
                lane, cap = self._urgent, self.max_batch
            elif self._normal:
                lane, cap = self._normal, self.flush_batch
            else:
                return [self._bare.popleft()], True
            return [lane.popleft() for _ in range(min(cap, len(lane)))], False

    def run(self) -> None:
        conn = self.conn
        while (next_batch := self._next_batch()) is not None:
            batch, bare = next_batch
            results: list[tuple[asyncio.Future[Any], bool, Any]] = []
            if bare:
                op, fut = batch[0]
                try:
                    results.append((fut, True, op(conn)))
                except Exception as exc:
                    results.append((fut, False, exc))
                self.loop.call_soon_threadsafe(_resolve, results)
                continue
            try:
                # deferred, not IMMEDIATE: a transaction locks only the files it writes, so
                # ingest's inserts into inbox.db never wait for the pipeline's writes
                conn.execute("BEGIN")
                for op, fut in batch:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op(conn)
                    except Exception as exc:  # the op's own failure; its neighbours still commit
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((fut, False, exc))
                    else:
                        conn.execute("RELEASE op")
                        results.append((fut, True, value))
                conn.execute("COMMIT")
            except Exception as exc:  # the commit itself failed: nothing of the batch is durable
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                results = [(fut, False, exc) for _, fut in batch]
            self.loop.call_soon_threadsafe(_resolve, results)
        conn.close()


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("store write failed", error=repr(fut.exception()))


def _resolve(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class SqliteStore:
    def __init__(
        self, path: str | Path, *, fsync: str = "normal", checkpoint: bool = True
    ) -> None:
        """`path` is gateway.db; inbox.db lies beside it. `checkpoint=False` leaves the
        checkpoints of inbox.db to another process (`reap` does them), so that ingest's
        commits only append to the write-ahead log."""
        self.path = Path(path)
        self.inbox_path = self.path.with_name("inbox.db")
        self.fsync = fsync
        self.checkpoint = checkpoint
        self._writer: _Writer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("ATTACH DATABASE ? AS ib", (str(self.inbox_path),))
        for db in ("main", "ib"):
            conn.execute(f"PRAGMA {db}.journal_mode=WAL")
            conn.execute(f"PRAGMA {db}.synchronous={SYNCHRONOUS[self.fsync]}")
            # a checkpoint that emptied the log also shrinks its file back
            conn.execute(f"PRAGMA {db}.journal_size_limit={64 * 1024 * 1024}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA cache_size=-8000")  # 8 MB of page cache a connection
        if not self.checkpoint:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript(INBOX_SCHEMA + SCHEMA)
        self._writer = _Writer(conn, asyncio.get_running_loop())
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._read_conn = await self._run_read(lambda _: self._connect())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader is not None:
            conn = self._read_conn
            if conn is not None:
                await self._run_read(lambda _: conn.close())
            self._reader.shutdown(wait=True)
            self._reader = None

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, urgent: bool = False) -> T:
        assert self._writer is not None, "store is not open"
        result: T = await self._writer.submit(op, urgent=urgent)
        return result

    def _submit(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue a write without waiting for it; a failure is logged."""
        assert self._writer is not None, "store is not open"
        self._writer.submit(op).add_done_callback(_log_failure)

    async def _write_outside(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` on the writer's thread outside any transaction (a checkpoint, say)."""
        assert self._writer is not None, "store is not open"
        result: T = await self._writer.submit(op, bare=True)
        return result

    async def _run_read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader is not None, "store is not open"
        conn = self._read_conn
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, op, conn  # type: ignore[arg-type]
        )

    # ingest

    async def accept(self, source: str, received_at: float, body: bytes, count: int) -> int:
        return await self._write(
            lambda conn: _insert_inbox(conn, source, received_at, body, count), urgent=True
        )

    # router

    async def restart_inbox(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # rows wholly applied go now (routing them again would only find duplicates)
            conn.execute("DELETE FROM ib.inbox WHERE id IN (SELECT id FROM progress WHERE pending <= 0)")
            conn.execute("DELETE FROM progress")

        await self._write(op)

    def take(self, row_id: int, count: int) -> None:
        self._submit(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO progress (id, pending) VALUES (?, ?)", (row_id, count)
            )
        )

    async def reap(self, limit: int = 1000) -> int:
        def op(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM progress WHERE pending <= 0 LIMIT ?", (limit,)
            ).fetchall()]
            if ids:
                marks = ",".join("?" * len(ids))
                conn.execute(f"DELETE FROM ib.inbox WHERE id IN ({marks})", ids)
                conn.execute(f"DELETE FROM progress WHERE id IN ({marks})", ids)
            return len(ids)

        n = await self._write(op)
        if not self.checkpoint:
            await self._write_outside(lambda conn: conn.execute("PRAGMA ib.wal_checkpoint(PASSIVE)"))
        return n

    async def inbox_after(self, cursor: int, limit: int) -> list[InboxRow]:
        def op(conn: sqlite3.Connection) -> list[InboxRow]:
            rows = conn.execute(
                "SELECT id, source, received_at, body, count FROM ib.inbox"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, limit),
            ).fetchall()
            return [InboxRow(*row) for row in rows]

        return await self._run_read(op)

    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]:
        def op(conn: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in _chunks(users, 500):
                marks = ",".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        f"SELECT user_id, account FROM accounts WHERE source = ? AND user_id IN ({marks})",
                        (source, *chunk),
                    ).fetchall()
                )
            return found

        return await self._run_read(op)

    # actors

    async def known(self, source: str, keys: list[str], day: str) -> dict[str, dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for chunk in _chunks(keys, 500):
                marks = ",".join("?" * len(chunk))
                for key, traits in conn.execute(
                    f"SELECT key, traits FROM known WHERE source = ? AND day = ? AND key IN ({marks})",
                    (source, day, *chunk),
                ):
                    found[key] = _decode_traits(traits)
            return found

        return await self._run_read(op)

    async def flush(self, flush: Flush) -> FlushResult:
        return await self._write(lambda conn: _apply_flush(conn, flush))

    # forwarder

    async def due(self, source: str, now: float, limit: int) -> list[OutboxItem]:
        def op(conn: sqlite3.Connection) -> list[OutboxItem]:
            rows = conn.execute(
                "SELECT id, key, kind, path, body, repeat, version, attempts FROM outbox"
                " WHERE source = ? AND next_at <= ? ORDER BY next_at, id LIMIT ?",
                (source, now, limit),
            ).fetchall()
            return [
                OutboxItem(
                    id=r[0], source=source, key=r[1], kind=r[2], path=r[3], body=r[4],
                    repeat=r[5], version=r[6], attempts=r[7],
                )
                for r in rows
            ]

        return await self._run_read(op)

    async def next_due(self, source: str) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = _one(conn.execute(
                "SELECT MIN(next_at) FROM outbox WHERE source = ?", (source,)
            ))
            return None if row is None else row[0]

        return await self._run_read(op)

    async def delivered(self, item: OutboxItem) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if item.kind == "track":
                # one occurrence of the row went out; the row may have grown meanwhile
                conn.execute(
                    "UPDATE outbox SET repeat = repeat - 1, attempts = 0 WHERE id = ?", (item.id,)
                )
                conn.execute("DELETE FROM outbox WHERE id = ? AND repeat <= 0", (item.id,))
            else:
                # a newer version (more traits merged in) still has to go
                cur = conn.execute(
                    "DELETE FROM outbox WHERE id = ? AND version = ?", (item.id, item.version)
                )
                if cur.rowcount == 0:
                    conn.execute("UPDATE outbox SET attempts = 0 WHERE id = ?", (item.id,))

        await self._write(op)

    async def retry(self, item: OutboxItem, next_at: float, error: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                # from the attempt this item was sent as: copies failing together count once
                "UPDATE outbox SET attempts = MAX(attempts, ?), next_at = MAX(next_at, ?),"
                " last_error = ? WHERE id = ?",
                (item.attempts + 1, next_at, error, item.id),
            )
        )

    async def reject(self, item: OutboxItem, status: int, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            row = _one(conn.execute(
                "SELECT repeat, body, account FROM outbox WHERE id = ?", (item.id,)
            ))
            if row is None:
                return
            repeat, body, account = row
            conn.execute("DELETE FROM outbox WHERE id = ?", (item.id,))
            letter = DeadLetter(
                source=item.source, stage="forward", reason=reason, payload=body,
                status=status, path=item.path, repeat=repeat if item.kind == "track" else 1,
                account=account,
            )
            _insert_dead(conn, [letter], time.time())

        await self._write(op)

    # admin and housekeeping

    async def dead_letters(
        self, source: str | None, after: int, limit: int, include_replayed: bool
    ) -> list[StoredLetter]:
        def op(conn: sqlite3.Connection) -> list[StoredLetter]:
            sql = (
                "SELECT id, source, stage, reason, payload, status, path, repeat, account,"
                " created_at, replayed_at FROM dead_letters WHERE id > ?"
            )
            args: list[Any] = [after]
            if source is not None:
                sql += " AND source = ?"
                args.append(source)
            if not include_replayed:
                sql += " AND replayed_at IS NULL"
            sql += " ORDER BY id LIMIT ?"
            args.append(limit)
            return [
                StoredLetter(
                    id=r[0], source=r[1], stage=r[2], reason=r[3], payload=r[4], status=r[5],
                    path=r[6], repeat=r[7], account=r[8], created_at=r[9], replayed_at=r[10],
                )
                for r in conn.execute(sql, args)
            ]

        return await self._run_read(op)

    async def replay(self, ids: list[int] | None, source: str | None, now: float) -> int:
        """Give dead letters another go: calls back to the outbox, messages back to the inbox."""

        def op(conn: sqlite3.Connection) -> int:
            sql = (
                "SELECT id, source, stage, payload, path, repeat, account FROM dead_letters"
                " WHERE replayed_at IS NULL"
            )
            args: list[Any] = []
            if source is not None:
                sql += " AND source = ?"
                args.append(source)
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
            wanted = None if ids is None else set(ids)
            messages: dict[str, list[bytes]] = {}
            done = 0
            for letter_id, src, stage, payload, path, repeat, account in rows:
                if wanted is not None and letter_id not in wanted:
                    continue
                if stage == "forward":
                    kind = _kind_of(path, payload)
                    conn.execute(
                        "INSERT INTO outbox (source, key, account, kind, path, body, repeat, next_at,"
                        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (src, f"r\x1f{letter_id}", account, kind, path, payload, repeat, now, now),
                    )
                else:
                    try:
                        msgspec.json.decode(payload)
                    except msgspec.DecodeError:
                        continue  # not JSON: nothing a replay could make of it
                    messages.setdefault(src, []).append(payload)
                conn.execute("UPDATE dead_letters SET replayed_at = ? WHERE id = ?", (now, letter_id))
                done += 1
            for src, payloads in messages.items():
                body = b'{"batch":[' + b",".join(payloads) + b"]}"
                _insert_inbox(conn, src, now, body, len(payloads))
            return done

        return await self._write(op)

    async def counts(self) -> Counts:
        def op(conn: sqlite3.Connection) -> Counts:
            # a row the router has not taken yet has no progress: all of it is pending
            inbox = _one(conn.execute(
                "SELECT COALESCE(SUM(COALESCE(p.pending, i.count)), 0)"
                " FROM ib.inbox AS i LEFT JOIN progress AS p ON p.id = i.id"
            ))[0]
            outbox = _one(conn.execute("SELECT COALESCE(SUM(repeat), 0) FROM outbox"))[0]
            dead = _one(conn.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NULL"
            ))[0]
            rows, events = _one(conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(count), 0) FROM ledger"
            ))
            return Counts(inbox, outbox, dead, rows, events)

        return await self._run_read(op)

    async def ledger(self, source: str | None, day: str | None) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT source, day, user_id, account, event, count, last_ts FROM ledger WHERE 1=1"
            args: list[Any] = []
            if source is not None:
                sql += " AND source = ?"
                args.append(source)
            if day is not None:
                sql += " AND day = ?"
                args.append(day)
            cols = ("source", "day", "userId", "account", "event", "count", "lastTimestamp")
            return [dict(zip(cols, row, strict=True)) for row in conn.execute(sql, args)]

        return await self._run_read(op)

    async def prune(self, before: float) -> int:
        """Forget message ids and ledger rows older than the dedupe window."""

        def op(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM dedupe WHERE seen_at < ?", (before,)).rowcount
            n += conn.execute("DELETE FROM ledger WHERE updated_at < ?", (before,)).rowcount
            day = time.strftime("%Y-%m-%d", time.gmtime(before))
            n += conn.execute("DELETE FROM known WHERE day < ?", (day,)).rowcount
            return n

        return await self._write(op)


def _insert_inbox(
    conn: sqlite3.Connection, source: str, received_at: float, body: bytes, count: int
) -> int:
    row_id = conn.execute(
        "INSERT INTO ib.inbox (source, received_at, count, body) VALUES (?, ?, ?, ?)",
        (source, received_at, count, body),
    ).lastrowid
    assert row_id is not None
    return row_id


def _one(cur: sqlite3.Cursor) -> Any:
    """The first row, with the statement run to its end: a statement left open would keep
    the connection's read snapshot, and later reads would not see new commits."""
    rows = cur.fetchall()
    return rows[0] if rows else None


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _kind_of(path: str | None, payload: bytes) -> str:
    if path and path.endswith(("/identify", "/group")):
        return path.rsplit("/", 1)[1]
    if path == "/segment":
        kind = msgspec.json.decode(payload).get("type")
        if kind in ("identify", "group"):
            return str(kind)
    return "track"


def _insert_dead(conn: sqlite3.Connection, dead: list[DeadLetter], now: float) -> None:
    fresh = [d for d in dead if d.key is None or conn.execute(
        "INSERT OR IGNORE INTO dedupe (source, message_id, seen_at) VALUES (?, ?, ?)",
        (d.source, d.key, now),
    ).rowcount]
    if fresh:
        conn.executemany(
            "INSERT INTO dead_letters (source, stage, reason, payload, status, path, repeat,"
            " account, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (d.source, d.stage, d.reason, d.payload, d.status, d.path, d.repeat, d.account, now)
                for d in fresh
            ],
        )


def _apply_flush(conn: sqlite3.Connection, f: Flush) -> FlushResult:
    now = f.now or time.time()
    duplicates = 0
    calls = 0
    # count each occurrence once: the message id decides, in the same transaction as the count
    fresh: dict[tuple[str, str, str], list[Any]] = {}
    for hit in f.tracks:
        cur = conn.execute(
            "INSERT OR IGNORE INTO dedupe (source, message_id, seen_at) VALUES (?, ?, ?)",
            (f.source, hit.message_id, now),
        )
        if cur.rowcount == 0:
            duplicates += 1
            continue
        key = (hit.day, hit.user_id, hit.event)
        agg = fresh.get(key)
        if agg is None:
            fresh[key] = [1, hit.timestamp, hit.path, hit.body]
        else:
            agg[0] += 1
            if hit.timestamp >= agg[1]:
                agg[1], agg[3] = hit.timestamp, hit.body
    for mid in f.seen:
        cur = conn.execute(
            "INSERT OR IGNORE INTO dedupe (source, message_id, seen_at) VALUES (?, ?, ?)",
            (f.source, mid, now),
        )
        duplicates += cur.rowcount == 0
    counted = 0
    for (day, user, event), (n, ts, path, body) in fresh.items():
        counted += n
        row = _one(conn.execute(
            "SELECT count, last_ts FROM ledger WHERE source = ? AND day = ? AND user_id = ?"
            " AND account = ? AND event = ?",
            (f.source, day, user, f.account, event),
        ))
        before = 0 if row is None else row[0]
        if row is not None and row[1] > ts:
            ts = row[1]
            body = {**body, "timestamp": ts}
        conn.execute(
            "INSERT INTO ledger (source, day, user_id, account, event, count, last_ts, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count,"
            " last_ts = excluded.last_ts, updated_at = excluded.updated_at",
            (f.source, day, user, f.account, event, n, ts, now),
        )
        send = n if f.track_mode == "exact" else int(before == 0)
        if send:
            calls += send
            conn.execute(
                "INSERT INTO outbox (source, key, account, kind, path, body, repeat, next_at,"
                " created_at) VALUES (?, ?, ?, 'track', ?, ?, ?, ?, ?) ON CONFLICT (source, key)"
                " DO UPDATE SET repeat = repeat + excluded.repeat, body = excluded.body,"
                " version = version + 1",
                (f.source, _ledger_key(day, user, f.account, event), f.account, path,
                 _encode(body), send, now, now),
            )
    for call in f.calls:
        calls += _put_call(conn, f, call.key, call.kind, call.path, call.body, now)
    if f.known:
        conn.executemany(
            "INSERT OR REPLACE INTO known (source, key, day, traits) VALUES (?, ?, ?, ?)",
            [(f.source, k.key, k.day, _encode(k.traits)) for k in f.known],
        )
    if f.accounts:
        conn.executemany(
            "INSERT OR REPLACE INTO accounts (source, user_id, account) VALUES (?, ?, ?)",
            [(f.source, user, account) for user, account in f.accounts],
        )
    _insert_dead(conn, f.dead, now)
    for row_id, n in f.inbox.items():
        # the row itself is deleted later, by `reap`: deleting it here would make every
        # flush write inbox.db and wait for ingest's commits
        conn.execute("UPDATE progress SET pending = pending - ? WHERE id = ?", (n, row_id))
    return FlushResult(counted, duplicates, calls)


def _ledger_key(day: str, user: str, account: str, event: str) -> str:
    # JSON, not a separator: ids and event names may hold any character, the separator too,
    # and two different (user, account, event) rows must never share a key
    return "t" + _encode([day, user, account, event]).decode()


def _put_call(
    conn: sqlite3.Connection, f: Flush, key: str, kind: str, path: str, body: dict[str, Any],
    now: float,
) -> int:
    """Queue an identify/group call, folding it into an unsent one of the same key."""
    row = _one(conn.execute(
        "SELECT id, body FROM outbox WHERE source = ? AND key = ?", (f.source, key)
    ))
    if row is None:
        conn.execute(
            "INSERT INTO outbox (source, key, account, kind, path, body, repeat, next_at,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
            (f.source, key, f.account, kind, path, _encode(body), now, now),
        )
        return 1
    old = msgspec.json.decode(row[1])
    merged = {**body, "traits": {**(old.get("traits") or {}), **(body.get("traits") or {})}}
    conn.execute(
        "UPDATE outbox SET body = ?, version = version + 1, path = ? WHERE id = ?",
        (_encode(merged), path, row[0]),
    )
    return 0
