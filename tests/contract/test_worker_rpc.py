"""The front's requests to the pipeline worker are bounded: a worker that does not answer
(frozen, wedged) fails the request with an error naming it, rather than holding it, or the
admin route that asked, for ever."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gateway import worker
from gateway.worker import RemotePipeline, WorkerError
from mock_accoil.server import MockAccoilServer
from tests.contract import harness


async def test_a_request_to_a_frozen_worker_fails_naming_the_request(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "ANSWER", 1.0)
    settings = harness.settings_for(mock_accoil.url, tmp_path, pipeline="process")
    async with harness.running(settings) as gw:
        remote = gw.gateway.pipeline
        assert isinstance(remote, RemotePipeline) and remote._proc is not None
        pid = remote._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(WorkerError, match="did not answer Stats within 1 s"):
                await remote.stats()
            with pytest.raises(WorkerError, match="did not answer MetricsText within 1 s"):
                await remote.metrics_text()
            # the operator's route fails at the bound too, instead of waiting
            async with gw.http.get(gw.url + "/metrics") as resp:
                assert resp.status == 500
        finally:
            os.kill(pid, signal.SIGCONT)
        # running again, the same worker answers; the late replies are dropped
        assert (await remote.stats())["busy"] is False
        assert (await gw.post("/v1/track", {"userId": "u1", "event": "E", "messageId": "m1"}))[0] == 200
        await gw.idle(timeout=30)
    assert mock_accoil.count("u1", "E") == 1
