"""The front's requests to the pipeline worker are bounded: a worker that does not answer
(frozen, wedged) fails the request with an error naming it, rather than holding it, or the
admin route that asked, for ever."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway import worker
from gateway.worker import RemotePipeline, WorkerError
from mock_accoil.server import MockAccoilServer
from tests.contract import harness
from tests.contract.test_process import (
    ADMIN,
    API_KEY,
    WRITE_KEY,
    admin_get,
    gateway_process,
    post_batch,
    wait_until,
    worker_pids,
)


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
            # the operator's route fails at the bound too, instead of waiting, and says so
            async with gw.http.get(gw.url + "/metrics") as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"] == (
                    "the pipeline worker did not answer /metrics within 1 s; try again in 5 s")
        finally:
            os.kill(pid, signal.SIGCONT)
        # running again, the same worker answers; the late replies are dropped
        assert (await remote.stats())["busy"] is False
        assert (await gw.post("/v1/track", {"userId": "u1", "event": "E", "messageId": "m1"}))[0] == 200
        await gw.idle(timeout=30)
    assert mock_accoil.count("u1", "E") == 1


# `python -m gateway serve` with the front's bound on an answer at 1 s, and 4 s before a
# worker that died is replaced (a window to see the front without one)
SERVE = [sys.executable, "-c", "import sys; from gateway import worker; worker.ANSWER = 1.0; "
         "worker.RESTART = 4.0; from gateway.cli import main; sys.exit(main())"]


def refused(url: str, path: str, method: str = "GET") -> tuple[int, str | None, str]:
    """Status, Retry-After and body of an admin request that must fail."""
    req = urllib.request.Request(
        url + path, method=method, data=b"{}" if method == "POST" else None,
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    err = info.value
    body = err.read().decode()
    for secret in (ADMIN, WRITE_KEY, API_KEY, "Traceback", "WorkerUnavailable"):
        assert secret not in body
    return err.code, err.headers.get("Retry-After"), json.loads(body)["error"]


def test_routes_that_ask_a_frozen_or_dead_worker_say_so(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN}
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1", env_extra=env,
                         command=SERVE) as (proc, url):
        assert json.loads(admin_get(url, "/admin/stats"))["inbox_messages"] == 0
        (pid,) = worker_pids(proc.pid)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert refused(url, "/admin/stats") == (503, "5", (
                "the pipeline worker did not answer /admin/stats within 1 s; try again in 5 s"))
            assert refused(url, "/admin/dead-letters/replay", "POST") == (503, "5", (
                "the pipeline worker did not answer /admin/dead-letters/replay within 1 s; "
                "try again in 5 s"))
            assert refused(url, "/metrics")[:2] == (503, "5")
            # what the front answers alone still works: ingest, health, the store's lists
            assert post_batch(url, [{"type": "track", "userId": "f1", "event": "Frozen",
                                     "messageId": "f1"}]) == 200
            assert json.loads(admin_get(url, "/admin/dead-letters"))["dead_letters"] == []
            assert json.loads(admin_get(url, "/healthz")) == {"status": "ok"}
        finally:
            os.kill(pid, signal.SIGCONT)
        # thawed, the same worker answers, and applies what came in meanwhile
        assert json.loads(admin_get(url, "/admin/stats"))["sources"][0]["circuit"] == "closed"
        wait_until(lambda: mock_accoil.count("f1", "Frozen") == 1)

        # killed: until another worker is up, the routes say the worker is not running
        os.kill(pid, signal.SIGKILL)
        gone = ("the pipeline worker is not running (its process exited; another is being "
                "started), so /admin/stats could not be answered; try again in 5 s")
        # (a process at a low priority on a busy machine takes a while to die: the front
        # cannot tell that from a frozen one until then)
        wait_until(lambda: dead(pid))
        assert refused(url, "/admin/stats") == (503, "5", gone)
        wait_until(lambda: [p for p in worker_pids(proc.pid) if p != pid] != [])
        wait_until(lambda: answers(url, "/admin/stats"))


def dead(pid: int) -> bool:
    """Has process `pid` exited (gone, or a zombie not reaped yet)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def answers(url: str, path: str) -> bool:
    try:
        admin_get(url, path)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503, exc.code
        return False
    return True
