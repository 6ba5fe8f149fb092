"""Stopping background tasks for sure, when the first cancellation may be lost.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that lands in the same turn of
the loop as the future it waits for completes (CPython gh-86296, fixed in 3.12), and
redis-py sends every command through it (`Connection.send_packed_command`). A loop that
talks to Redis (a probe, the lease rounds, a resync), cancelled at that moment, carries on,
and a stop that cancelled it once and awaited it waits for ever: `stop_tasks` cancels again
until each task has ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger("gateway.tasks")

# a task still running is cancelled again at each of the loop's next QUICK turns (a loop
# of back-to-back commands is in a send, where the cancellation is lost, most of the time:
# the next lands in the reply's read), then every AGAIN seconds
QUICK = 20
AGAIN = 0.1
WITHIN = 10.0  # seconds a stop waits for its tasks: a loop ends at its next await


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], within: float = WITHIN) -> None:
    """Cancel `tasks` (None: none) and wait until they have ended, cancelling again those
    that carry on (`QUICK`, `AGAIN`); after `within` seconds, log the ones still running and
    return, so that a stop is never held for ever. A task's own failure is logged."""
    pending = {t for t in tasks if t is not None}
    ended = set(pending)
    deadline = time.monotonic() + within
    turns = 0
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            log.error("tasks still running after being cancelled; left behind",
                      tasks=sorted(t.get_name() for t in pending), within_s=within)
            ended -= pending
            break
        for task in pending:
            task.cancel()
        # `wait` neither raises a task's cancellation nor absorbs this one's own; a timeout
        # of 0 still waits for the loop's next turn
        pause = 0.0 if turns < QUICK else min(AGAIN, left)
        turns += 1
        _, pending = await asyncio.wait(pending, timeout=pause)
    for task in ended:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task failed", task=task.get_name(), error=repr(exc),
                      exc_info=exc)
