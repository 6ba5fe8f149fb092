"""The pipeline's watch on its dispatcher: a failure is said, and handed on, never silent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.backlog import Backlog
from gateway.config import Settings, Source
from gateway.disk import Disk
from gateway.observability.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store import SqliteStore

SOURCE = Source(write_key="wk_test_1", accoil_api_key="key_test_1", name="main")


async def dispatched(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    run: Callable[[], Awaitable[None]],
) -> tuple[Pipeline, list[BaseException], list[MutableMapping[str, Any]]]:
    """A pipeline whose dispatcher runs `run`, started and given a few loop turns: the
    pipeline, the failures handed to `on_failure`, and the error logs."""
    settings = Settings(sources=[SOURCE], data_dir=str(tmp_path))
    pipeline = Pipeline(settings, store, Metrics(["main"]), Backlog(1000),
                        Disk(tmp_path, 0, owner=False))
    failures: list[BaseException] = []
    pipeline.on_failure = failures.append
    monkeypatch.setattr(pipeline.actors, "run", run)
    with capture_logs() as logs:
        pipeline._dispatch()
        for _ in range(10):
            await asyncio.sleep(0)
    return pipeline, failures, [e for e in logs if e["log_level"] == "error"]


async def test_a_failed_dispatcher_is_logged_and_handed_to_on_failure(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boom = RuntimeError("a bug in a turn")

    async def fail() -> None:
        raise boom

    pipeline, failures, errors = await dispatched(store, tmp_path, monkeypatch, fail)
    assert failures == [boom]
    assert [e["event"] for e in errors] == ["dispatcher failed: nothing more is applied"]
    await pipeline.stop(0.1)  # a stop after the failure does not raise it again


async def test_a_dispatcher_that_stops_normally_is_not_a_failure(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def done() -> None:
        return None

    _, failures, errors = await dispatched(store, tmp_path, monkeypatch, done)
    assert failures == [] and errors == []
