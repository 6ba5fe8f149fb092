"""The worker's apply in one process, no HTTP: CPU µs an event, pure Python or compiled.

    python scripts/bench_apply.py                       # pure against compiled, alternated
    python scripts/bench_apply.py --modes pure          # the apply's cost, this checkout
    python scripts/bench_apply.py --modes pure,main --main /work/main
    python scripts/bench_apply.py --events 200000 --rounds 5 --stores core
    python scripts/bench_apply.py --modes pure,main --main /work/main --stores sqlite \
        --workloads track --rounds 1 --events 3000000 --windows 500000

The stored bodies are `bench_sustained.py`'s kind: 100-event batches from `Traffic`, 500
accounts and 5,000 users, unique message ids, made once and applied by every pass. Two
workloads: `track` (track events only, as the sustained benchmark sends) and `mix` (the
load test's: track, page, screen, identify, group). Each pass is a child process that feeds
them through the worker's real dispatcher, router, actors and turn, with one of two stores:

- `core`: a store held in dicts (`MemoryStore`, no I/O), so that the figure is the apply's
  Python, the stored bodies' decode included.
- `sqlite`: the real `SqliteStore` in a temporary folder, the inbox filled before the clock
  starts; the figure splits into the dispatcher's thread (decode, router, actors) and the
  rest of the process (the store's writer thread: the turn's rules and SQLite).

Modes (a child imports `gateway` from the first folder on its path, never the editable
install's, and reports the file its router came from):
- `pure`: this checkout's `gateway`;
- `compiled`: a copy of it in a temporary folder, the modules of `--compile` compiled there
  with mypyc (the venv's `mypyc`; about a minute). A module that defines a class with
  keywords (`class A(Struct, gc=False)`) is refused: mypyc drops them without a word
  (python/mypy#21938), and the compiled module would not be the one measured pure;
- `main`: another checkout's `gateway` (`--main PATH`).

The passes alternate the modes (pure, compiled, pure, compiled, ...), so that a load on the
machine falls on both alike. Reported per store, workload and mode: each pass's CPU µs an
event, their minimum and median, and the ratio of the medians (compiled or main over pure).
CPU time is noisy on a shared machine; `--callgrind` counts instructions instead, which a
load does not change: each pass runs under callgrind twice, at `--events` and at three times
as many (hash seed fixed, and `flush_interval` an hour: turns cut by their count, not by the
clock callgrind slows), and reports the instructions per event between them (start-up and
the reading of the bodies cancel out); about a minute a pass. `--windows EVENTS` (sqlite
store) asks where a long apply's cost goes as it proceeds: each stage's thread CPU (the
dispatcher's thread; on the writer's, the turn, its dedupe split into probe, insert and
merge, the ledger's read and write, the outbox, the transaction around the turn), the
collector's time, the tables' rows, the SQLite log's size and the process's `read` calls,
per window of EVENTS applied events. `--older-days N --older-keys K` (sqlite store) asks what
the older days of the dedupe window cost a gateway after its first day: before the clock
starts, the pass finds the N UTC days before today filled with K random keys each, in the
tables the store itself makes (`dedupe_YYYYMMDD`, `_1`, `_2`, ... of the store's `CAP` keys
each, and `dedupe_YYYYMMDD_new` with what a day's last merge leaves); every key the apply
stores is then checked against them. The parent fills them once for each N (untimed, its
seconds reported) and each pass starts from a copy, so `--callgrind` takes them too (the
store's first turn makes its filters from them, in both of callgrind's runs: that cancels
out). `--older-days 0,3,6` runs the passes for each N in turn within a round (each mode
beside the other for the same N), reported as `STORE_WORKLOAD_olderN`. `--rebuild` (with `--older-days N`) times only a start's making of
the window's bits from those days' tables (`_Dedupe.days`, the first turn waits for it): CPU
seconds, and µs a key as `cpu_us_per_event`. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
from benchkit.traffic import DEFAULT_MIX, Traffic, parse_mix

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
WORKLOADS = {"track": "track=1", "mix": DEFAULT_MIX}
# the worker's hot modules that mypyc can compile as they are (`gateway.mapping.calls`,
# `.dialects` and `gateway.rules.dead_letters` define Structs with class keywords)
COMPILE = (
    "gateway/actors/actor.py,gateway/actors/dispatcher.py,gateway/actors/integrations.py,"
    "gateway/actors/router.py,gateway/actors/turn.py,gateway/keys.py,gateway/mapping/traits.py,"
    "gateway/rules/dedupe.py,gateway/rules/ledger.py,gateway/rules/traits.py"
)
Results = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events a pass applies")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--accounts", type=int, default=500)
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3, help="passes of each mode and workload")
    p.add_argument("--modes", default="pure,compiled",
                   help="comma-separated: pure, compiled, main")
    p.add_argument("--workloads", default="track,mix", help="comma-separated: track, mix")
    p.add_argument("--stores", default="core,sqlite", help="comma-separated: core, sqlite")
    p.add_argument("--compile", default=COMPILE, metavar="PATHS",
                   help="comma-separated sources (relative to the checkout) to compile")
    p.add_argument("--main", type=Path, metavar="PATH",
                   help="another checkout whose `gateway` runs as the mode `main`")
    p.add_argument("--callgrind", action="store_true",
                   help="count instructions instead (valgrind): each pass at --events and "
                        "at 3 times that, the difference over the events between")
    p.add_argument("--windows", type=int, default=0, metavar="EVENTS",
                   help="one pass per mode on the sqlite store, its bodies made in the pass "
                        "(so that a 3M-event pass fits in memory), the CPU of each stage "
                        "reported per window of EVENTS applied events")
    p.add_argument("--older-days", default="0", metavar="N[,N...]",
                   help="sqlite store: N older days' dedupe tables made before the clock starts")
    p.add_argument("--older-keys", type=int, default=3_000_000, metavar="K",
                   help="random keys in each older day (default 3,000,000)")
    p.add_argument("--rebuild", action="store_true",
                   help="sqlite store, with --older-days: time only what a start spends making "
                        "the dedupe window's bits from the older days' tables (CPU s, µs a key)")
    p.add_argument("--flush-interval", type=float, metavar="S",
                   help="--child: the settings' flush_interval (callgrind's passes: an hour)")
    p.add_argument("--older-db", type=Path, metavar="PATH",
                   help="--child: start from a copy of this gateway.db (the parent's fill)")
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--child", action="store_true",
                   help="one pass in this process (`--workload`, `--store`, `--bodies`)")
    p.add_argument("--workload", default="track", help="--child: track or mix")
    p.add_argument("--store", default="core", help="--child: core or sqlite")
    p.add_argument("--bodies", type=Path, help="--child: the bodies (msgpack list of bytes)")
    args = p.parse_args(argv)
    if args.users < args.accounts:
        p.error("--users must be at least --accounts")
    args.mode_list = [m for m in args.modes.split(",") if m]
    for mode in args.mode_list:
        if mode not in ("pure", "compiled", "main"):
            p.error(f"--modes: unknown mode {mode!r}")
    if args.callgrind and shutil.which("valgrind") is None:
        p.error("--callgrind: valgrind is not installed")
    if args.windows < 0:
        p.error("--windows must be >= 0")
    if args.windows and (args.callgrind or args.stores != "sqlite" and not args.child):
        p.error("--windows takes --stores sqlite, without --callgrind")
    try:
        args.older_list = [int(n) for n in args.older_days.split(",")]
    except ValueError:
        p.error(f"--older-days: not a number or a list of numbers: {args.older_days!r}")
    if min(args.older_list) < 0 or args.older_keys < 0:
        p.error("--older-days and --older-keys must be >= 0")
    if max(args.older_list) and args.stores != "sqlite" and not args.child:
        p.error("--older-days takes --stores sqlite")
    if args.rebuild and not args.child and (
            not max(args.older_list) or args.callgrind or args.windows):
        p.error("--rebuild takes --older-days N (N > 0), without --callgrind or --windows")
    if "main" in args.mode_list and args.main is None:
        p.error("--modes main needs --main PATH")
    for w in args.workloads.split(",") + [args.workload]:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    for s in args.stores.split(",") + [args.store]:
        if s not in ("core", "sqlite"):
            p.error(f"unknown store {s!r}")
    return args


def bodies(args: argparse.Namespace, workload: str) -> list[bytes]:
    traffic = Traffic(accounts=args.accounts, users=args.users,
                      mix=parse_mix(WORKLOADS[workload]), seed=1, id_prefix="ba")
    return [traffic.batch(args.batch_size).body
            for _ in range(max(1, args.events // args.batch_size))]


# the child: one pass


class MemoryTurn:
    """A turn against `MemoryStore`'s dicts: every role of `Turn`, no I/O."""

    def __init__(self, store: MemoryStore) -> None:
        self.s = store

    @property
    def now(self) -> float:
        return time.time()

    @property
    def inbox(self) -> MemoryTurn:
        return self

    @property
    def state(self) -> MemoryTurn:
        return self

    @property
    def outbox(self) -> MemoryTurn:
        return self

    @property
    def dead(self) -> MemoryTurn:
        return self

    # inbox
    def applied(self, done: Mapping[int, int]) -> None:
        for row_id, n in done.items():
            self.s.applied[row_id] = self.s.applied.get(row_id, 0) + n

    # state
    def remember(self, keys: list[bytes]) -> set[bytes]:
        seen = self.s.keys.intersection(keys)
        self.s.keys.update(keys)
        return seen

    def ledger(self, keys: Iterable[Any]) -> dict[Any, Any]:
        rows = self.s.ledger
        return {k: rows[k] for k in keys if k in rows}

    def put_ledger(self, rows: list[Any]) -> None:
        for row in rows:
            self.s.ledger[row.key] = row

    def known(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        known = self.s.known
        return {k: known[k] for k in keys if k in known}

    def put_known(self, rows: list[Any]) -> None:
        for row in rows:
            self.s.known[(row.source, row.key)] = row

    def put_accounts(self, rows: list[tuple[str, str, str]]) -> None:
        for source, user, account in rows:
            self.s.accounts[(source, user)] = account

    # outbox (`add` is the dead letters' too: both count what they are given)
    def unsent(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        unsent = self.s.unsent
        return {k: unsent[k] for k in keys if k in unsent}

    def add(self, items: list[Any]) -> None:
        for item in items:
            self.s.queued += getattr(item, "repeat", 1)

    def replace(self, calls: list[Any]) -> None:
        for call in calls:
            self.s.unsent[(call.source, call.key)] = call.body

    # dead letters
    def open_groups(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], int]:
        return {}

    def join(self, occurrences: Mapping[int, int]) -> None:
        pass


class MemoryStore:
    """What a drain of the dispatcher calls of a store, in dicts."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows  # InboxRow, ids 1, 2, ...
        self.applied: dict[int, int] = {}
        self.keys: set[bytes] = set()
        self.ledger: dict[Any, Any] = {}
        self.known: dict[tuple[str, str], Any] = {}
        self.unsent: dict[tuple[str, str], bytes] = {}
        self.accounts: dict[tuple[str, str], str] = {}
        self.queued = 0

    async def inbox_after(self, cursor: int, limit: int) -> list[Any]:
        return self.rows[cursor : cursor + limit]

    def take(self, row_id: int, count: int) -> None:
        return None  # as a store that keeps no takes

    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]:
        accounts = self.accounts
        return {u: a for u in users if (a := accounts.get((source, u))) is not None}

    def transact(self, script: Callable[[Any], T], now: float | None = None,
                 partition: int = 0) -> Awaitable[T]:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(script(MemoryTurn(self)))
        return cast("Awaitable[T]", fut)


# the stages `--windows` times: (module, class or None, attribute), each wrapped to add its
# thread CPU to its stage (nested stages overlap: `turn` holds the others); a stage the
# checkout does not have is left out
STAGES = {
    "turn": ("gateway.actors.dispatcher", None, "commit"),
    "dedupe": ("gateway.store.sqlite", "_Dedupe", "add"),
    "dedupe_probe": ("gateway.store.sqlite", None, "_probe"),
    "dedupe_insert": ("gateway.store.sqlite", None, "_insert"),
    "dedupe_merge": ("gateway.store.sqlite", "_Dedupe", "_merge"),
    "ledger_read": ("gateway.store.sqlite", "SqliteTurn", "ledger"),
    "ledger_write": ("gateway.store.sqlite", "SqliteTurn", "put_ledger"),
    "outbox": ("gateway.store.sqlite", "_OutboxTurn", "add"),
    "progress": ("gateway.store.sqlite", "SqliteTurn", "applied"),
}


class Windows:
    """The CPU of each stage of the apply, per window of `size` applied events.

    A window closes at the end of the turn that crosses its bound (on the writer thread,
    from the wrapped `commit`); what it reads then (table sizes, the log's size) is left out of the
    stages' CPU."""

    def __init__(self, size: int, db: Path, writer: int) -> None:
        import importlib
        import threading

        self.size = size
        self.db = db
        self.main = threading.get_ident()
        self.writer = writer  # the writer thread's ident
        self.spent = dict.fromkeys(STAGES, 0.0)
        self.events = 0
        self.merges = 0
        self.gc_s = 0.0
        self._gc_start = 0.0
        self.rows: list[dict[str, Any]] = []
        self._last: dict[str, float] = {}
        for stage, (module, owner, attr) in STAGES.items():
            target: Any = importlib.import_module(module)
            if owner is not None:
                target = getattr(target, owner, None)
            if target is None or not hasattr(target, attr):
                del self.spent[stage]
                continue
            setattr(target, attr, self._timed(stage, getattr(target, attr)))
        gc.callbacks.append(self._gc)

    def _timed(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        spent = self.spent
        clock = time.thread_time

        def timed(*a: Any, **kw: Any) -> T:
            start = clock()
            try:
                return fn(*a, **kw)
            finally:
                spent[stage] += clock() - start
                if stage == "dedupe" and getattr(a[0], "_new", 1) == 0:
                    self.merges += 1
                if stage == "progress":
                    self.events += sum(a[1].values())
                elif stage == "turn":  # a window closes between turns
                    self._close(a[1].conn)

        return timed

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start

    def _cpu(self) -> dict[str, float]:
        return {
            "writer": time.clock_gettime(time.pthread_getcpuclockid(self.writer)),
            "dispatcher": time.clock_gettime(time.pthread_getcpuclockid(self.main)),
            "gc": self.gc_s, **self.spent,
        }

    def start(self) -> None:
        self._last = self._cpu()
        self._reads = reads()
        self._last_events = 0
        self._last_merges = 0

    def _close(self, conn: Any) -> None:
        if self.events - self._last_events < self.size:
            return
        now = self._cpu()
        n = self.events - self._last_events
        us = {k: round((now[k] - self._last.get(k, 0.0)) * 1e6 / n, 3) for k in now}
        # what the turn does besides the store's calls, and the transaction around it
        us["rules"] = round(us["turn"] - sum(us.get(k, 0.0) for k in (
            "dedupe", "ledger_read", "ledger_write", "outbox", "progress")), 3)
        us["transaction"] = round(us["writer"] - us["turn"], 3)
        us["dedupe_rest"] = round(us["dedupe"] - sum(us.get(k, 0.0) for k in (
            "dedupe_probe", "dedupe_insert", "dedupe_merge")), 3)
        tables = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'dedupe_*'")]
        wal = self.db.with_name(self.db.name + "-wal")
        self.rows.append({
            "events": self.events, "window_events": n, "us_per_event": us,
            "merges": self.merges - self._last_merges,
            "dedupe_rows": {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                            for t in tables},
            "outbox_rows": conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0],
            "ledger_rows": conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0],
            "wal_mb": round(wal.stat().st_size / 1e6, 1) if wal.exists() else 0.0,
            "db_mb": round(self.db.stat().st_size / 1e6, 1),
            "gc_collections": [g["collections"] for g in gc.get_stats()],
            # `read` calls (the OS's page cache: pages SQLite's own cache did not hold)
            "reads_per_event": round((reads() - self._reads) / n, 3),
            "rss_mb": rss_mb(),
        })
        print(f"{self.events:>9} events: " + " ".join(
            f"{k} {v}" for k, v in us.items()), file=sys.stderr, flush=True)
        self._last_events = self.events
        self._last_merges = self.merges
        self._last = self._cpu()  # the reads above left out
        self._reads = reads()


def reads() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def stream_bodies(args: argparse.Namespace) -> Iterable[bytes]:
    traffic = Traffic(accounts=args.accounts, users=args.users,
                      mix=parse_mix(WORKLOADS[args.workload]), seed=1, id_prefix="ba")
    for _ in range(max(1, args.events // args.batch_size)):
        yield traffic.batch(args.batch_size).body


def fill_older_days(db: Path, days: int, keys: int, now: float) -> dict[str, Any]:
    """`days` UTC days before `now`'s, `keys` random dedupe keys each, in the tables and
    the split the store's `_Dedupe` makes (a checkout without `CAP` keeps a day in one
    large table; one without `MERGE` leaves the small table empty)."""
    import random
    import sqlite3

    from gateway.keys import DEDUPE_BYTES
    from gateway.store import sqlite as store

    dedupe: Any = store._Dedupe
    cap: int = getattr(dedupe, "CAP", 0) or max(keys, 1)
    merge: int = getattr(dedupe, "MERGE", 0) or max(keys, 1)
    rng = random.Random(9)
    start = time.perf_counter()
    tables: dict[str, int] = {}
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for back in range(1, days + 1):
            day = time.strftime("%Y%m%d", time.gmtime(now - back * 86400))
            blob = rng.randbytes(keys * DEDUPE_BYTES)
            made = [blob[i : i + DEDUPE_BYTES] for i in range(0, len(blob), DEDUPE_BYTES)]
            small = keys % merge  # the keys since the day's last merge
            large = sorted(made[: keys - small])
            parts = [large[i : i + cap] for i in range(0, len(large), cap)] or [[]]
            names = [f"dedupe_{day}"] + [f"dedupe_{day}_{i}" for i in range(1, len(parts))]
            for name, part in [*zip(names, parts, strict=True),
                                (f"dedupe_{day}_new", made[keys - small :])]:
                conn.execute(f"CREATE TABLE {name} (key BLOB PRIMARY KEY) WITHOUT ROWID")
                conn.execute("BEGIN")
                conn.executemany(f"INSERT INTO {name} VALUES (?)", ((k,) for k in sorted(part)))
                conn.execute("COMMIT")
                tables[name] = len(part)
    finally:
        conn.close()
    return {"older_days": days, "older_keys": keys, "older_tables": tables,
            "older_fill_s": round(time.perf_counter() - start, 1),
            "db_mb_before": round(db.stat().st_size / 1e6, 1) if db.exists() else 0.0}


async def one_pass(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from gateway.actors import router as router_module
    from gateway.actors.dispatcher import Dispatcher
    from gateway.actors.router import Router
    from gateway.backlog import Backlog
    from gateway.config import Settings, Source
    from gateway.observability.metrics import Metrics
    from gateway.store import InboxRow, SqliteStore, Store

    source = Source(write_key="wk_bench_apply", accoil_api_key="key_bench_apply", name="main")
    settings = Settings(sources=[source], data_dir=str(folder))
    if args.flush_interval:
        settings = Settings(sources=[source], data_dir=str(folder),
                            flush_interval=args.flush_interval)
    made: Iterable[bytes]
    if args.bodies:
        made = msgspec.msgpack.decode(args.bodies.read_bytes(), type=list[bytes])[
            : max(1, args.events // args.batch_size)]
    elif args.windows:
        made = stream_bodies(args)  # never all in memory at once
    else:
        made = bodies(args, args.workload)
    batch: list[bytes] = []
    received = time.time()
    sqlite: SqliteStore | None = None
    memory: MemoryStore | None = None
    older: dict[str, Any] = {}
    if args.older_db:
        shutil.copyfile(args.older_db, folder / "gateway.db")
        older = json.loads(args.older_db.with_suffix(".json").read_text())
    elif max(args.older_list):
        if args.store != "sqlite":
            raise SystemExit("--older-days needs the sqlite store")
        older = fill_older_days(folder / "gateway.db", max(args.older_list), args.older_keys,
                                received)
    if args.store == "sqlite":
        sqlite = SqliteStore(folder / "gateway.db", fsync=settings.fsync)
        await sqlite.open()
        fed = len([await sqlite.accept(source.id, received, body, args.batch_size)
                   for body in made])
        await sqlite.restart_inbox()
        store: Any = sqlite
    else:
        batch = list(made)
        fed = len(batch)
        store = memory = MemoryStore([InboxRow(i + 1, source.id, received, body, args.batch_size)
                                      for i, body in enumerate(batch)])
    dispatcher = Dispatcher(cast(Store, store), Router(store, {source.id: source}), settings,
                            Metrics([source.id]), Backlog(10**9), lambda src: None)
    # as the worker does (`gateway.worker`): start-up's objects left out of collections
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    windows = None
    if args.windows:
        if sqlite is None:
            raise SystemExit("--windows needs the sqlite store")
        assert sqlite._writer is not None and sqlite._writer.ident is not None
        windows = Windows(args.windows, folder / "gateway.db", sqlite._writer.ident)
        windows.start()
    dispatcher.stop()  # route what the inbox holds, commit, return
    wall, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    await dispatcher.run()
    main_cpu = time.thread_time() - main_cpu
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    events = fed * args.batch_size
    if sqlite is not None:
        counts = await sqlite.counts()
        await sqlite.close()
        if counts.inbox:
            raise SystemExit(f"the inbox still holds {counts.inbox} messages")
    elif memory is not None and sum(memory.applied.values()) != events:
        raise SystemExit(f"{sum(memory.applied.values())} of {events} messages applied")
    us = 1e6 / events
    out: dict[str, Any] = {"router_file": router_module.__file__, "events": events,
                           "wall_s": round(wall, 3), "cpu_us_per_event": round(cpu * us, 3)}
    if sqlite is not None:
        out["dispatcher_thread_us_per_event"] = round(main_cpu * us, 3)
        out["writer_us_per_event"] = round((cpu - main_cpu) * us, 3)
    if windows is not None:
        out["windows"] = windows.rows
    return out | older


def rebuild_pass(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """What a start spends on the window's bits: the store's first look at its dedupe
    tables (`_Dedupe.days`), on a copy of the older days' database."""
    import sqlite3

    from gateway.store import sqlite as store

    db = folder / "gateway.db"
    shutil.copyfile(args.older_db, db)
    older = json.loads(args.older_db.with_suffix(".json").read_text())
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
    wall, cpu = time.perf_counter(), time.process_time()
    store._Dedupe().days(conn)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    conn.close()
    keys = sum(older["older_tables"].values())
    return {"router_file": store.__file__, "keys": keys, "rebuild_cpu_s": round(cpu, 3),
            "rebuild_wall_s": round(wall, 3), "events": keys,
            "cpu_us_per_event": round(cpu * 1e6 / keys, 3), "rss_mb": rss_mb()}


def child(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        rebuild = args.rebuild and args.older_db
        result = rebuild_pass(args, Path(tmp)) if rebuild else asyncio.run(one_pass(args, Path(tmp)))
    print(json.dumps(result))
    return 0


# the parent: a compiled copy, then alternated passes


def class_keywords(path: Path) -> list[str]:
    """The classes of `path` defined with keywords (other than `metaclass`)."""
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.name}: class {node.name}({', '.join(k.arg or '**' for k in node.keywords)}=)"
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and any(k.arg != "metaclass" for k in node.keywords)]


def compiled_copy(sources: list[str], dest: Path) -> Path:
    """This checkout's `gateway` copied under `dest`, `sources` compiled there by mypyc."""
    refused = [c for s in sources for c in class_keywords(ROOT / s)]
    if refused:
        raise SystemExit("mypyc would drop these class keywords (python/mypy#21938): "
                         + "; ".join(refused))
    shutil.copytree(ROOT / "gateway", dest / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    mypyc = Path(sys.executable).with_name("mypyc")
    print(f"compiling {len(sources)} modules with mypyc...", file=sys.stderr)
    done = subprocess.run([str(mypyc), *sources], cwd=dest, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"mypyc failed:\n{done.stdout}\n{done.stderr}")
    return dest


def run_pass(args: argparse.Namespace, first: Path, workload: str, store: str,
             stored: Path, older: Path | None = None) -> dict[str, Any]:
    if not args.callgrind:
        result = run_child(args, first, workload, store, stored, args.events, older=older)
    else:
        small = run_child(args, first, workload, store, stored, args.events, callgrind=True,
                          older=older)
        result = run_child(args, first, workload, store, stored, 3 * args.events,
                           callgrind=True, older=older)
        events = result["events"] - small["events"]
        result["instructions_per_event"] = round(
            (result["instructions"] - small["instructions"]) / events)
    if not Path(result["router_file"]).is_relative_to(first):
        raise SystemExit(f"the pass imported {result['router_file']}, not from {first}")
    return result


def run_child(args: argparse.Namespace, first: Path, workload: str, store: str, stored: Path,
              events: int, callgrind: bool = False, older: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(first), str(SCRIPTS)])
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child",
           "--workload", workload, "--store", store, "--events", str(events),
           "--batch-size", str(args.batch_size),
           "--accounts", str(args.accounts), "--users", str(args.users)]
    if older is not None:
        cmd += ["--older-db", str(older)] + (["--rebuild"] if args.rebuild else [])
    # with --windows the pass makes its bodies as it feeds them: a 3M-event list is 600 MB
    cmd += ["--windows", str(args.windows)] if args.windows else ["--bodies", str(stored)]
    if callgrind:
        env["PYTHONHASHSEED"] = "0"
        # turns cut by their count only, not by the clock, which callgrind slows 50 times:
        # the same turns in every run, so the same instructions
        cmd += ["--flush-interval", "3600"]
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pass {first}/{workload}/{store} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if callgrind:
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"no instruction count from callgrind:\n{done.stderr}")
        result["instructions"] = int(found.group(1))
    return result


def parent(args: argparse.Namespace) -> int:
    results: Results = {}
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        folders = {"pure": ROOT, "main": args.main.resolve() if args.main else ROOT}
        if "compiled" in args.mode_list:
            folders["compiled"] = compiled_copy(args.compile.split(","), Path(tmp) / "compiled")
        # made once: every pass applies the same bodies, and none spends its time making them
        stored = {w: Path(tmp) / f"{w}.msgpack" for w in args.workloads.split(",")}
        made = argparse.Namespace(**vars(args))
        made.events = args.events * (3 if args.callgrind else 1)
        for w, path in stored.items():
            if not args.windows and not args.rebuild:
                path.write_bytes(msgspec.msgpack.encode(bodies(made, w)))
        # the older days filled once for each N, before any pass: each pass starts from a copy
        older: dict[int, Path | None] = {}
        for n in args.older_list:
            older[n] = None
            if n:
                db = Path(tmp) / f"older{n}" / "gateway.db"
                db.parent.mkdir()
                db.with_suffix(".json").write_text(json.dumps(
                    fill_older_days(db, n, args.older_keys, time.time())))
                older[n] = db
        for store in args.stores.split(","):
            for workload in args.workloads.split(","):
                for _ in range(args.rounds):
                    for n in args.older_list:
                        key = f"{workload}_older{n}" if len(args.older_list) > 1 else workload
                        for mode in args.mode_list:
                            r = run_pass(args, folders[mode], workload, store, stored[workload],
                                         older[n])
                            r["load_average"] = round(os.getloadavg()[0], 2)
                            results.setdefault(store, {}).setdefault(key, {}).setdefault(
                                mode, []).append(r)
                            ins = r.get("instructions_per_event")
                            print(f"{store:6} {key:5} {mode:8} {r['cpu_us_per_event']:6.2f} "
                                  f"µs an event" + (f", {ins} instructions" if ins else "")
                                  + f" (load {r['load_average']}, {r['router_file']})",
                                  file=sys.stderr)
    return report(args, results)


def summary(passes: list[dict[str, Any]], field: str) -> dict[str, Any]:
    values = [p[field] for p in passes]
    return {"passes": values, "min": min(values), "median": round(statistics.median(values), 3)}


def report(args: argparse.Namespace, results: Results) -> int:
    out: dict[str, Any] = {
        "measure": "callgrind" if args.callgrind else "cpu", "events": args.events, "batch_events": args.batch_size, "accounts": args.accounts,
        "users": args.users, "rounds": args.rounds, "modes": args.mode_list,
    }
    if max(args.older_list):
        out["older_days"] = args.older_list if len(args.older_list) > 1 else args.older_list[0]
        out["older_keys"] = args.older_keys
    if "compiled" in args.mode_list:
        out["compiled"] = args.compile.split(",")
    for store, by_workload in results.items():
        for workload, by_mode in by_workload.items():
            entry: dict[str, Any] = {}
            for mode, runs in by_mode.items():
                entry[mode] = {"cpu_us_per_event": summary(runs, "cpu_us_per_event"),
                               "load_average": [r["load_average"] for r in runs]}
                if args.rebuild:
                    for field in ("rebuild_cpu_s", "rebuild_wall_s"):
                        entry[mode][field] = summary(runs, field)
                elif store == "sqlite":
                    for field in ("dispatcher_thread_us_per_event", "writer_us_per_event"):
                        entry[mode][field] = summary(runs, field)
                if "older_tables" in runs[0]:
                    entry[mode]["older_fill_s"] = [r["older_fill_s"] for r in runs]
                    entry[mode]["older_tables"] = runs[0]["older_tables"]
                if args.callgrind:
                    entry[mode]["instructions_per_event"] = summary(
                        runs, "instructions_per_event")
                if args.windows:
                    entry[mode]["windows"] = [r["windows"] for r in runs]
            measure = "instructions_per_event" if args.callgrind else "cpu_us_per_event"
            for mode in ("compiled", "main"):
                if "pure" in entry and mode in entry:
                    entry[f"{mode}_vs_pure"] = round(
                        entry[mode][measure]["median"] / entry["pure"][measure]["median"], 3)
            out[f"{store}_{workload}"] = entry
    line = json.dumps(out)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
