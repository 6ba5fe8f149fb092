"""Fuzzing a gateway process: property-based batches (hypothesis) and schema-driven requests
(schemathesis, from the OpenAPI document the gateway serves at /openapi.json).

Properties: no request gets a 500 (or kills the process); a valid message is never rejected
because of its neighbours, and every valid track message that got a 200 is counted by
Accoil exactly once; the replies conform to the OpenAPI document.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mock_accoil.server import MockAccoilServer
from tests.redis.redis_support import RedisServer, require_redis
from tests.reliability.reliability_support import (
    API_KEY,
    DRAINED,
    WRITE_KEY,
    GatewayProcess,
    basic,
    bearer,
    gateway_env,
    record,
)

EXAMPLES = 40  # per hypothesis property
SCHEMA_EXAMPLES = 12  # per operation and generation mode


@dataclass
class Fuzz:
    gw: GatewayProcess
    mock: MockAccoilServer
    http: requests.Session
    mode: str  # the store: "sqlite" or "redis"
    statuses: Counter[int] = field(default_factory=Counter)
    expected: set[str] = field(default_factory=set)  # valid track messageIds acknowledged
    # (userId, event) -> occurrences acknowledged, for ids built to collide
    tricky: Counter[tuple[str, str]] = field(default_factory=Counter)
    schema_requests: Counter[str] = field(default_factory=Counter)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        resp = self.http.post(
            self.gw.url + path, data=body, timeout=10,
            headers={"Authorization": basic(WRITE_KEY), "Content-Type": "application/json",
                     **(headers or {})},
        )
        self.statuses[resp.status_code] += 1
        assert resp.status_code < 500 or _backlog_full(resp), (
            self.mode, resp.status_code, resp.text[:300], body[:300])
        return resp


def _backlog_full(resp: requests.Response) -> bool:
    """A 503 for the one reason the fuzz may meet while the store is up: the backlog at its
    bound. Any other ("store unavailable" for a body the store's side could not read) is a
    bug: the SDK would retry that body for ever."""
    return resp.status_code == 503 and resp.json().get("message") == "backlog full: retry later"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def fuzz(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """A gateway process (two-process mode) on SQLite, and one on a Redis of its own."""
    mode: str = request.param
    if mode == "redis":
        require_redis()
    tmp = tmp_path_factory.mktemp(f"fuzz-{mode}")
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(MockAccoilServer(log_calls=False))
        session = stack.enter_context(requests.Session())
        store: dict[str, str] = {}
        if mode == "redis":
            redis = RedisServer(tmp / "redis")
            stack.callback(redis.stop)
            redis.start()
            store = {"GATEWAY_STORE": "redis", "GATEWAY_REDIS_URL": redis.url}
        data = tmp / "data"
        data.mkdir()
        env = gateway_env(base_url=mock.url, ACCOIL_RATE_PER_SECOND="2000",
                          GATEWAY_RETRY_BASE="0.05", GATEWAY_RETRY_MAX="0.2", **store)
        gw = GatewayProcess(data, env, flush_interval=0.05)
        stack.callback(gw.close)
        gw.start()
        state = Fuzz(gw, mock, session, mode)
        yield state
        _check_and_record(state)


def _check_and_record(fuzz: Fuzz) -> None:
    """After the module: the process is alive, everything drained, every acknowledged valid
    event counted exactly once, and the log holds no traceback."""
    assert fuzz.gw.alive
    fuzz.gw.wait_drained(DRAINED)
    counts: Counter[str] = Counter()
    for row in fuzz.mock.counts(api_key=API_KEY):
        counts[row["event"]] += row["count"]
    missing = [mid for mid in fuzz.expected if counts[mid] != 1]
    by_key: Counter[tuple[str, str]] = Counter()
    for row in fuzz.mock.counts(api_key=API_KEY):
        if (row["userId"], row["event"]) in fuzz.tricky:
            by_key[(row["userId"], row["event"])] += row["count"]
    misattributed = {k: (n, by_key[k]) for k, n in fuzz.tricky.items() if by_key[k] != n}
    mixed = [
        c["body"] for c in fuzz.mock.calls(path="/v2/group")
        if "pair" in (c["body"].get("traits") or {})
        and c["body"]["traits"]["pair"] != [c["body"]["groupId"], c["body"]["userId"]]
    ]
    log = fuzz.gw.log()
    name = "fuzzing" if sum(fuzz.schema_requests.values()) < 1000 else "fuzzing_long"
    record(name if fuzz.mode == "sqlite" else f"{name}_{fuzz.mode}", {
        "requests": sum(fuzz.statuses.values()),
        "by_status": {str(k): v for k, v in sorted(fuzz.statuses.items())},
        "server_errors_500": sum(v for k, v in fuzz.statuses.items() if k >= 500 and k != 503),
        "schemathesis_requests": sum(fuzz.schema_requests.values()),
        "schemathesis_operations": len({k.rsplit(" ", 1)[0] for k in fuzz.schema_requests}),
        "valid_events_acknowledged": len(fuzz.expected),
        "valid_events_counted_once": len(fuzz.expected) - len(missing),
        "separator_ids_events": sum(fuzz.tricky.values()),
        "separator_ids_misattributed": len(misattributed),
        "process_alive": fuzz.gw.alive,
    })
    assert not missing, missing[:10]
    assert not misattributed, list(misattributed.items())[:10]
    assert not mixed, mixed[:5]
    assert "Traceback" not in log, log[-5000:]


# -- hypothesis: batches of valid and arbitrary messages ---------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["type", "userId", "anonymousId", "event", "messageId", "timestamp", "context",
          "properties", "traits", "groupId", "name", "previousId", "sentAt",
          "originalTimestamp", "integrations"]
TYPES = ["track", "identify", "group", "page", "screen", "alias", "TRACK", "", "x"]
ARBITRARY = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=8),
    st.builds(lambda t, d: {**d, "type": t}, st.sampled_from(TYPES),
              st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)),
    JSON,
)
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30)


@st.composite
def valid_track(draw: st.DrawFn) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "track",
        "userId": draw(NAMES | st.integers(min_value=0, max_value=10**12)),
        "event": draw(NAMES),
    }
    if draw(st.booleans()):
        msg["properties"] = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=4))
    if draw(st.booleans()):
        msg["context"] = draw(st.dictionaries(st.sampled_from(["ip", "library", "page", "x"]), JSON,
                                              max_size=3))
    return msg


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), valid_track(), ARBITRARY), min_size=1, max_size=12),
       st.none() | st.dictionaries(st.text(max_size=5), JSON, max_size=3))
def test_valid_messages_survive_any_neighbours(
    fuzz: Fuzz, plan: list[tuple[bool, dict[str, Any], Any]], context: dict[str, Any] | None
) -> None:
    stamp = time.monotonic_ns()
    batch: list[Any] = []
    valid: dict[int, str] = {}
    for i, (is_valid, track, other) in enumerate(plan):
        if is_valid:
            mid = f"fz-{stamp}-{i}"
            # the event name is the messageId: each valid event has its own Accoil count
            batch.append({**track, "messageId": mid, "event": mid})
            valid[i] = mid
        else:
            batch.append(other)
    body: dict[str, Any] = {"batch": batch}
    if context is not None:
        body["context"] = context
    resp = fuzz.post("/v1/batch", json.dumps(body).encode())
    assert resp.status_code == 200, resp.text
    reply = resp.json()
    rejected = {r["index"] for r in reply.get("rejected", [])}
    assert rejected <= set(range(len(batch)))
    assert not rejected & set(valid), (reply, batch)
    fuzz.expected.update(valid.values())


# ids holding the character a key separator would be: (x+SEP+y, z) and (x, y+SEP+z) join to
# the same text, yet as (user, account) or (group, user) pairs they must never share a ledger
# row or a pending call
TRICKY = st.text(alphabet="ab\x1f|:", min_size=1, max_size=3)
SEP = "\x1f"


@settings(max_examples=EXAMPLES // 2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(TRICKY, TRICKY, TRICKY, TRICKY), min_size=1, max_size=4))
def test_ids_with_separators_never_merge(
    fuzz: Fuzz, parts: list[tuple[str, str, str, str]]
) -> None:
    stamp = time.monotonic_ns()
    tracks, groups = [], []
    for x, y, z, event in parts:
        name = f"sep-{stamp}:{event}"
        tracks += [(x + SEP + y, z, name), (x, y + SEP + z, name)]
        groups += [(x + SEP + y, z), (x, y + SEP + z)]
    batch: list[dict[str, Any]] = [
        {"type": "track", "messageId": f"sep-{stamp}-{i}", "userId": user, "event": event,
         "context": {"groupId": account}}
        for i, (user, account, event) in enumerate(tracks)
    ]
    batch += [
        {"type": "group", "messageId": f"sepg-{stamp}-{i}", "userId": user, "groupId": group,
         "traits": {"pair": [group, user]}}
        for i, (group, user) in enumerate(groups)
    ]
    resp = fuzz.post("/v1/batch", json.dumps({"batch": batch}).encode())
    assert resp.status_code == 200 and "rejected" not in resp.json(), resp.text
    for user, _, event in tracks:
        fuzz.tricky[(user, event)] += 1


RAW = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.builds(lambda b, cut: b[:cut], st.just(b'{"batch":[{"type":"track","userId":"u","event":"e"}]}'),
              st.integers(0, 60)),
    st.builds(lambda b, i, c: b[:i] + bytes([c]) + b[i + 1 :],
              st.just(b'{"batch":[{"type":"track","userId":"u","event":"e"}]}'),
              st.integers(0, 52), st.integers(0, 255)),
)


@settings(max_examples=EXAMPLES * 2, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RAW, st.sampled_from(["/v1/batch", "/v1/import", "/v1/track", "/v1/identify", "/v1/group",
                             "/v1/page", "/v1/screen", "/v1/alias"]),
       st.sampled_from([None, "gzip", "identity", "deflate", "GZIP"]))
def test_arbitrary_bytes_never_500(fuzz: Fuzz, body: bytes, path: str, encoding: str | None) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    resp = fuzz.post(path, body, headers)
    assert resp.status_code in (200, 400, 413, 415), (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")


def test_nesting_at_the_decoders_limit(fuzz: Fuzz) -> None:
    """Bodies nested about as deep as msgspec reads (near Python's recursion limit, which the
    depth of the caller's stack shifts): each is taken, or refused whole with a 400 naming
    the nesting; never a 503. Redis mode's split by partition once ran out of stack where
    ingest's check had not, and answered 'store unavailable'."""
    stamp = time.monotonic_ns()
    outcomes: Counter[int] = Counter()
    for depth in range(970, 1010):
        deep, plain = f"deep-{stamp}-{depth}", f"plain-{stamp}-{depth}"
        nested = b"[" * depth + b"]" * depth
        body = (b'{"batch":[{"type":"track","userId":"deep","event":"%s","messageId":"%s","x":%s},'
                b'{"type":"track","userId":"plain","event":"%s","messageId":"%s"}]}'
                % (deep.encode(), deep.encode(), nested, plain.encode(), plain.encode()))
        resp = fuzz.post("/v1/batch", body)
        outcomes[resp.status_code] += 1
        if resp.status_code == 400:
            assert resp.json()["message"] == "body is nested too deeply", (depth, resp.text)
            continue
        assert resp.status_code == 200, (depth, resp.text)
        rejected = {r["index"] for r in resp.json().get("rejected", [])}
        assert 1 not in rejected, (depth, resp.text)
        fuzz.expected.add(plain)
        if 0 not in rejected:
            fuzz.expected.add(deep)
    # the depths straddle the limit, wherever the stack puts it
    assert outcomes[200] and outcomes[400], outcomes


def test_nesting_at_the_decoders_limit_one_message(fuzz: Fuzz) -> None:
    """As above, on a single-message route, whose message is stored two levels deeper (in a
    batch) than the client sent it."""
    stamp = time.monotonic_ns()
    outcomes: Counter[int] = Counter()
    for depth in range(960, 1010):
        mid = f"deep1-{stamp}-{depth}"
        body = b'{"userId":"deep","event":"%s","messageId":"%s","x":%s}' % (
            mid.encode(), mid.encode(), b"[" * depth + b"]" * depth)
        resp = fuzz.post("/v1/track", body)
        outcomes[resp.status_code] += 1
        if resp.status_code == 400:
            assert resp.json()["message"] in (
                "body is nested too deeply", "message is nested too deeply"), (depth, resp.text)
            continue
        assert resp.status_code == 200, (depth, resp.text)
        fuzz.expected.add(mid)
    assert outcomes[200] and outcomes[400], outcomes


# -- schemathesis: every operation of the served OpenAPI document -----------------------


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.mark.parametrize("examples", [SCHEMA_EXAMPLES, pytest.param(150, marks=pytest.mark.slow)])
def test_openapi_operations(fuzz: Fuzz, examples: int) -> None:
    schema = schemathesis.openapi.from_url(fuzz.gw.url + "/openapi.json")
    # an Err result (an operation the document describes wrongly) has no .ok(): it fails here
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz_operation(fuzz, operation, mode, examples)
    assert all(n > 0 for n in fuzz.schema_requests.values())


def _fuzz_operation(
    fuzz: Fuzz, operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: schemathesis.GenerationMode,
    examples: int,
) -> None:
    admin = operation.path.startswith("/admin/")
    headers = {"Authorization": bearer() if admin else basic(WRITE_KEY)}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=fuzz.gw.url, headers=headers, session=fuzz.http)
        fuzz.statuses[response.status_code] += 1
        fuzz.schema_requests[f"{case.method} {case.path} {mode}"] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        run()
    except Unsatisfiable:
        # nothing in this operation can be made invalid (no body, no parameters)
        assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
