"""The gateway as its users run it: `python -m gateway serve`, driven by Segment's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from mock_accoil.server import MockAccoilServer
from tests.contract import out_of_range
from tests.net import basic
from tests.net import free_port as free_port

WRITE_KEY = "wk_process_test_0002"
API_KEY = "ak_process_test_0002"


@contextmanager
def gateway_process(
    mock_url: str,
    data_dir: Path,
    *extra: str,
    env_extra: dict[str, str] | None = None,
    command: list[str] | None = None,
    cwd: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`command` replaces `python -m gateway`; `cwd` is the folder it starts in."""
    port = free_port()
    env = {
        # the worker at the tests' own CPU priority, not `pipeline_nice`'s 10: on a busy machine
        # a worker at 10 gets a tenth of a fair share of the CPU (RELIABILITY.md, "Tests that
        # the load broke"), and a test's bound on its progress measured the machine
        "GATEWAY_PIPELINE_NICE": "0",
        **(env_extra or {}),
        **os.environ,
        "GATEWAY_WRITE_KEY": WRITE_KEY,
        "ACCOIL_API_KEY": API_KEY,
        "ACCOIL_BASE_URL": mock_url,
        "GATEWAY_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "gateway"]), "serve", "--host", "127.0.0.1",
         "--port", str(port), "--data-dir", str(data_dir), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not become ready"
                time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def post_batch(url: str, batch: Sequence[Mapping[str, object]]) -> int:
    req = urllib.request.Request(
        url + "/v1/batch", data=json.dumps({"batch": batch}).encode(),
        headers={"Content-Type": "application/json", "Authorization": basic(WRITE_KEY)},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_sigterm_drains_everything_accepted(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # a long flush interval: only the shutdown drain can get these out in time; a drain
    # ends once all is sent, and the default 10 s were not enough for 200 calls at load 12
    env = {"GATEWAY_SHUTDOWN_TIMEOUT": "120"}
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "30",
                         env_extra=env) as (proc, url):
        for n in range(5):
            batch = [{"type": "track", "messageId": f"d{n}-{i}", "userId": f"u{i % 7}",
                      "event": "Drained"} for i in range(40)]
            assert post_batch(url, batch) == 200
        assert mock_accoil.calls() == []
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, out.decode()
    assert sum(r["count"] for r in mock_accoil.counts(event="Drained")) == 200
    logs = out.decode()
    assert WRITE_KEY not in logs and API_KEY not in logs
    stopped = [json.loads(line) for line in logs.splitlines() if '"gateway stopped"' in line]
    assert stopped and stopped[0]["inbox"] == 0 and stopped[0]["outbox"] == 0


def test_what_the_drain_cannot_send_waits_for_the_next_start(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    mock_accoil.add_fault(503)  # Accoil down for the whole first run
    # the drain on SIGTERM tries until its timeout: 2 s of trying show the same as 10
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1",
                         env_extra={"GATEWAY_SHUTDOWN_TIMEOUT": "2"}) as (proc, url):
        assert post_batch(url, [{"type": "track", "messageId": f"k{i}", "userId": "u1",
                                 "event": "Kept"} for i in range(10)]) == 200
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    assert mock_accoil.count("u1", "Kept") == 0
    mock_accoil.clear_faults()
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1") as (proc, url):
        deadline = time.monotonic() + 15
        while mock_accoil.count("u1", "Kept") < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert mock_accoil.count("u1", "Kept") == 10


def test_segments_python_client_reaches_accoil(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    from segment.analytics.client import Client

    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1") as (proc, url):
        errors: list[Exception] = []
        client = Client(WRITE_KEY, host=url, gzip=True, sync_mode=True,
                        on_error=lambda e, _batch: errors.append(e))
        client.identify("user-1", {"email": "ada@example.com", "name": "Ada"},
                        context={"groupId": "acme"})
        client.group("user-1", "acme", {"name": "Acme Inc", "plan": "growth", "mrr": "4200"})
        for _ in range(3):
            client.track("user-1", "Report Exported", {"format": "csv"})
        client.page("user-1", "Docs", "Getting Started")
        client.screen("user-1", "App", "Settings")
        client.alias("user-1", "anon-7")
        client.flush()
        assert errors == []
        deadline = time.monotonic() + 15
        while len(mock_accoil.calls()) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert mock_accoil.count("user-1", "Report Exported") == 3
    assert mock_accoil.count("user-1", "Page Viewed Getting Started") == 1
    assert mock_accoil.count("user-1", "Screen Viewed Settings") == 1
    (user,) = mock_accoil.users()
    assert user["traits"] == {"email": "ada@example.com", "name": "Ada"}
    (account,) = mock_accoil.accounts()
    assert account["traits"] == {"name": "Acme Inc", "plan": "growth", "mrr": 4200}
    assert "user-1" in account["members"]
    assert len(mock_accoil.calls()) == 7


def test_segments_python_client_reads_a_401_and_does_not_retry(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    from segment.analytics.client import Client
    from segment.analytics.request import APIError

    with gateway_process(mock_accoil.url, tmp_path) as (proc, url):
        errors: list[Exception] = []
        # bounded, so that a regression (retrying a 401 ten times) fails in seconds
        client = Client("wk_not_configured", host=url, max_retries=10,
                        max_total_backoff_duration=5,
                        on_error=lambda e, _batch: errors.append(e))
        client.track("user-1", "Refused")
        client.flush()
        client.join()
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    (error,) = errors
    assert isinstance(error, APIError)
    assert (error.status, error.code) == (401, "unauthorized")
    assert "write key" in error.message
    refused = [line for line in metrics.splitlines()
               if line.startswith("accoil_gateway_http_requests_total") and 'status="401"' in line]
    assert refused == ['accoil_gateway_http_requests_total{route="/v1/batch",status="401"} 1.0']
    assert mock_accoil.calls() == []


def test_client_routes_consent_and_grouped_dead_letters_in_the_worker(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    def post(path: str, body: Mapping[str, object], headers: dict[str, str]) -> tuple[int, object]:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    keyed = {"Authorization": basic(WRITE_KEY)}
    plain = {"Content-Type": "text/plain"}
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1",
                         env_extra={"GATEWAY_ADMIN_TOKEN": ADMIN}) as (_, url):
        # analytics-java: /v1/import/ ; mobile: /v1/b ; analytics.js: /v1/t with the key inside
        java = [{"type": "track", "messageId": "j1", "userId": "u1", "event": "Java"}]
        assert post("/v1/import/", {"batch": java}, keyed) == (200, {"success": True})
        mobile = [{"type": "track", "messageId": "m1", "userId": "u1", "event": "Mobile"}]
        assert post("/v1/b", {"batch": mobile, "sentAt": "2026-11-20T10:00:00Z"}, keyed)[0] == 200
        single = {"type": "track", "messageId": "t1", "userId": "u1", "event": "Browser",
                  "writeKey": WRITE_KEY}
        assert post("/v1/t/", single, plain)[0] == 200
        # OAuth mode: a Bearer token beside the body's writeKey
        oauth = {"batch": [{"type": "track", "messageId": "o1", "userId": "u1", "event": "OAuth"}],
                 "writeKey": WRITE_KEY}
        assert post("/v1/batch", oauth, {"Authorization": "Bearer some.jwt"})[0] == 200
        status, reply = post("/v1/batch", {"batch": []}, {"Authorization": "Bearer some.jwt"})
        assert status == 401 and isinstance(reply, dict) and reply["code"] == "unauthorized"
        consent = [
            {"type": "track", "messageId": "c1", "userId": "u1", "event": "Consented",
             "integrations": {"Accoil Analytics": True}},
            {"type": "track", "messageId": "c2", "userId": "u1", "event": "Declined"},
        ] + [{"type": "track", "messageId": f"a{i}", "anonymousId": f"anon{i}", "event": "Anon"}
             for i in range(20)]
        assert post("/b", {"batch": consent, "integrations": {"All": False}}, keyed)[0] == 200
        wait_until(lambda: all(mock_accoil.count("u1", e) == 1
                               for e in ("Java", "Mobile", "Browser", "OAuth", "Consented")))

        def dead() -> list[dict[str, object]]:
            return list(json.loads(admin_get(url, "/admin/dead-letters"))["dead_letters"])

        # All: false turned the anonymous-only tracks off too: counted, not dead letters
        assert dead() == []
        # without it they cannot be forwarded (no userId): one letter with a count
        anon = [{"type": "track", "messageId": f"b{i}", "anonymousId": f"anon{i}", "event": "Anon"}
                for i in range(20)]
        assert post("/v1/b/", {"batch": anon}, keyed)[0] == 200
        wait_until(lambda: len(dead()) == 1 and dead()[0]["repeat"] == 20)
    assert mock_accoil.count("u1", "Declined") == 0
    assert [c for c in mock_accoil.calls() if c["unknown_fields"]] == []


ADMIN = "admin_process_test_token"


def admin_get(url: str, path: str) -> bytes:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def worker_pids(front: int) -> list[int]:
    """The front's children running the pipeline worker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == front and b"gateway.worker" in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_until(check: object, timeout: float = 15.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_pipeline_runs_in_a_worker_process(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN}
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1",
                         env_extra=env) as (proc, url):
        (worker,) = worker_pids(proc.pid)
        assert post_batch(url, [
            {"type": "track", "userId": "u1", "event": "Signed In", "messageId": "p1"},
            {"type": "track", "userId": "u1", "messageId": "p2"},  # no event: rejected
            {"type": "group", "userId": "u1", "groupId": "g1", "messageId": "p3"},
        ]) == 200
        wait_until(lambda: mock_accoil.count("u1", "Signed In") == 1)

        # the router, in the worker, kept the rejected message as a dead letter
        def dead() -> list[dict[str, object]]:
            letters = json.loads(admin_get(url, "/admin/dead-letters"))["dead_letters"]
            return list(letters)

        wait_until(lambda: len(dead()) == 1)
        (letter,) = dead()
        assert letter["stage"] == "ingest" and "event" in str(letter["reason"])

        # /metrics joins both processes' series: ingest's and the pipeline's
        def metrics() -> str:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
                return str(resp.read().decode())

        wait_until(lambda: 'calls_forwarded_total{call="track",source=' in metrics())
        text = metrics()
        assert "accoil_gateway_messages_accepted_total" in text
        assert 'accoil_gateway_dead_letters_total{source="src_' in text
        families = [line for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(families) == len(set(families))  # no family twice
        stats = json.loads(admin_get(url, "/admin/stats"))
        assert stats["sources"][0]["circuit"] == "closed"
        assert isinstance(stats["active_actors"], int)

        # the front killed: the worker notices at once and leaves too
        proc.kill()
        proc.wait()
        wait_until(lambda: not Path(f"/proc/{worker}").exists() or
                   Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_dead_worker_is_replaced(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1") as (proc, url):
        (worker,) = worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: [p for p in worker_pids(proc.pid) if p != worker] != [])
        assert post_batch(url, [
            {"type": "track", "userId": "u9", "event": "After Restart", "messageId": "r1"},
        ]) == 200
        wait_until(lambda: mock_accoil.count("u9", "After Restart") == 1)


DECOY = """
import pathlib, sys
pathlib.Path({marker!r}).write_text("decoy imported by " + " ".join(sys.argv))
"""


def test_the_worker_runs_the_installed_package_not_the_working_directorys(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # another `gateway` package in the working directory: `python -m gateway.worker` would
    # import it (-m puts the working directory first); the worker must run the front's code
    decoy = tmp_path / "checkout"
    marker = tmp_path / "decoy-ran"
    (decoy / "gateway").mkdir(parents=True)
    for name in ("__init__.py", "__main__.py", "worker.py"):
        (decoy / "gateway" / name).write_text(
            DECOY.format(marker=str(marker)) + ("sys.exit(3)\n" if name != "__init__.py" else "")
        )
    script = Path(sys.executable).parent / "accoil-gateway"  # the installed entry point
    assert script.exists(), script
    with gateway_process(
        mock_accoil.url, tmp_path / "data", "--flush-interval", "0.05",
        command=[str(script)], cwd=decoy,
    ) as (proc, url):
        assert worker_pids(proc.pid), "no pipeline worker runs"
        batch = [{"type": "track", "messageId": f"decoy-{i}", "userId": "u1", "event": "Decoy"}
                 for i in range(10)]
        assert post_batch(url, batch) == 200
        wait_until(lambda: sum(r["count"] for r in mock_accoil.counts(event="Decoy")) == 10)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
    assert not marker.exists(), marker.read_text()
    assert "pipeline worker exited" not in out.decode()


def _legacy_segment(inbox: Path, first: int, source: str, bodies: list[bytes]) -> None:
    """Inbox records as the gateway wrote them before its segments had a magic (zlib's
    CRC-32 over header, source and body): what an upgrade finds on disk."""
    import struct
    import zlib

    from gateway.store.inbox import HEADER, segment_name

    out = b""
    for i, body in enumerate(bodies):
        src = source.encode()
        head = HEADER.pack(0, first + i, time.time(), 20, len(body), len(src))[4:]
        crc = zlib.crc32(body, zlib.crc32(src, zlib.crc32(head)))
        out += struct.pack("<I", crc) + head + src + body
    inbox.mkdir(parents=True)
    (inbox / segment_name(first)).write_bytes(out)


def test_an_inbox_written_before_the_upgrade_is_replayed_in_full(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    from gateway.config import Source
    from gateway.store.inbox import MAGIC

    source = Source(write_key=WRITE_KEY, accoil_api_key=API_KEY).id
    bodies = [json.dumps({"batch": [
        {"type": "track", "messageId": f"old{n}-{i}", "userId": f"u{i % 4}", "event": "Before"}
        for i in range(20)]}).encode() for n in range(5)]
    first = time.time_ns() // 1000 - 10**9
    _legacy_segment(tmp_path / "inbox", first, source, bodies)
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1") as (proc, url):
        assert post_batch(url, [{"type": "track", "messageId": f"new{i}", "userId": "u9",
                                 "event": "After"} for i in range(10)]) == 200
        deadline = time.monotonic() + 20
        while (sum(r["count"] for r in mock_accoil.counts(event="Before")) < 100
               or mock_accoil.count("u9", "After") < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        segments = sorted((tmp_path / "inbox").iterdir())
    assert [r["count"] for r in sorted(mock_accoil.counts(event="Before"),
                                       key=lambda r: str(r["userId"]))] == [25, 25, 25, 25]
    assert mock_accoil.count("u9", "After") == 10
    # what came after the upgrade went to a segment of its own, in the new format
    assert segments[-1].name > f"{first + 4:020d}.log"
    assert segments[-1].read_bytes().startswith(MAGIC)


def test_numbers_out_of_range_through_the_worker_process(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # `python -m gateway serve`: ingest's check answers, the worker's decode applies; both
    # take 1e400 as Segment does (tests/contract/out_of_range.py), as the inline pipeline does
    with gateway_process(mock_accoil.url, tmp_path, "--flush-interval", "0.1",
                         env_extra={"GATEWAY_ADMIN_TOKEN": ADMIN}) as (_, url):
        req = urllib.request.Request(
            url + "/v1/batch", data=out_of_range.BATCH,
            headers={"Content-Type": "text/plain", "Authorization": basic(WRITE_KEY)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert (resp.status, json.loads(resp.read())) == (
                200, {"success": True, "rejected": out_of_range.REJECTED})

        def dead() -> list[dict[str, object]]:
            return list(json.loads(admin_get(url, "/admin/dead-letters"))["dead_letters"])

        wait_until(lambda: len(mock_accoil.calls()) == 4 and len(dead()) == 1)
        (letter,) = dead()
        assert (letter["stage"], letter["reason"]) == ("ingest", out_of_range.REJECTED[0]["reason"])
    calls = out_of_range.forwarded(mock_accoil.calls())
    calls["/v2/track"].sort(key=lambda b: str(b["event"]))
    assert calls == out_of_range.EXPECTED
