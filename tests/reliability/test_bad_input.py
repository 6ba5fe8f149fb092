"""Bad input against a gateway process: malformed and hostile requests get a 4xx, never a
500, never a crash or a hang; the valid messages of a batch that holds invalid ones are
still accepted and forwarded; and whatever was accepted drains (forwarded or dead-lettered).

One gateway process serves the whole module; the last test checks it is still alive and
that its log holds no traceback.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mock_accoil.server import MockAccoilServer
from tests.reliability.reliability_support import (
    API_KEY,
    DRAINED,
    WRITE_KEY,
    GatewayProcess,
    basic,
    bearer,
    gateway_env,
    http,
    record,
)

READ_TIMEOUT = 1.5  # the gateway's body read timeout in this module (default 30 s)
AUTH = {"Authorization": basic(WRITE_KEY), "Content-Type": "application/json"}


@dataclass
class Target:
    gw: GatewayProcess
    mock: MockAccoilServer
    statuses: dict[str, int]

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, name: str = ""
    ) -> tuple[int, dict[str, Any]]:
        status, _, raw = http("POST", self.gw.url + path, body, {**AUTH, **(headers or {})})
        self.statuses[name or f"{path} {len(self.statuses)}"] = status
        assert status < 500 or status == 503, (status, raw[:300])
        reply: dict[str, Any] = json.loads(raw) if raw else {}
        return status, reply


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("bad-input")
    with MockAccoilServer(log_calls=False) as mock:
        data = tmp / "data"
        data.mkdir()
        env = gateway_env(base_url=mock.url, ACCOIL_RATE_PER_SECOND="1000",
                          GATEWAY_READ_TIMEOUT=str(READ_TIMEOUT), GATEWAY_RETRY_BASE="0.05",
                          GATEWAY_RETRY_MAX="0.2")
        gw = GatewayProcess(data, env, flush_interval=0.05)
        try:
            gw.start()
            yield Target(gw, mock, {})
        finally:
            gw.close()


def _track(i: int | str, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": f"bad-{i}", "userId": f"u-{i}", "event": "Valid", **extra}


def _batch(*messages: Any, **top: Any) -> bytes:
    return json.dumps({"batch": list(messages), **top}).encode()


MALFORMED = [
    b"", b"{", b"nul", b"[]", b'"batch"', b"123", b'{"batch": 5}', b'{"batch": {}}',
    b'{"batch": [', b'{"batch": []', b"{'batch': []}", b'{"batch": [], }',
    b'{"batch": [{"type":"track","userId":"u","event":"e","properties":{"x":NaN}}]}',
    b'{"batch": [{"type":"track","userId":"u","event":"e"}]}garbage',
    b'\xef\xbb\xbf{"batch": []}',  # a UTF-8 byte order mark
    b"\x00" * 64,
    b'{"batch": [{"type":"track","userId":"\\ud800","event":"e"}]}',  # lone surrogate escape
]

INVALID_UTF8 = [
    b'{"batch": [{"type":"track","userId":"\xff","event":"e"}]}',
    b'{"batch": [{"type":"track","userId":"u","event":"\xc0\xaf"}]}',  # overlong "/"
    b'{"batch": [{"type":"track","userId":"u","event":"\xed\xa0\x80"}]}',  # encoded surrogate
    b'{"batch": [{"type":"track","userId":"u","event":"e","properties":{"\xfe":1}}]}',
]

WRONG_TYPES: list[Any] = [
    {"type": "track", "userId": True, "event": "e"},
    {"type": "track", "userId": [], "event": "e"},
    {"type": "track", "userId": {"id": 1}, "event": "e"},
    {"type": "track", "userId": "u", "event": 5},
    {"type": "track", "userId": "u", "event": ""},
    {"type": "track", "userId": "u"},
    {"type": "track", "anonymousId": "", "event": "e"},
    {"type": "track", "userId": "u", "event": "e", "timestamp": "yesterday"},
    {"type": "track", "userId": "u", "event": "e", "timestamp": 1700000000},
    {"type": "track", "userId": "u", "event": "e", "context": "ctx"},
    {"type": "track", "userId": "u", "event": "e", "properties": [1, 2]},
    {"type": "track", "userId": "u", "event": "e", "messageId": 42},
    {"type": "track", "userId": "u", "event": "e", "messageId": "m" * 201},
    {"type": "group", "userId": "u"},
    {"type": "group", "userId": "u", "groupId": None},
    {"type": "alias", "userId": "u"},
    {"type": "teleport", "userId": "u"},
    {"userId": "u", "event": "e"},
    {"type": None, "userId": "u"},
    "a string",
    17,
    None,
    [],
]


def test_malformed_json_is_400(target: Target) -> None:
    for i, body in enumerate(MALFORMED):
        status, reply = target.post("/v1/batch", body, name=f"malformed {i}")
        assert status == 400, (body[:60], status, reply)
        assert reply["success"] is False and reply["error"]


def test_invalid_utf8_is_400(target: Target) -> None:
    for i, body in enumerate(INVALID_UTF8):
        status, reply = target.post("/v1/batch", body, name=f"utf8 {i}")
        assert status == 400, (body, status, reply)
        assert "UTF-8" in reply["error"]
        status, _ = target.post("/v1/track", body.replace(b'{"batch": [', b"")[:-2],
                                name=f"utf8 single {i}")
        assert status == 400


def test_wrong_types_are_rejected_and_valid_neighbours_accepted(target: Target) -> None:
    messages = [_track("wt-first"), *WRONG_TYPES, _track("wt-last")]
    status, reply = target.post("/v1/batch", _batch(*messages), name="wrong types")
    assert status == 200, reply
    rejected = {r["index"] for r in reply["rejected"]}
    assert rejected == set(range(1, len(WRONG_TYPES) + 1)), reply["rejected"]
    assert all(r["reason"] for r in reply["rejected"])
    for kind in ("track", "identify", "group", "page", "screen", "alias"):
        status, reply = target.post(f"/v1/{kind}", b'{"userId": ["x"]}', name=f"single {kind}")
        assert status == 400, reply
        assert reply["rejected"][0]["index"] == 0
    _wait_counted(target, {("u-wt-first", "Valid"): 1, ("u-wt-last", "Valid"): 1})


def test_huge_strings(target: Target) -> None:
    big = "x" * 400_000
    status, reply = target.post(
        "/v1/batch",
        _batch(_track("hs-1"), _track("hs-2", event=big), _track("hs-3", properties={"k": big[:40_000]})),
        name="huge string message",
    )
    assert status == 200, reply
    assert [r["index"] for r in reply["rejected"]] == [1, 2]
    assert "32 KB" in reply["rejected"][0]["reason"]
    # a message just under 32 KB is fine
    status, reply = target.post(
        "/v1/batch", _batch(_track("hs-4", properties={"k": "y" * 32_000})), name="31 KB message"
    )
    assert status == 200 and "rejected" not in reply, reply
    # a huge header: refused by the HTTP parser, not by a crash
    status, _, _ = http("POST", target.gw.url + "/v1/batch", _batch(_track("hs-5")),
                        {"Authorization": "Basic " + "A" * 100_000})
    target.statuses["huge header"] = status
    assert 400 <= status < 500
    status, _, _ = http("POST", target.gw.url + "/v1/batch", _batch(_track("hs-6")),
                        {**AUTH, "X-Filler": "b" * 9000})
    assert 400 <= status < 500
    _wait_counted(target, {("u-hs-1", "Valid"): 1, ("u-hs-4", "Valid"): 1})


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def test_deep_nesting(target: Target) -> None:
    # far deeper than any decoder allows: the whole body is refused
    for depth in (5_000, 200_000):
        body = b"[" * depth + b"]" * depth
        status, reply = target.post("/v1/batch", body, name=f"nested body {depth}")
        assert status == 400, reply
        body = ('{"batch":[' + _nested(depth) + "]}").encode()
        if len(body) <= 500 * 1024:
            status, reply = target.post("/v1/batch", body, name=f"nested message {depth}")
            assert status in (200, 400), reply
    # as deep as the decoder takes, in every free-form field, merged with a batch context
    # that is as deep: accepted messages must still route and drain (forwarded or dead letter)
    accepted = []
    for depth in (100, 500, 900, 990):
        deep = _nested(depth)  # built as text: Python's json module cannot go this deep
        messages = [
            f'{{"type":"track","messageId":"dn-{depth}-t","userId":"dn-{depth}","event":"Deep",'
            f'"context":{deep},"properties":{deep}}}',
            f'{{"type":"identify","messageId":"dn-{depth}-i","userId":"dn-{depth}",'
            f'"traits":{deep},"context":{deep}}}',
            f'{{"type":"group","messageId":"dn-{depth}-g","userId":"dn-{depth}",'
            f'"groupId":"g-{depth}","traits":{deep}}}',
        ]
        body = ('{"batch":[' + ",".join(messages) + '],"context":' + deep + "}").encode()
        status, reply = target.post("/v1/batch", body, name=f"deep fields {depth}")
        assert status in (200, 400), reply
        if status == 200:
            accepted.append(depth)
    assert accepted, "no depth was accepted at all"
    target.gw.wait_drained(DRAINED)


def test_gzip_bombs_and_broken_gzip(target: Target) -> None:
    bomb = gzip.compress(b"0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 100_000
    started = time.monotonic()
    status, reply = target.post("/v1/batch", bomb, {"Content-Encoding": "gzip"}, name="gzip bomb")
    assert status == 413, reply
    assert time.monotonic() - started < 5
    # a bomb that inflates to valid-looking JSON
    padded = b'{"batch":[' + b'{"type":"track","userId":"u","event":"e"},' * 200_000 + b"]}"
    status, reply = target.post(
        "/v1/batch", gzip.compress(padded), {"Content-Encoding": "gzip"}, name="gzip json bomb"
    )
    assert status == 413, reply
    # nested gzip: only one layer is inflated, the rest is not JSON
    twice = gzip.compress(gzip.compress(_batch(_track("gz-0"))))
    status, _ = target.post("/v1/batch", twice, {"Content-Encoding": "gzip"}, name="gzip twice")
    assert status == 400
    good = gzip.compress(_batch(_track("gz-1")))
    for name, body in (
        ("truncated", good[:-10]),
        ("garbage", b"\x1f\x8b\x08\x00not gzip at all"),
        ("not gzip", _batch(_track("gz-2"))),
        ("trailing bytes", good + b"trailing"),
    ):
        status, reply = target.post(
            "/v1/batch", body, {"Content-Encoding": "gzip"}, name=f"gzip {name}"
        )
        assert status == 400, (name, reply)
    status, reply = target.post(
        "/v1/batch", _batch(_track("gz-3")), {"Content-Encoding": "br"}, name="brotli"
    )
    assert status == 415, reply
    status, reply = target.post("/v1/batch", good, {"Content-Encoding": "gzip"}, name="gzip ok")
    assert status == 200, reply
    _wait_counted(target, {("u-gz-1", "Valid"): 1})


def test_oversized_requests(target: Target) -> None:
    small = {"type": "track", "userId": "u", "event": "e"}
    status, reply = target.post("/v1/batch", _batch(*[small] * 2501), name="2501 messages")
    assert status in (400, 413), reply
    assert "2,500" in reply["error"]
    status, reply = target.post("/v1/batch", _batch(*[small] * 2500), name="2500 messages")
    assert status == 200, reply
    over = _batch(*[_track(f"big-{i}", properties={"p": "z" * 20_000}) for i in range(30)])
    assert len(over) > 500 * 1024
    status, reply = target.post("/v1/batch", over, name="600 KB body")
    assert status == 413, reply
    # the same without Content-Length (chunked): cut off once past the limit
    status = _chunked(target, over)
    target.statuses["600 KB chunked"] = status
    assert status == 413
    status, reply = target.post("/v1/track", json.dumps(
        {"userId": "u", "event": "e", "properties": {"p": "z" * 40_000}}).encode(),
        name="single over 32 KB")
    assert status == 400 and "32 KB" in reply["error"], reply
    # a Content-Length that lies: the body never comes
    with socket.create_connection(("127.0.0.1", target.gw.port), timeout=10) as s:
        s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}")
    status, _ = target.post("/v1/batch", _batch(_track("after-lie")), name="after a lie")
    assert status == 200


def _chunked(target: Target, body: bytes) -> int:
    with socket.create_connection(("127.0.0.1", target.gw.port), timeout=10) as s:
        head = (
            "POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nConnection: close\r\n\r\n"
        )
        s.sendall(head.encode())
        try:
            for i in range(0, len(body), 16_384):
                part = body[i : i + 16_384]
                s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the gateway may answer 413 and close before it has read everything
        reply = _read_reply(s)
    return int(reply.split(b" ", 2)[1])


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_slow_body_is_cut_off(target: Target) -> None:
    """Slowloris: a body trickled a byte at a time must not hold a handler forever."""
    body = _batch(_track("slow"))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", target.gw.port), timeout=10) as s:
        s.sendall(
            f"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        reply = b""
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.25)
            try:
                reply = s.recv(4096)
            except TimeoutError:
                continue
            break
        waited = time.monotonic() - started
    target.statuses["slow body"] = int(reply.split(b" ", 2)[1]) if reply else 0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert READ_TIMEOUT <= waited < READ_TIMEOUT + 2
    # it was cut, nothing of it was stored
    status, _ = target.post("/v1/batch", _batch(_track("after-slow")), name="after slow")
    assert status == 200


def test_slow_headers_are_cut_off(target: Target) -> None:
    """Headers that never finish: the connection is closed within the read timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", target.gw.port), timeout=10) as s:
        s.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(40):
            try:
                s.sendall(b"X-a: b\r\n")
            except OSError:
                closed = True
                break
            s.settimeout(0.25)
            try:
                if s.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        waited = time.monotonic() - started
    assert closed, "the gateway kept a half-sent request open for 10 s"
    assert waited < READ_TIMEOUT + 3


ADMIN_QUERIES = [
    ("limit=0", 400), ("limit=-1", 400), ("after=-5", 400), ("limit=abc", 400),
    ("after=1e3", 400), ("after=9223372036854775808", 400), ("after=9223372036854775807", 200),
    ("limit=99999999999999999999999", 200), ("limit=1_0", 200),
    ("source=%ff%fe", 200), ("source=%00", 200), ("replayed=maybe", 200), ("limit=%EF%BC%91", 200),
]


def test_admin_parameters(target: Target) -> None:
    admin = {"Authorization": bearer()}
    for query, want in ADMIN_QUERIES:
        status, _, raw = http("GET", f"{target.gw.url}/admin/dead-letters?{query}", headers=admin)
        target.statuses[f"dead-letters {query}"] = status
        assert status == want, (query, status, raw[:200])
    for query in ("day=%ff", "source=%ed%a0%80", "day=2026-13-45", "source=" + "s" * 5000):
        status, _, raw = http("GET", f"{target.gw.url}/admin/ledger?{query}", headers=admin)
        target.statuses[f"ledger {query[:20]}"] = status
        assert status == 200, (query, status, raw[:200])
    for body, want in (
        (b'{"source": "\\ud800"}', 400), (b"[]", 400), (b'{"ids": "all"}', 400),
        (b'{"ids": [99999999999999999999999]}', 200), (b'{"unknown": 1}', 400),
        (b'{"ids": [-1, 0, 123456]}', 200), (b"", 200),
    ):
        status, _, raw = http("POST", f"{target.gw.url}/admin/dead-letters/replay", body,
                              {**admin, "Content-Type": "application/json"})
        target.statuses[f"replay {body[:20]!r}"] = status
        assert status == want, (body, status, raw[:200])


def _wait_counted(target: Target, want: dict[tuple[str, str], int], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while True:
        got = {k: target.mock.count(k[0], k[1], api_key=API_KEY) for k in want}
        if got == want:
            return
        assert time.monotonic() < deadline, (got, want)
        time.sleep(0.05)


def test_zz_process_survived(target: Target) -> None:
    assert target.gw.alive
    status, _, _ = http("GET", target.gw.url + "/healthz")
    assert status == 200
    target.gw.wait_drained(DRAINED)
    log = target.gw.log()
    assert "Traceback" not in log, log[-5000:]
    assert '"level": "error"' not in log, [ln for ln in log.splitlines() if '"error"' in ln][:5]
    record("bad_input", {
        "requests": len(target.statuses),
        "by_status": _by_status(target.statuses),
        "server_errors_500": sum(1 for s in target.statuses.values() if s >= 500 and s != 503),
        "process_alive": target.gw.alive,
    })


def _by_status(statuses: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses.values():
        out[str(s)] = out.get(str(s), 0) + 1
    return dict(sorted(out.items()))
