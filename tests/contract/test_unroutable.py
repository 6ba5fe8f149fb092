"""A record whose routing raises (a poison message) is kept as dead letters and the inbox
moves on, in SQLite mode and in Redis mode: it must not hold the inbox, or a partition's
cursor, for ever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.actors import router as router_module
from gateway.actors.envelope import Envelope
from gateway.store.redis.store import RedisStore
from mock_accoil.server import MockAccoilServer
from tests.contract.harness import running, settings_for
from tests.contract.test_end_to_end import TS, track

REASON = "routing failed: OverflowError"


class Poison:
    """Routing the message `poison` raises, as a poison message's would at every routing;
    `raised` counts the routings that reached it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.raised = 0
        self._made = Envelope
        self._monkeypatch = monkeypatch
        monkeypatch.setattr(router_module, "Envelope", self._envelope)

    def _envelope(self, key: bytes, msg: Any, *rest: Any) -> Envelope:
        if msg.messageId == "poison":
            self.raised += 1
            raise OverflowError("date value out of range")
        return self._made(key, msg, *rest)

    def cure(self) -> None:
        self._monkeypatch.setattr(router_module, "Envelope", self._made)


@pytest.mark.inline  # the failure is made in the test's process
@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_a_record_that_cannot_be_routed_is_a_dead_letter_and_the_inbox_moves_on(
    mock_accoil: MockAccoilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest, store: str,
) -> None:
    overrides: dict[str, Any] = {}
    if store == "redis":
        server = request.getfixturevalue("contract_redis")
        with server.client() as c:
            c.flushall()
        overrides = {"store": "redis", "redis_url": server.url, "partitions": 8}
    settings = settings_for(mock_accoil.url, tmp_path, **overrides)
    poison = Poison(monkeypatch)
    # one user: in Redis mode the request is one record of one partition, its first message
    # routed (handed to its actor) before the poison one fails
    batch = [track("t1"), {"type": "identify", "messageId": "poison", "userId": "u1",
                           "timestamp": TS, "traits": {"plan": "pro"}}, track("t2", event="Later")]
    async with running(settings) as gw:
        status, _ = await gw.post("/v1/batch", {"batch": batch})
        assert status == 200
        status, _ = await gw.post("/v1/batch", {"batch": [track("after", user="u9")]})
        assert status == 200
        await gw.idle()  # the inbox empty: the record counted as applied
        if isinstance(gw.gateway.store, RedisStore):
            inbox = gw.gateway.store.inbox
            assert inbox is not None
            lag = await inbox.lag(list(range(8)))
            assert set(lag.values()) == {0}  # every cursor past it, the streams trimmed
        _, listing = await gw.admin("GET", "/admin/dead-letters")
    letters = listing["dead_letters"]
    assert sorted((d["stage"], d["reason"], d["payload"]["messageId"]) for d in letters) == [
        ("ingest", REASON, mid) for mid in ["poison", "t1", "t2"]]
    assert poison.raised == 1
    assert mock_accoil.count("u9", "Report Built") == 1  # the rest of the stream applied
    applied = mock_accoil.count("u1", "Report Built")
    async with running(settings) as gw:  # a restart does not route it again
        await gw.idle()
        _, listing = await gw.admin("GET", "/admin/dead-letters")
        assert len(listing["dead_letters"]) == 3
        assert poison.raised == 1
        poison.cure()
        status, reply = await gw.admin(
            "POST", "/admin/dead-letters/replay", json={"ids": [d["id"] for d in letters]})
        assert (status, reply) == (200, {"replayed": 3})
        await gw.idle()
    # replayed as any other: each message applied once, none lost, none doubled
    assert applied == 1  # t1, handed over before the failure: committed with it
    assert mock_accoil.count("u1", "Report Built") == 1
    assert mock_accoil.count("u1", "Later") == 1
    (identify,) = mock_accoil.calls(path="/v2/identify")
    assert identify["body"]["traits"] == {"plan": "pro"}
