"""The pipeline in a process of its own, so that ingest keeps a core to itself.

Ingest's process (the front) starts the worker (`worker_command`: this very package, never
one the working directory may hold) with a socket's descriptor, and talks to it over a
socket pair, one JSON object a line: the settings first, then requests, a tagged union of
Structs (`Stats`, `MetricsText`, `Requeue`, `Stop`, told apart by `type`), each answered
with a `Reply` of the same `id`. Both processes open the
same store (see `gateway.store.sqlite`: ingest appends to the inbox, the worker writes the
rest) and share the backlog counters (see `gateway.backlog`).

- The worker runs at a lower CPU priority (`pipeline_nice`): when both want the CPU,
  acknowledging requests comes first; the inbox is durable, so a burst waits there.
- SIGINT and SIGTERM are the front's to handle: it stops accepting, then asks the worker
  to drain (`stop`). If the front dies, the worker sees its end of the socket close and
  exits at once, as if killed; the next start replays the inbox.
- The worker holds the front's lock on the data directory (an inherited descriptor), so a
  new gateway on that directory waits until both old processes are gone.
- If the worker dies, the front starts another.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from gateway.backlog import Backlog
from gateway.config import Settings
from gateway.store import Counts
from gateway.tasks import stop_tasks

log = structlog.get_logger("gateway.worker")

LIMIT = 64 * 1024 * 1024  # longest line: a metrics exposition fits many times over
RESTART = 1.0  # seconds before a worker that died is started again
# seconds the front waits for the worker's answer to a request (a stop: its drain and this
# much): far beyond a busy worker's (it runs at a lower priority), so only a wedged one fails
ANSWER = 20.0
STOP_MARGIN = 5.0

_encode = msgspec.json.encode


# The front's requests: a tagged union, one Struct per request (`{"type": "stats", ...}`)


class Stats(msgspec.Struct, tag="stats"):
    id: int


class MetricsText(msgspec.Struct, tag="metrics"):
    id: int


class Requeue(msgspec.Struct, tag="requeue"):
    id: int
    ids: list[int]  # dead letters whose calls go back to the outbox


class Stop(msgspec.Struct, tag="stop"):
    id: int
    within: float  # seconds the drain may take


Request = Stats | MetricsText | Requeue | Stop


class Reply(msgspec.Struct, omit_defaults=True):
    id: int
    result: dict[str, Any] | str | int | None = None
    error: str | None = None


_decode_request = msgspec.json.Decoder(Request).decode


class Ready(msgspec.Struct):
    """The worker's first line: it runs, and what the store held when it started."""

    counts: Counts


class WorkerError(Exception):
    pass


class WorkerUnavailable(WorkerError):
    """The worker cannot answer now: it is frozen or wedged (no answer within `within`
    seconds), or gone (its process exited, and the front is starting another: `within`
    is None). A retry may pass; a `WorkerError` that is not this one is the worker's own
    failure at the request, which it logged."""

    def __init__(self, message: str, within: float | None = None) -> None:
        super().__init__(message)
        self.within = within


class RemotePipeline:
    """The front's handle on the worker process: the same methods as `Pipeline`."""

    committed = None  # the worker reads the inbox from the store, not from memory

    def __init__(self, settings: Settings, lock_fd: Callable[[], int]) -> None:
        """`lock_fd()`: the front's lock on the data directory, for the worker to hold too."""
        self.settings = settings
        self._lock_fd = lock_fd
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._answering = False  # a worker is up and its replies are read
        self._next = 0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._replies: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    async def start(self) -> Counts:
        counts = await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="worker-supervisor")
        return counts

    async def _spawn(self) -> Counts:
        if self._writer is not None:  # the end of the socket to a worker that died
            self._writer.close()
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *worker_command(), str(theirs.fileno()),
                pass_fds=(theirs.fileno(), self._lock_fd()),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_connection(sock=ours, limit=LIMIT)
        self._writer.write(msgspec.json.encode(self.settings) + b"\n")
        line = await self._reader.readline()
        if not line:
            raise WorkerError("the pipeline worker exited while starting (see its log)")
        ready = msgspec.json.decode(line, type=Ready)
        self._answering = True
        self._replies = asyncio.create_task(self._read_replies(self._reader), name="worker-replies")
        log.info("pipeline worker started", pid=self._proc.pid)
        return ready.counts

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                reply = msgspec.json.decode(line, type=Reply)
                fut = self._pending.pop(reply.id, None)
                if fut is None or fut.done():
                    continue
                if reply.error is not None:
                    fut.set_exception(WorkerError(reply.error))
                else:
                    fut.set_result(reply.result)
        except ConnectionError as exc:
            # a worker killed with requests it had not read resets the socket
            log.info("pipeline worker connection reset", error=repr(exc))
        if reader is self._reader:
            # the worker's end closed: it is gone, and a request now would wait in vain
            self._answering = False
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(WorkerUnavailable("the pipeline worker is gone"))
        self._pending.clear()

    async def _supervise(self) -> None:
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            log.error("pipeline worker exited; starting another", code=code)
            await asyncio.sleep(RESTART)
            try:
                await self._spawn()
            except Exception:
                log.exception("could not start the pipeline worker")

    def _id(self) -> int:
        self._next += 1
        return self._next

    async def _call(self, request: Request, within: float | None = None) -> Any:
        """The worker's answer to `request`; `WorkerError` naming the request when the
        worker is not running, is gone, or has not answered within `within` seconds
        (`ANSWER` by default)."""
        name = type(request).__name__
        within = ANSWER if within is None else within
        if not self._answering or self._writer is None or self._writer.is_closing():
            raise WorkerUnavailable(f"the pipeline worker is not running ({name} not sent)")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = fut
        self._writer.write(_encode(request) + b"\n")
        try:
            async with asyncio.timeout(within):
                return await fut
        except TimeoutError:
            raise WorkerUnavailable(
                f"the pipeline worker did not answer {name} within {within:g} s", within
            ) from None
        finally:
            self._pending.pop(request.id, None)

    async def stop(self, within: float) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        try:
            await self._call(Stop(self._id(), within), within=within + STOP_MARGIN)
        except WorkerError as exc:
            log.warning("pipeline worker did not drain", error=str(exc))
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._writer is not None:
            self._writer.close()
        await stop_tasks([self._watch])

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(Stats(self._id()))
        return result

    async def metrics_text(self) -> bytes:
        text: str = await self._call(MetricsText(self._id()))
        return text.encode()

    async def requeue(self, ids: list[int]) -> int:
        n: int = await self._call(Requeue(self._id(), ids))
        return n


async def _serve(sock: socket.socket) -> None:
    # imported here: the front imports this module for `RemotePipeline` only
    from gateway.disk import Disk
    from gateway.observability.logging import Redactor, configure_logging
    from gateway.observability.metrics import Metrics
    from gateway.pipeline import Pipeline
    from gateway.store import SqliteStore, Store

    reader, writer = await asyncio.open_connection(sock=sock, limit=LIMIT)
    settings = msgspec.json.decode(await reader.readline(), type=Settings)
    configure_logging(
        settings.log_format, settings.log_level, redactor=Redactor.from_settings(settings)
    )
    with contextlib.suppress(OSError):
        os.nice(settings.pipeline_nice)
    data = Path(settings.data_dir)
    metrics = Metrics(s.id for s in settings.sources)
    backlog = Backlog(settings.max_backlog, data / "backlog")
    # the front makes the reserve; this process releases it when a write of its own is refused
    disk = Disk(data, settings.disk_reserve, owner=False)
    store: Store
    if settings.store == "redis":
        from gateway.store.redis.metrics import RedisMetrics
        from gateway.store.redis.store import RedisStore

        store = RedisStore(settings, apply=True, metrics=RedisMetrics(metrics.pipeline_registry))
    else:
        store = SqliteStore(data / "gateway.db", fsync=settings.fsync, ingest=False)
        store.on_refused = disk.refused
    pipeline = Pipeline(settings, store, metrics, backlog, disk)
    pipeline.on_failure = _exit_failed
    await store.open()
    counts = await pipeline.start()
    # as the front does (`gateway.server`): each message applied allocates short-lived
    # objects, and with the default threshold (700) the young generation was collected
    # several times a request, each pass walking what the turn holds: a third of the
    # router's and actors' CPU. What start-up built is left out of every collection.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    writer.write(msgspec.json.encode(Ready(counts)) + b"\n")

    async def answer(req: Request) -> None:
        reply = Reply(req.id)
        try:
            match req:
                case Stats():
                    reply.result = await pipeline.stats()
                case MetricsText():
                    reply.result = metrics.render_pipeline().decode()
                case Requeue(ids=ids):
                    reply.result = await pipeline.requeue(ids)
                case Stop(within=within):
                    await pipeline.stop(within)
                    await store.close()
                    backlog.close()
        except Exception as exc:
            log.exception("worker request failed", request=type(req).__name__)
            reply.error = repr(exc)
        writer.write(_encode(reply) + b"\n")

    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        req = _decode_request(line)
        if isinstance(req, Stop):
            await answer(req)
            await writer.drain()
            return
        task = asyncio.create_task(answer(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    # the front is gone without a word: stop at once, as a crash would; the store is
    # consistent at every commit and the next start replays the inbox
    log.warning("front process gone: worker exiting")
    os._exit(1)


def _exit_failed(exc: BaseException) -> None:
    """The dispatcher failed: leave, so that the front starts a worker that replays the
    inbox from the store (dedupe drops what was already applied)."""
    sys.stderr.flush()
    os._exit(1)


def worker_command() -> list[str]:
    """The worker's command line: the `gateway` package this process runs, whatever the
    working directory holds. `-m` would put the working directory first on the path, where a
    folder named `gateway` (another checkout, another version) would run instead; `-P`
    leaves it out, and the folder this package was imported from goes first."""
    root = str(Path(__file__).resolve().parent.parent)
    boot = f"import sys; sys.path.insert(0, {root!r}); from gateway.worker import main; main()"
    return [sys.executable, "-P", "-c", boot]


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    started = time.monotonic()
    try:
        asyncio.run(_serve(sock))
    except Exception:
        structlog.get_logger("gateway.worker").exception(
            "pipeline worker failed", after_s=round(time.monotonic() - started, 1)
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
