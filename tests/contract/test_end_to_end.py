"""The real gateway against mock_accoil: Segment calls in, Accoil calls out."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Source
from mock_accoil.server import MockAccoilServer
from tests.contract import out_of_range
from tests.contract.harness import (
    ADMIN,
    API_KEY,
    WRITE_KEY,
    basic,
    running,
    settings_for,
)

TS = "2026-11-20T10:00:00.000Z"


def track(mid: str, user: str = "u1", event: str = "Report Built", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": mid, "userId": user, "event": event, "timestamp": TS, **extra}


async def test_every_call_type_maps_to_its_v2_call(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    batch = [
        {"type": "identify", "messageId": "m1", "userId": "u1", "timestamp": TS,
         "traits": {"email": "a@acme.io", "createdAt": 1700000000}, "context": {"groupId": "acme"}},
        {"type": "group", "messageId": "m2", "userId": "u1", "groupId": "acme", "timestamp": TS,
         "traits": {"name": "Acme", "mrr": "1200", "plan": "pro"}},
        track("m3", context={"groupId": "acme"}, properties={"secret": "dropped"}),
        {"type": "page", "messageId": "m4", "userId": "u1", "name": "Dashboard", "timestamp": TS},
        {"type": "screen", "messageId": "m5", "userId": "u1", "timestamp": TS,
         "properties": {"name": "Settings"}},
        {"type": "alias", "messageId": "m6", "userId": "u1", "previousId": "anon-1", "timestamp": TS},
    ]
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        status, body = await gw.post("/v1/batch", {"batch": batch})
        assert (status, body) == (200, {"success": True})
        await gw.idle()
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
    calls: dict[str, list[Any]] = {c["path"]: [] for c in mock_accoil.calls()}
    for c in mock_accoil.calls():
        assert c["status"] == 202 and c["api_key"] == API_KEY
        calls[c["path"]].append(c["body"])
    assert calls["/v2/identify"] == [{
        "userId": "u1", "groupId": "acme", "timestamp": TS,
        "traits": {"email": "a@acme.io", "createdAt": "2023-11-14T22:13:20.000Z"},
    }]
    assert calls["/v2/group"] == [{
        "groupId": "acme", "userId": "u1", "timestamp": TS,
        "traits": {"name": "Acme", "mrr": 1200, "plan": "pro"},
    }]
    assert sorted(calls["/v2/track"], key=lambda b: b["event"]) == [
        {"userId": "u1", "event": "Page Viewed Dashboard", "timestamp": TS},
        {"userId": "u1", "event": "Report Built", "timestamp": TS},
        {"userId": "u1", "event": "Screen Viewed Settings", "timestamp": TS},
    ]
    assert mock_accoil.count("u1", "Report Built") == 1
    assert 'accoil_gateway_messages_unsupported_total{source="main",type="alias"} 1.0' in metrics


async def test_segment_dialect_posts_every_call_to_segment(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    source = Source(write_key=WRITE_KEY, accoil_api_key=API_KEY, base_url=mock_accoil.url,
                    api="segment", name="seg", rate_per_second=1000.0)
    batch = [
        {"type": "identify", "messageId": "a", "userId": "u1", "timestamp": TS, "traits": {"role": "admin"}},
        {"type": "group", "messageId": "b", "userId": "u1", "groupId": "g1", "timestamp": TS, "traits": {"status": "paying"}},
        track("c"),
        {"type": "page", "messageId": "d", "userId": "u1", "name": "Home", "timestamp": TS},
        {"type": "screen", "messageId": "e", "userId": "u1", "name": "Prefs", "timestamp": TS},
    ]
    async with running(settings_for(mock_accoil.url, tmp_path, sources=[source])) as gw:
        assert (await gw.post("/v1/batch", {"batch": batch}))[0] == 200
        await gw.idle()
    calls = mock_accoil.calls(path="/segment")
    assert len(calls) == 5, [c["body"] for c in calls]
    assert all(c["status"] == 202 and c["api_key"] == API_KEY for c in calls)
    by_type = {c["body"]["type"]: c["body"] for c in calls}
    assert by_type["identify"]["traits"] == {"role": "admin"}
    assert by_type["group"]["groupId"] == "g1"
    assert by_type["page"]["name"] == "Home" and by_type["screen"]["name"] == "Prefs"
    assert mock_accoil.count("u1", "Page Viewed Home") == 1
    assert mock_accoil.count("u1", "Screen Viewed Prefs") == 1
    assert mock_accoil.count("u1", "Report Built") == 1


async def test_duplicates_are_dropped_across_a_restart(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    settings = settings_for(mock_accoil.url, tmp_path)
    first = [track(f"m{i}") for i in range(5)]
    async with running(settings) as gw:
        await gw.post("/v1/batch", {"batch": first + first[:2]})
        await gw.idle()
    assert mock_accoil.count("u1", "Report Built") == 5
    async with running(settings) as gw:
        status, _ = await gw.post("/v1/batch", {"batch": first + [track("m-new")]})
        assert status == 200
        await gw.idle()
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
    assert mock_accoil.count("u1", "Report Built") == 6
    assert 'accoil_gateway_messages_deduplicated_total{source="main"} 5.0' in metrics


async def test_messages_without_an_id_are_never_taken_for_earlier_ones(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # the id generated for a message without one must not repeat when inbox record ids
    # start again (a new inbox beside an old gateway.db, as after an upgrade)
    settings = settings_for(mock_accoil.url, tmp_path)
    anonymous = {k: v for k, v in track("x").items() if k != "messageId"}
    async with running(settings) as gw:
        assert (await gw.post("/v1/batch", {"batch": [anonymous]}))[0] == 200
        await gw.idle()
    # (Redis mode keeps no inbox folder: its stream entry ids never start again)
    shutil.rmtree(tmp_path / "inbox", ignore_errors=True)
    async with running(settings) as gw:
        assert (await gw.post("/v1/batch", {"batch": [anonymous]}))[0] == 200
        await gw.idle()
    assert mock_accoil.count("u1", "Report Built") == 2


async def test_exact_mode_forwards_every_occurrence(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path, flush_interval=0.5)) as gw:
        for n in range(3):
            batch = [track(f"m{n}-{i}", timestamp=f"2026-11-20T10:0{n}:0{i}.000Z") for i in range(4)]
            await gw.post("/v1/batch", {"batch": batch})
        await gw.idle()
        (row,) = (await gw.admin("GET", "/admin/ledger"))[1]["ledger"]
    assert row["count"] == 12 and row["lastTimestamp"] == "2026-11-20T10:02:03.000Z"
    assert mock_accoil.count("u1", "Report Built") == 12


async def test_daily_unique_forwards_one_call_per_key_and_day(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    source = Source(write_key=WRITE_KEY, accoil_api_key=API_KEY, base_url=mock_accoil.url,
                    track_mode="daily-unique", name="du", rate_per_second=1000.0)
    batch = [track(f"m{i}") for i in range(5)] + [track("n1", timestamp="2026-11-21T01:00:00.000Z")]
    async with running(settings_for(mock_accoil.url, tmp_path, sources=[source])) as gw:
        await gw.post("/v1/batch", {"batch": batch})
        await gw.post("/v1/batch", {"batch": [track("m9")]})
        await gw.idle()
    assert mock_accoil.count("u1", "Report Built", day="2026-11-20") == 1
    assert mock_accoil.count("u1", "Report Built", day="2026-11-21") == 1


async def test_identify_traits_merge_and_unchanged_calls_are_not_resent(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    def identify(mid: str, ts: str, traits: dict[str, Any]) -> dict[str, Any]:
        return {"type": "identify", "messageId": mid, "userId": "u1", "timestamp": ts, "traits": traits}

    async with running(settings_for(mock_accoil.url, tmp_path, flush_interval=0.5)) as gw:
        await gw.post("/v1/batch", {"batch": [
            identify("a", "2026-11-20T10:00:02.000Z", {"name": "New", "role": "admin"}),
            # older: its name loses to the later one, its email is new
            identify("b", "2026-11-20T10:00:01.000Z", {"name": "Old", "email": "a@b.c"}),
        ]})
        await gw.idle()
        # the same traits again that day: nothing to send
        await gw.post("/v1/batch", {"batch": [identify("c", "2026-11-20T11:00:00.000Z", {"role": "admin"})]})
        await gw.idle()
        # a change: sent
        await gw.post("/v1/batch", {"batch": [identify("d", "2026-11-20T12:00:00.000Z", {"role": "owner"})]})
        await gw.idle()
    calls = [c["body"] for c in mock_accoil.calls(path="/v2/identify")]
    assert len(calls) == 2
    assert calls[0]["traits"] == {"name": "New", "role": "admin", "email": "a@b.c"}
    assert calls[0]["timestamp"] == "2026-11-20T10:00:02.000Z"
    assert calls[1]["traits"]["role"] == "owner"
    (user,) = mock_accoil.users()
    assert user["traits"]["role"] == "owner" and user["traits"]["email"] == "a@b.c"


async def test_unforwardable_messages_become_dead_letters_and_replay(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    batch = [
        track("ok"),
        {"type": "track", "messageId": "anon", "anonymousId": "a1", "event": "X", "timestamp": TS},
        # no name: skipped and counted, not a dead letter (unnamed_pages = "skip")
        {"type": "page", "messageId": "noname", "userId": "u1", "timestamp": TS},
        {"type": "track", "messageId": "bad", "userId": "u1"},  # no event: rejected at ingest
    ]
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        status, body = await gw.post("/v1/batch", {"batch": batch})
        assert status == 200
        assert [(r["index"], r["messageId"]) for r in body["rejected"]] == [(3, "bad")]
        assert "event" in body["rejected"][0]["reason"]
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        letters = listing["dead_letters"]
        assert sorted((d["stage"], d["payload"]["messageId"]) for d in letters) == [
            ("ingest", "bad"), ("mapping", "anon")
        ]
        reasons = {d["payload"]["messageId"]: d["reason"] for d in letters}
        assert "userId" in reasons["anon"]
        # a forward-stage dead letter: Accoil refuses a call for good
        mock_accoil.add_fault(422, count=1, path="/v2/track")
        await gw.post("/v1/batch", {"batch": [track("refused", user="u2")]})
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters?limit=10")
        forward = [d for d in listing["dead_letters"] if d["stage"] == "forward"]
        assert len(forward) == 1 and forward[0]["status"] == 422
        status, replay = await gw.admin("POST", "/admin/dead-letters/replay", json={"ids": [forward[0]["id"]]})
        assert (status, replay) == (200, {"replayed": 1})
        await gw.idle()
    assert mock_accoil.count("u2", "Report Built") == 1
    assert mock_accoil.count("u1", "Report Built") == 1


async def test_auth_like_segment(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert (await gw.post("/v1/batch", {"batch": [track("1")]}, key="nope"))[0] == 401
        assert (await gw.post("/v1/batch", {"batch": [track("2")]}, key=None))[0] == 401
        status, body = await gw.post("/v1/batch", {"batch": [track("3")], "writeKey": WRITE_KEY}, key=None)
        assert status == 200
        status, _ = await gw.post("/v1/track", {**track("4"), "writeKey": WRITE_KEY}, key=None)
        assert status == 200
        status, body = await gw.post("/v1/batch", {"batch": [track("5")]}, key=None,
                                     headers={"Authorization": "Bearer " + WRITE_KEY})
        assert status == 401 and WRITE_KEY not in str(body)
        await gw.idle()
        assert (await gw.admin("GET", "/admin/stats"))[0] == 200
        async with gw.http.get(gw.url + "/admin/stats") as resp:
            assert resp.status == 401
        async with gw.http.get(gw.url + "/admin/stats", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
    assert mock_accoil.count("u1", "Report Built") == 2


async def test_browsers_get_cors_headers(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    origin = {"Origin": "https://app.example.com"}
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        async with gw.http.options(gw.url + "/v1/track", headers=origin) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        for key in (WRITE_KEY, "nope"):  # the reply, success or error, is readable by the page
            async with gw.http.post(gw.url + "/v1/track", json=track("c1"),
                                    headers={**origin, "Authorization": basic(key)}) as resp:
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
        # a server-side SDK sends no Origin, and gets no CORS headers
        status, _ = await gw.post("/v1/track", track("c2"))
        async with gw.http.post(gw.url + "/v1/track", json=track("c3"),
                                headers={"Authorization": basic(WRITE_KEY)}) as resp:
            assert resp.status == 200 and status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert resp.headers["Content-Type"].startswith("application/json")


async def test_single_message_routes_take_their_type_from_the_path(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        assert (await gw.post("/v1/track", {"userId": "u1", "event": "Clicked", "type": "identify"}))[0] == 200
        assert (await gw.post("/v1/identify", {"userId": "u1", "traits": {"a": 1}}))[0] == 200
        assert (await gw.post("/v1/group", {"userId": "u1", "groupId": "g", "traits": {}}))[0] == 200
        assert (await gw.post("/v1/page", {"userId": "u1", "name": "P"}))[0] == 200
        assert (await gw.post("/v1/screen", {"userId": "u1", "name": "S"}))[0] == 200
        assert (await gw.post("/v1/alias", {"userId": "u1", "previousId": "x"}))[0] == 200
        status, body = await gw.post("/v1/track", {"userId": "u1"})
        assert status == 400 and "event" in body["error"]
        await gw.idle()
    assert mock_accoil.count("u1", "Clicked") == 1
    assert mock_accoil.count("u1", "Page Viewed P") == 1
    assert mock_accoil.count("u1", "Screen Viewed S") == 1
    assert len(mock_accoil.calls(path="/v2/identify")) == 1
    assert len(mock_accoil.calls(path="/v2/group")) == 1


async def test_limits_and_gzip(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        body = b'{"batch":[' + b",".join(
            b'{"type":"track","userId":"u1","event":"Zipped","messageId":"z%d"}' % i for i in range(50)
        ) + b"]}"
        status, reply = await gw.post("/v1/batch", key=WRITE_KEY, data=gzip.compress(body),
                                      headers={"Content-Encoding": "gzip"})
        assert (status, reply) == (200, {"success": True})
        big = {"batch": [track("big", properties={"pad": "x" * 600_000})]}
        assert (await gw.post("/v1/batch", big))[0] == 413
        bomb = gzip.compress(b"[" + b" " * 20_000_000 + b"]")
        status, reply = await gw.post("/v1/batch", data=bomb, headers={"Content-Encoding": "gzip"})
        assert status == 413 and "gunzip" in reply["error"]
        many = {"batch": [track(f"n{i}") for i in range(2501)]}
        status, reply = await gw.post("/v1/batch", many)
        assert status in (400, 413) and "2500" in reply["error"] or "2,500" in reply["error"]
        one_big = {"batch": [track("m", properties={"pad": "y" * 40_000}), track("fine")]}
        status, reply = await gw.post("/v1/batch", one_big)
        assert status == 200 and [r["index"] for r in reply["rejected"]] == [0]
        status, reply = await gw.post("/v1/batch", data=b"{not json")
        assert status == 400
        await gw.idle()
    assert mock_accoil.count("u1", "Zipped") == 50
    assert mock_accoil.count("u1", "Report Built") == 1


async def test_retries_through_503_and_429(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    mock_accoil.add_fault(503, count=3)
    mock_accoil.add_fault(429, retry_after=1, count=1)
    async with running(settings_for(mock_accoil.url, tmp_path, circuit_threshold=100)) as gw:
        await gw.post("/v1/batch", {"batch": [track("r1"), track("r2", user="u2")]})
        await gw.idle(timeout=15)
        metrics = await (await gw.http.get(gw.url + "/metrics")).text()
    statuses = [c["status"] for c in mock_accoil.calls()]
    assert statuses.count(503) == 3 and statuses.count(429) == 1 and statuses.count(202) == 2
    assert mock_accoil.count("u1", "Report Built") == 1 and mock_accoil.count("u2", "Report Built") == 1
    assert 'accoil_gateway_retries_total{source="main"} 4.0' in metrics


async def test_backlog_bound_answers_503_with_retry_after(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    mock_accoil.add_fault(503)  # Accoil down: nothing drains
    async with running(settings_for(mock_accoil.url, tmp_path, max_backlog=10, retry_after=7)) as gw:
        assert (await gw.post("/v1/batch", {"batch": [track(f"a{i}") for i in range(10)]}))[0] == 200
        async with gw.http.post(gw.url + "/v1/batch", json={"batch": [track("over")]},
                                headers={"Authorization": basic(WRITE_KEY)}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "7"
        async with gw.http.get(gw.url + "/readyz") as resp:
            assert resp.status == 503
        mock_accoil.clear_faults()
        await gw.idle(timeout=15)
        assert (await gw.post("/v1/batch", {"batch": [track("after")]}))[0] == 200
        await gw.idle()
    assert mock_accoil.count("u1", "Report Built") == 11


async def test_accounts_follow_group_calls(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        await gw.post("/v1/batch", {"batch": [
            {"type": "group", "messageId": "g", "userId": "u1", "groupId": "acme", "timestamp": TS},
            track("t1"),
        ]})
        await gw.idle()
        (row,) = (await gw.admin("GET", "/admin/ledger"))[1]["ledger"]
    assert row["account"] == "acme"
    (account,) = mock_accoil.accounts()
    assert "u1" in account["members"]


async def test_batch_context_merges_and_clock_skew_is_corrected(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    batch = {
        "batch": [{"type": "track", "messageId": "s1", "userId": "u1", "event": "Skewed",
                   "originalTimestamp": "2020-01-01T00:00:00.000Z"},
                  {"type": "identify", "messageId": "s2", "userId": "u1", "timestamp": TS}],
        "sentAt": "2020-01-01T00:00:10.000Z",
        "context": {"groupId": "acme"},
    }
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw:
        await gw.post("/v1/batch", batch)
        await gw.idle()
    (call,) = mock_accoil.calls(path="/v2/track")
    (identify,) = mock_accoil.calls(path="/v2/identify")
    # the batch's context.groupId reaches the message (v2 track documents no groupId)
    assert identify["body"]["groupId"] == "acme"
    # sent 10 s after it happened, by the client's clock: ten seconds before it arrived
    assert call["body"]["timestamp"] < call["time"]
    from datetime import datetime
    ts = datetime.fromisoformat(call["body"]["timestamp"].replace("Z", "+00:00"))
    arrived = datetime.fromisoformat(call["time"].replace("Z", "+00:00"))
    assert 9 <= (arrived - ts).total_seconds() < 15


async def test_stg_keys_keep_their_prefix_off_custom_base_urls(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    source = Source(write_key=WRITE_KEY, accoil_api_key="stg_abc", base_url=mock_accoil.url,
                    api="segment", name="stg", rate_per_second=1000.0)
    async with running(settings_for(mock_accoil.url, tmp_path, sources=[source])) as gw:
        await gw.post("/v1/batch", {"batch": [track("1")]})
        await gw.idle()
    # a custom base URL means no staging host: the key goes as it is, in the segment form
    (call,) = mock_accoil.calls()
    assert call["api_key"] == "stg_abc"


@pytest.mark.parametrize("route", ["/healthz", "/readyz", "/metrics"])
async def test_operational_routes_answer(mock_accoil: MockAccoilServer, tmp_path: Path, route: str) -> None:
    async with running(settings_for(mock_accoil.url, tmp_path)) as gw, gw.http.get(gw.url + route) as resp:
        assert resp.status == 200


@pytest.mark.inline  # looks at the live actors, which a worker process keeps to itself
async def test_more_accounts_than_live_actors(mock_accoil: MockAccoilServer, tmp_path: Path) -> None:
    # 60 accounts through at most 4 live actors: idle ones passivate to make room, nothing lost
    settings = settings_for(mock_accoil.url, tmp_path, max_actors=4, flush_interval=0.2)
    batch = [track(f"m{i}", user=f"u{i}", context={"groupId": f"acct{i % 60}"}) for i in range(120)]
    async with running(settings) as gw:
        assert (await gw.post("/v1/batch", {"batch": batch}))[0] == 200
        await gw.idle(timeout=20)
        assert len(gw.gateway.actors) <= 4
        (_, ledger) = await gw.admin("GET", "/admin/ledger")
    assert len({row["account"] for row in ledger["ledger"]}) == 60
    assert sum(r["count"] for r in mock_accoil.counts(event="Report Built")) == 120


async def test_numbers_out_of_range_forward_as_null_and_an_id_is_rejected(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # the same reply and the same calls whichever pipeline runs (inline or the worker's)
    async with running(settings_for(mock_accoil.url, tmp_path, admin_token=ADMIN)) as gw:
        status, reply = await gw.post("/v1/batch", data=out_of_range.BATCH,
                                      headers={"Content-Type": "application/json"})
        assert (status, reply) == (200, {"success": True, "rejected": out_of_range.REJECTED})
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        # a replay takes it (it is JSON), and the pipeline rejects it again for its id
        (first,) = listing["dead_letters"]
        status, replay = await gw.admin("POST", "/admin/dead-letters/replay",
                                        json={"ids": [first["id"]]})
        assert (status, replay) == (200, {"replayed": 1})
        await gw.idle()
        _, again = await gw.admin("GET", "/admin/dead-letters")
        assert [(d["reason"], d["payload"]) for d in again["dead_letters"]] == [
            (out_of_range.REJECTED[0]["reason"], out_of_range.REJECTED_RAW)]
    calls = out_of_range.forwarded(mock_accoil.calls())
    calls["/v2/track"].sort(key=lambda b: b["event"])
    assert calls == out_of_range.EXPECTED
    # the rejected message is a dead letter, as sent: the listing shows its text, as it
    # shows any payload JSON cannot hold as a value
    (letter,) = listing["dead_letters"]
    assert (letter["stage"], letter["reason"]) == ("ingest", out_of_range.REJECTED[0]["reason"])
    assert letter["payload"] == out_of_range.REJECTED_RAW


async def test_messages_that_are_not_objects_are_rejected_and_the_rest_applied(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # a batch's entry that is no JSON object (a number, a string, a list): listed and kept,
    # in every mode (the Redis split reads each message's ids, and must not fail on these)
    batch: list[Any] = [track("ok", user="u7"), 17, "text", [1], track("ok2", user="u8")]
    async with running(settings_for(mock_accoil.url, tmp_path, admin_token=ADMIN)) as gw:
        status, reply = await gw.post("/v1/batch", {"batch": batch})
        assert status == 200, reply
        assert [r["index"] for r in reply["rejected"]] == [1, 2, 3]
        assert all("object" in r["reason"] for r in reply["rejected"]), reply
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        assert sorted(str(d["payload"]) for d in listing["dead_letters"]) == ["17", "[1]", "text"]
    assert mock_accoil.count("u7", "Report Built") == 1
    assert mock_accoil.count("u8", "Report Built") == 1


async def test_timestamps_outside_the_calendar_in_utc_are_a_broken_clock(
    mock_accoil: MockAccoilServer, tmp_path: Path
) -> None:
    # year 1 at +01:00 is before year 1 in UTC: Python cannot hold it. It reads as a date,
    # so ingest takes it; the pipeline treats it as a broken client clock (the event counts
    # when it arrived) rather than failing the record at every routing, which would hold
    # it, and in Redis mode its partition's cursor, for ever
    batch = [{"type": "track", "messageId": "early", "userId": "u1", "event": "Early",
              "timestamp": "0001-01-01T00:00:00+01:00"},
             {"type": "identify", "messageId": "late", "userId": "u2",
              "timestamp": "9999-12-31T23:30:00-01:00",
              "traits": {"createdAt": "0001-01-01T00:00:00+01:00"}},
             track("after", user="u3")]
    async with running(settings_for(mock_accoil.url, tmp_path, admin_token=ADMIN)) as gw:
        status, reply = await gw.post("/v1/batch", {"batch": batch})
        assert (status, reply) == (200, {"success": True}), reply
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
    assert listing["dead_letters"] == []
    (early,) = [c for c in mock_accoil.calls(path="/v2/track") if c["body"]["event"] == "Early"]
    assert early["body"]["timestamp"][:10] == early["time"][:10]  # the day it arrived
    (identify,) = mock_accoil.calls(path="/v2/identify")
    assert identify["body"]["traits"]["createdAt"] == "0001-01-01T00:00:00+01:00"  # as sent
    assert mock_accoil.count("u3", "Report Built") == 1
