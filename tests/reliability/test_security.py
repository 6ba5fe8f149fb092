"""Security: write keys isolate sources, admin routes need the token (and vanish without
one), no secret leaks into logs, metrics, error replies or dead letters, and the gateway
binds to loopback unless told otherwise.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.loader import load_settings
from mock_accoil.server import MockAccoilServer
from tests.reliability.reliability_support import (
    GatewayProcess,
    basic,
    bearer,
    free_port,
    gateway_env,
    http,
    record,
)

KEY_A, KEY_B = "wk_alpha_7c1e9d02b4f6", "wk_bravo_3a85f0c6e21d"
API_A, API_B = "ak_alpha_d94b1e7f0c23", "ak_bravo_61f2c8a0e5b7"
ADMIN = "adm_secret_0f4e8b2c7a91"
SECRETS = {"write key A": KEY_A, "write key B": KEY_B, "API key A": API_A, "API key B": API_B,
           "admin token": ADMIN}


def secret_forms(secret: str) -> dict[str, str]:
    """The secret as it may travel: raw, in Basic credentials, and as the base64 text any
    longer credential starting with it begins with."""
    forms = {"raw": secret, "base64": base64.b64encode(secret.encode()).decode()}
    for suffix in ("", ":"):
        raw = (secret + suffix).encode()
        forms[f"basic{suffix}"] = base64.b64encode(raw).decode()
        aligned = raw[: len(raw) - len(raw) % 3]
        forms[f"base64 prefix{suffix}"] = base64.b64encode(aligned).decode()
    return forms


def leaks(text: str) -> list[str]:
    return [
        f"{name} ({form})"
        for name, secret in SECRETS.items()
        for form, value in secret_forms(secret).items()
        if value in text
    ]


@dataclass
class TwoSources:
    gw: GatewayProcess
    a: MockAccoilServer
    b: MockAccoilServer
    replies: list[str] = field(default_factory=list)  # every error reply, headers and body

    def post(self, path: str, body: object, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, resp_headers, reply = http(
            "POST", self.gw.url + path, raw, {"Content-Type": "application/json", **headers}
        )
        if status != 200 or b"rejected" in reply:
            self.replies.append(json.dumps(resp_headers) + reply.decode("utf-8", "replace"))
        try:
            return status, json.loads(reply) if reply else {}
        except ValueError:
            return status, {"text": reply.decode("utf-8", "replace")}


def _two_sources(folder: Path, a: str, b: str, log_level: str = "info") -> GatewayProcess:
    """`serve` as a child (not started) with the admin token and two sources, write keys
    KEY_A and KEY_B, each with its own further TOML lines."""
    config = folder / "gateway.toml"
    config.write_text(
        f'admin_token = "{ADMIN}"\nretry_base = 0.05\nretry_max = 0.2\n\n'
        f'[[sources]]\nwrite_key = "{KEY_A}"\n{a}\n\n[[sources]]\nwrite_key = "{KEY_B}"\n{b}\n'
    )
    data = folder / "data"
    data.mkdir()
    env = gateway_env(write_key=None, api_key=None, admin_token=None)
    return GatewayProcess(data, env, flush_interval=0.05, config=config, log_level=log_level)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSources]:
    tmp = tmp_path_factory.mktemp("security")
    with MockAccoilServer(log_calls=False) as a, MockAccoilServer(log_calls=False) as b:
        gw = _two_sources(
            tmp,
            f'accoil_api_key = "{API_A}"\nbase_url = "{a.url}"\nrate_per_second = 500',
            f'accoil_api_key = "{API_B}"\nbase_url = "{b.url}"\nrate_per_second = 500',
            log_level="debug",
        )
        try:
            gw.start()
            yield TwoSources(gw, a, b)
        finally:
            gw.close()


def _track(tag: str, i: int = 0) -> dict[str, object]:
    return {"type": "track", "messageId": f"{tag}-{i}", "userId": f"user-{tag}", "event": tag}


def _drain(two: TwoSources) -> None:
    deadline = time.monotonic() + 20
    while True:
        status, _, body = http("GET", two.gw.url + "/admin/stats", headers={"Authorization": bearer(ADMIN)})
        stats = json.loads(body)
        if status == 200 and stats["inbox_messages"] == 0 and stats["outbox_calls"] == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_write_keys_isolate_sources(two: TwoSources) -> None:
    sends = [
        # (headers, body, path, the source it must reach, tag)
        ({"Authorization": basic(KEY_A)}, {"batch": [_track("a-basic")]}, "/v1/batch", "a"),
        ({}, {"batch": [_track("a-body")], "writeKey": KEY_A}, "/v1/batch", "a"),
        ({}, {**_track("a-single"), "writeKey": KEY_A}, "/v1/track", "a"),
        # a header and a body key that agree (analytics-python, analytics.js batching)
        ({"Authorization": basic(KEY_A)}, {"batch": [_track("a-both")], "writeKey": KEY_A},
         "/v1/import", "a"),
        # a Bearer header (OAuth mode) is no write key: the body's decides
        ({"Authorization": "Bearer some.oauth.token"}, {**_track("b-oauth"), "writeKey": KEY_B},
         "/v1/track", "b"),
        ({"Authorization": basic(KEY_B)}, {"batch": [_track("b-basic")]}, "/v1/batch", "b"),
        ({"Authorization": "Basic " + base64.b64encode(f"{KEY_B}:pw".encode()).decode()},
         {"batch": [_track("b-password")]}, "/v1/batch", "b"),
    ]
    for headers, body, path, _ in sends:
        status, reply = two.post(path, body, headers)
        assert status == 200, (path, reply)
    # near misses and wrong keys: 401 and nothing stored, whatever the body says
    refused = [
        # two keys that disagree: refused, never moved to either source
        ({"Authorization": basic(KEY_A)}, {"batch": [_track("x-a-over-b")], "writeKey": KEY_B}),
        ({"Authorization": basic(KEY_B)}, {"batch": [_track("x-b-over-a")], "writeKey": KEY_A}),
        ({"Authorization": basic("wk_wrong")}, {"batch": [_track("x-wrong")], "writeKey": KEY_A}),
        ({"Authorization": basic(KEY_A + "x")}, {"batch": [_track("x-suffix")]}),
        ({"Authorization": basic(KEY_A[:-1])}, {"batch": [_track("x-prefix")]}),
        ({"Authorization": basic(KEY_A.upper())}, {"batch": [_track("x-upper")]}),
        ({"Authorization": "Bearer " + KEY_A}, {"batch": [_track("x-bearer")]}),
        ({"Authorization": "Basic %%%"}, {"batch": [_track("x-garbled")], "writeKey": KEY_B}),
        ({}, {"batch": [_track("x-none")]}),
        ({}, {"batch": [_track("x-body-wrong")], "writeKey": KEY_B + " "}),
        ({}, {"batch": [_track("x-body-type")], "writeKey": [KEY_A]}),
    ]
    for headers, body in refused:
        status, reply = two.post("/v1/batch", body, headers)
        assert status in (400, 401), (headers, reply)
    _drain(two)
    tags_a = {"a-basic", "a-body", "a-single", "a-both"}
    tags_b = {"b-oauth", "b-basic", "b-password"}
    calls_a, calls_b = two.a.calls(), two.b.calls()
    assert {c["api_key"] for c in calls_a} == {API_A}
    assert {c["api_key"] for c in calls_b} == {API_B}
    assert {c["body"]["event"] for c in calls_a} == tags_a
    assert {c["body"]["event"] for c in calls_b} == tags_b
    record("source_isolation", {
        "accepted_requests": len(sends), "refused_requests": len(refused),
        "calls_to_a": len(calls_a), "calls_to_b": len(calls_b), "cross_source_calls": 0,
    })


ADMIN_ROUTES = [("GET", "/admin/stats"), ("GET", "/admin/dead-letters"),
                ("POST", "/admin/dead-letters/replay"), ("GET", "/admin/ledger")]


def test_admin_routes_need_the_token(two: TwoSources) -> None:
    wrong = [
        {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
        {"Authorization": bearer("nope")}, {"Authorization": bearer(ADMIN[:-1])},
        {"Authorization": bearer(ADMIN + "x")}, {"Authorization": bearer(ADMIN.upper())},
        {"Authorization": "Basic " + base64.b64encode(f"{ADMIN}:".encode()).decode()},
        {"Authorization": ADMIN}, {"Authorization": "Token " + ADMIN},
        {"X-Admin-Token": ADMIN}, {"Authorization": bearer(KEY_A)},
    ]
    for method, path in ADMIN_ROUTES:
        for headers in wrong:
            status, _, body = http(method, two.gw.url + path, b"{}" if method == "POST" else None, headers)
            assert status == 401, (path, headers, body)
            two.replies.append(body.decode())
        status, _, body = http(method, two.gw.url + path, b"{}" if method == "POST" else None,
                               {"Authorization": bearer(ADMIN)})
        assert status == 200, (path, body)
    # a lower-case scheme is still the bearer scheme (RFC 9110)
    status, _, _ = http("GET", two.gw.url + "/admin/stats", headers={"Authorization": "bearer " + ADMIN})
    assert status == 200


def test_admin_routes_are_absent_without_a_token(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    gw = GatewayProcess(data, gateway_env(base_url="http://127.0.0.1:9", admin_token=None))
    try:
        gw.start()
        for method, path in ADMIN_ROUTES:
            for headers in ({}, {"Authorization": bearer(ADMIN)}, {"Authorization": bearer("")}):
                status, _, _ = http(method, gw.url + path, b"{}" if method == "POST" else None, headers)
                assert status in (404, 405), (path, status)
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            status, _, _ = http("GET", gw.url + path)
            assert status == 200, path
    finally:
        gw.close()


def test_no_secret_in_logs_metrics_replies_or_dead_letters(two: TwoSources) -> None:
    two.a.add_fault(413, count=2)  # Accoil refuses two calls for good: forward dead letters
    long_auth = "Basic " + base64.b64encode(f"{KEY_A}:{'p' * 9000}".encode()).decode()
    bad = [
        # invalid messages in a batch that names its key in the body, and one carrying its own
        ("/v1/batch", {"writeKey": KEY_A, "batch": [
            _track("s-ok"), {"type": "track", "userId": "u"},
            {"type": "track", "writeKey": KEY_A, "userId": "u", "secret": API_A},
            {"type": "identify", "writeKey": KEY_B, "traits": {"token": ADMIN}},
        ]}, {}),
        ("/v1/track", {"writeKey": KEY_A, "userId": "u"}, {}),
        ("/v1/group", {"writeKey": KEY_B, "userId": "u"}, {}),
        ("/v1/identify", {"writeKey": KEY_A}, {}),
        ("/v1/batch", {"batch": [_track("s-fwd", 1), _track("s-fwd", 2)]},
         {"Authorization": basic(KEY_A)}),
        ("/v1/batch", {"batch": [_track("s-wrong")], "writeKey": KEY_A + "-nope"}, {}),
        ("/v1/batch", b'{"writeKey": "' + KEY_A.encode() + b'", "batch": [', {}),
        ("/v1/batch", b'{"writeKey": "' + KEY_B.encode() + b'", "batch": [{"type": "track", "userId": "\xff"}]}', {}),
        ("/v1/batch", {"batch": [_track("s-bad-basic")]},
         {"Authorization": "Basic " + base64.b64encode(f"{KEY_A}x:".encode()).decode()}),
    ]
    for path, body, headers in bad:
        two.post(path, body, headers)
    # aiohttp's HTTP parser refuses a header over 8 KB with a 400 that quotes its first 100
    # bytes back: only to the client that sent them, on its own connection. That reply is
    # kept out of `replies`; the log line about it must still be clean.
    status, _, echoed = http("POST", two.gw.url + "/v1/batch", b"{}",
                             {"Authorization": long_auth, "Content-Type": "application/json"})
    assert status == 400
    _drain(two)
    admin = {"Authorization": bearer(ADMIN)}
    status, _, letters = http("GET", two.gw.url + "/admin/dead-letters?replayed=1&limit=1000", headers=admin)
    assert status == 200
    stages = {d["stage"] for d in json.loads(letters)["dead_letters"]}
    assert {"ingest", "forward"} <= stages, stages
    _, _, stats = http("GET", two.gw.url + "/admin/stats", headers=admin)
    _, _, ledger = http("GET", two.gw.url + "/admin/ledger", headers=admin)
    _, _, metrics = http("GET", two.gw.url + "/metrics")
    _, _, openapi = http("GET", two.gw.url + "/openapi.json")
    assert b"accoil_gateway_messages_accepted" in metrics
    # a clean stop logs its summary too
    assert two.gw.terminate() == 0
    log = two.gw.log()
    assert "bad HTTP request" in log  # the over-long header was logged, without its bytes
    places = {
        "log": log,
        "metrics": metrics.decode(),
        "error replies": "\n".join(two.replies),
        "dead letters": letters.decode(),
        "stats": stats.decode(),
        "ledger": ledger.decode(),
        "openapi": openapi.decode(),
    }
    found = {where: leaks(text) for where, text in places.items()}
    record("secrets", {
        "places_checked": {k: len(v) for k, v in places.items()},
        "secrets_checked": len(SECRETS),
        "forms_per_secret": len(secret_forms(KEY_A)),
        "error_replies": len(two.replies),
        "dead_letters": len(json.loads(letters)["dead_letters"]),
        "leaks": {k: v for k, v in found.items() if v},
        "parser_400_echoes_own_header_to_sender": bool(leaks(echoed.decode("utf-8", "replace"))),
    })
    assert not any(found.values()), (found, [r[:300] for r in two.replies if leaks(r)])


class _Echo(BaseHTTPRequestHandler):
    """An upstream that refuses every call with 401, quoting the Authorization header back
    raw and decoded, upper-cased: what a careless error page does."""

    def do_POST(self) -> None:  # noqa: N802 (the handler's name is http.server's)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        token = auth.partition(" ")[2]
        try:
            decoded = base64.b64decode(token, validate=True).decode()
        except ValueError:
            decoded = token
        body = f"refused {auth!r}; key {decoded.upper()!r} / {decoded!r}".encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_upstream_echoing_the_key_leaves_no_key_in_dead_letters(tmp_path: Path) -> None:
    """In the default two-process mode, the forwarder's dead letter of each dialect has the
    echoed key masked as in logs: `***`, whatever its case or encoding."""
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    upstream = f"http://127.0.0.1:{echo.server_address[1]}"
    seg_key = "stg_" + API_B  # a staging key: its stripped form must not leak either
    gw = _two_sources(
        tmp_path,
        f'accoil_api_key = "{API_A}"\nbase_url = "{upstream}"',
        f'accoil_api_key = "{seg_key}"\napi = "segment"\nbase_url = "{upstream}"',
    )
    try:
        gw.start()
        for key in (KEY_A, KEY_B):
            status, _, _ = http("POST", gw.url + "/v1/track", json.dumps(_track("echo")).encode(),
                                {"Authorization": basic(key), "Content-Type": "application/json"})
            assert status == 200
        admin = {"Authorization": bearer(ADMIN)}
        deadline = time.monotonic() + 20
        while True:
            _, _, raw = http("GET", gw.url + "/admin/dead-letters", headers=admin)
            letters = [d for d in json.loads(raw)["dead_letters"] if d["stage"] == "forward"]
            if len(letters) == 2:
                break
            assert time.monotonic() < deadline, letters
            time.sleep(0.05)
        assert gw.terminate() == 0
        log = gw.log()
    finally:
        gw.close()
        echo.shutdown()
        echo.server_close()
    for letter in letters:
        assert letter["status"] == 401
        assert "refused 'Basic ***'; key '***" in letter["reason"], letter["reason"]
    text = raw.decode() + log
    for secret in (API_A, seg_key, API_B):
        for form in secret_forms(secret).values():
            assert form.lower() not in text.lower(), form


def test_default_bind_is_loopback(tmp_path: Path) -> None:
    assert Settings().host == "127.0.0.1"
    env = gateway_env(base_url="http://127.0.0.1:9")
    assert load_settings(config_path=None, env=env, overrides={}).host == "127.0.0.1"
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    gw = GatewayProcess(data, env, host=None, port=port)  # no --host flag
    try:
        gw.start()
        listening = _listening(port)
        assert listening, f"no listening socket on port {port}"
        assert set(listening) == {"127.0.0.1"}, listening
    finally:
        gw.close()


def _listening(port: int) -> list[str]:
    """Local addresses of the sockets listening on `port`, read from /proc (no traffic)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            address, hex_port = cols[1].split(":")
            if cols[3] != "0A" or int(hex_port, 16) != port:
                continue
            found.append(_address(address, width))
    return found


def _address(hex_address: str, width: int) -> str:
    if width == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_address)))
    # IPv6 as four little-endian 32-bit words; only its loopback and IPv4-mapped forms matter
    words = [bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, 32, 8)]
    raw = b"".join(words)
    if raw == bytes(15) + b"\x01":
        return "::1"
    if raw[:12] == bytes(10) + b"\xff\xff":
        return ".".join(str(b) for b in raw[12:])
    return raw.hex()
