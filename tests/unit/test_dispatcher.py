"""The router's account rule and the dispatcher: turns, the bound on messages held,
passivation, and a turn the store refuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from gateway.actors import router as router_module
from gateway.actors.dispatcher import BEHIND, DRAINED, READ_AHEAD, Dispatcher
from gateway.actors.envelope import Envelope
from gateway.actors.router import Router, StoreFailed
from gateway.backlog import Backlog
from gateway.config import Settings, Source, StoreKind
from gateway.keys import DedupeKeys, dedupe_prefix, generated_message_id
from gateway.observability.metrics import Metrics
from gateway.segment import (
    Page,
    StoredTrack,
    Track,
    context_group,
    context_traits,
    decode_batch,
)
from gateway.store import InboxRow, SqliteStore, Turn

SOURCE = Source(write_key="wk_test_1", accoil_api_key="key_test_1", name="main")
TS = "2026-11-20T10:00:00.000Z"


def track(mid: str, user: str, account: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "track", "messageId": mid, "userId": user, "event": "E",
                           "timestamp": TS}
    if account is not None:
        msg["context"] = {"groupId": account}
    return msg


async def accounts_of(store: SqliteStore, batch: list[dict[str, Any]]) -> list[str]:
    router = Router(store, {"main": SOURCE})
    body = msgspec.json.encode({"batch": batch})
    row = InboxRow(1, "main", 0.0, body, len(batch))
    got: list[str] = []

    def deliver(env: Envelope, source: Source, account: str) -> None:
        got.append(account)

    assert await router.route(row, deliver) == []
    return got


async def test_the_account_of_a_message(store: SqliteStore) -> None:
    batch = [
        track("1", "u1"),  # no group known: the user itself
        {"type": "group", "messageId": "2", "userId": "u1", "groupId": "g1"},
        track("3", "u1"),  # the account last seen for the user in a group call
        track("4", "u1", account="g2"),  # context.groupId wins
        {"type": "track", "messageId": "5", "anonymousId": "a1", "event": "E"},
        {"type": "group", "messageId": "6", "userId": "u2", "groupId": 7},
    ]
    assert await accounts_of(store, batch) == ["u1", "g1", "g1", "g2", "a1", "7"]


async def test_the_account_learnt_from_a_group_call_is_found_again_in_the_store(
    store: SqliteStore,
) -> None:
    await store.transact(lambda tx: tx.state.put_accounts([("main", "u9", "g9")]))
    assert await accounts_of(store, [track("1", "u9")]) == ["g9"]


ODD_BATCH = {
    "batch": [
        track("1", "u1", account="g1"),
        {**track("2", "u2"), "context": {"groupId": None, "ip": "1.2.3.4"},
         "properties": {"plan": "pro", "nested": {"a": [1, 2]}}},
        {"type": "track", "messageId": "3", "anonymousId": "a1", "event": "E",
         "properties": {"plan": "pro"}, "context": {"library": {"name": "js"}}, "extra": 1},
        {"type": "page", "messageId": "4", "anonymousId": 5, "properties": {"path": "/p"}},
        {"type": "identify", "messageId": "5", "userId": "u3",
         "context": {"traits": {"plan": {"tier": 2}}}},
        {"type": "alias", "messageId": "6", "userId": "u3", "previousId": 9},
        {"type": "track", "messageId": "7", "event": "no ids: rejected"},
    ],
    "context": {"groupId": "batch", "traits": {"plan": {"seats": 3}}},
    "integrations": {"All": True},
    "sentAt": TS,
}


async def routed(
    store: SqliteStore, body: bytes, handed_over: bool, sources: dict[str, Source]
) -> tuple[list[tuple[Any, ...]], list[Envelope], list[tuple[str, bytes]]]:
    router = Router(store, sources)
    row = InboxRow(1, "main", 0.0, body, 7)
    if handed_over:  # ingest in the same process
        assert router.submitted(1, decode_batch(body))
    envelopes: list[Envelope] = []
    seen: list[tuple[Any, ...]] = []

    def deliver(env: Envelope, source: Source, account: str) -> None:
        envelopes.append(env)
        seen.append((account, env.key, env.timestamp, env.user, env.integrations,
                     context_group(env.context), context_traits(env.context)))

    letters = await router.route(row, deliver)
    return seen, envelopes, [(d.reason, d.payload) for d in letters]


async def test_a_row_of_several_records_routes_each_as_a_row_of_its_own_with_ids_unique(
    store: SqliteStore,
) -> None:
    # a Redis entry of two requests' parts: each its own sentAt and received_at, messages
    # without a messageId (their ids are made from the row) and one each ingest rejected
    bodies = [msgspec.json.encode({"batch": [
        {"type": "track", "userId": "u1", "event": "E", "timestamp": "2026-11-20T10:00:00Z"},
        {"type": "identify", "userId": "u1", "traits": {"k": k},
         "originalTimestamp": "2026-11-20T10:00:00Z"},
        {"type": "track", "userId": "u1"},  # no event: a dead letter
    ], "sentAt": f"2026-11-20T10:00:0{k}Z"}) for k in (1, 5)]
    # received at the same time (two requests may be): only their place tells their ids apart
    records = [(1_764_000_000.0, 3, bodies[0]), (1_764_000_000.0, 3, bodies[1])]

    async def route(row: InboxRow, between: Callable[[], None] | None = None) -> tuple[
            list[tuple[Any, ...]], list[bytes | None]]:
        seen: list[tuple[Any, ...]] = []

        def deliver(env: Envelope, source: Source, account: str) -> None:
            seen.append((env.key, env.timestamp, account, env.user))

        letters = await Router(store, {"main": SOURCE}).route(row, deliver, None, between)
        return seen, [d.key for d in letters]

    calls: list[int] = []
    several, letters = await route(
        InboxRow(7, "main", records[0][0], b"", 6, 0, records), lambda: calls.append(1))
    assert calls == [1]  # between the two records
    alone = [await route(InboxRow(7, "main", at, body, n)) for at, n, body in records]
    # each message as its record alone routes it (its own envelope's timestamp)...
    assert [m[1:] for m in several] == [m[1:] for seen, _ in alone for m in seen]
    # ...and every id unique in the row: the first record's as a row of one record (an
    # entry of the version before) has them, the next ones numbered on
    keys = [m[0] for m in several]
    assert len(set(keys)) == 4 and keys[:2] == [m[0] for m in alone[0][0]]
    assert len(set(letters)) == 2 and letters[0] == alone[0][1][0]
    assert several[1][1] != several[3][1]  # each skew from its own request's sentAt


def poisoned(monkeypatch: pytest.MonkeyPatch, mid: str) -> None:
    """Routing the message `mid` raises, as a poison message's would at every routing."""
    made = Envelope

    def envelope(key: bytes, msg: Any, *rest: Any) -> Envelope:
        if msg.messageId == mid:
            raise OverflowError("date value out of range")
        return made(key, msg, *rest)

    monkeypatch.setattr(router_module, "Envelope", envelope)


async def test_a_record_whose_routing_raises_is_kept_as_dead_letters_and_the_row_goes_on(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a row of two records: the first fails at its second message (the first was delivered,
    # its third carries no messageId), the second routes as it would alone
    bad = msgspec.json.encode({"batch": [
        track("a", "u1"),
        {"type": "identify", "messageId": "poison", "userId": "u1"},
        {"type": "identify", "userId": "u2"},
        {"type": "track", "userId": "u1"},  # no event: rejected by ingest, its own reason
    ]})
    good = msgspec.json.encode({"batch": [track("b", "u1")]})
    row = InboxRow(7, "main", 1.0, b"", 5, 0, [(1.0, 4, bad), (2.0, 1, good)])
    poisoned(monkeypatch, "poison")
    seen: list[bytes] = []

    def deliver(env: Envelope, source: Source, account: str) -> None:
        seen.append(env.key)

    letters = await Router(store, {"main": SOURCE}).route(row, deliver)
    keys = DedupeKeys(dedupe_prefix("main"))
    assert seen == [keys("a"), keys("b")]
    assert [(d.stage, d.reason) for d in letters[:3]] == [
        ("ingest", "routing failed: OverflowError")] * 3
    assert "event" in letters[3].reason and letters[3].grouped
    payloads = [msgspec.json.decode(d.payload) for d in letters[:3]]
    # each message as routed: the one without an id keeps the one it was routed under, so
    # that a replay of what was delivered is dropped by dedupe
    assert [p["messageId"] for p in payloads] == [
        "a", "poison", generated_message_id(7, 1.0, 2)]
    assert (payloads[1]["type"], payloads[1]["userId"]) == ("identify", "u1")
    assert len({d.key for d in letters}) == 4  # each kept once however often it is routed


async def test_a_store_that_cannot_be_read_leaves_the_record_pending(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def down(source: str, users: list[str]) -> dict[str, str]:
        raise OSError("disk I/O error")

    monkeypatch.setattr(store, "accounts_of", down)
    body = msgspec.json.encode({"batch": [track("a", "u1")]})
    with pytest.raises(StoreFailed):  # not the record's fault: no dead letter
        await Router(store, {"main": SOURCE}).route(
            InboxRow(1, "main", 0.0, body, 1), lambda env, source, account: None)


@pytest.mark.parametrize("sources", [{"main": SOURCE}, {}], ids=["source", "source gone"])
async def test_a_stored_body_routes_as_the_body_ingest_hands_over(
    store: SqliteStore, sources: dict[str, Source]
) -> None:
    body = msgspec.json.encode(ODD_BATCH)
    stored = await routed(store, body, False, sources)
    handed = await routed(store, body, True, sources)
    assert stored[0] == handed[0]
    # the dead letters keep each message as `decode_batch` models it, by either way
    assert stored[2] == handed[2]
    assert len(stored[2]) == (1 if sources else 7)
    if not sources:
        return
    assert [a[0] for a in stored[0]] == ["g1", "u2", "batch", "batch", "batch", "batch"]
    assert stored[0][1][5] is None  # the message's null hides the batch's groupId
    assert stored[0][4][6] == {"plan": {"seats": 3, "tier": 2}}  # nested traits merge
    # read as apply reads them, but those without a userId (they may become dead letters)
    # in full, as the dead letter keeps them
    kinds = [type(env.message) for env in stored[1]]
    assert kinds[:4] == [StoredTrack, StoredTrack, Track, Page]
    full = decode_batch(body).messages
    assert msgspec.json.encode(stored[1][2].message) == msgspec.json.encode(full[2])


async def test_a_message_without_a_user_and_a_number_out_of_range_is_routed_in_full(
    store: SqliteStore,
) -> None:
    # 1e400 in a track's properties: `decode_stored` skips them and accepts the message (as
    # ingest's check does); read in full for its possible dead letter, the model reads the
    # number as null (as Segment's JavaScript forwards it), where it once refused it
    body = (b'{"batch":[{"type":"track","messageId":"m1","anonymousId":"a1","event":"E",'
            b'"properties":{"big":1e400}},' + msgspec.json.encode(track("m2", "u1")) + b"]}")
    for sources in ({"main": SOURCE}, {}):
        seen, envelopes, letters = await routed(store, body, False, sources)
        if sources:
            assert [a[0] for a in seen] == ["a1", "u1"] and letters == []
            assert envelopes[0].message == Track(
                messageId="m1", anonymousId="a1", event="E", properties={"big": None})
        else:
            assert [reason for reason, _ in letters] == ["source is no longer configured"] * 2
            assert msgspec.json.decode(letters[0][1])["messageId"] == "m1"


class Harness:
    def __init__(self, store: SqliteStore, **settings: Any) -> None:
        self.store = store
        self.settings = Settings(sources=[SOURCE], flush_interval=0.05, actor_idle=0.1, **settings)
        self.backlog = Backlog(10**9)
        self.dispatcher = Dispatcher(
            store, Router(store, {"main": SOURCE}), self.settings, Metrics(["main"]),
            self.backlog, lambda source: None,
        )

    async def accept(self, batch: list[dict[str, Any]]) -> None:
        body = msgspec.json.encode({"batch": batch})
        assert not decode_batch(body).rejected
        await self.store.accept("main", 0.0, body, len(batch))
        self.backlog.accepted(len(batch))

    async def applied(self, check: Callable[[], bool] = lambda: True) -> None:
        await self.store.restart_inbox()
        task = asyncio.create_task(self.dispatcher.run())
        try:
            async with asyncio.timeout(20):
                while (await self.store.counts()).inbox or not check():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        finally:
            self.dispatcher.stop()
            await task


async def test_a_turn_commits_many_actors_at_once_and_holds_at_most_the_bound(
    store: SqliteStore,
) -> None:
    h = Harness(store, max_in_flight=400)
    for b in range(20):
        await h.accept([track(f"{b}-{i}", f"u{i}", f"acct{i % 50}") for i in range(100)])
    turns: list[int] = []
    transact = store.transact

    def counting(
        script: Callable[[Turn], Any], now: float | None = None, partition: int = 0
    ) -> Any:
        turns.append(h.dispatcher.held)
        return transact(script, now, partition)

    store.transact = counting  # type: ignore[method-assign]
    await h.applied()
    counts = await store.counts()
    assert (counts.ledger_events, counts.outbox) == (2000, 2000)
    # 2,000 messages of 50 accounts in turns of about 200: a turn is many actors' flushes
    assert 5 <= len(turns) <= 20
    assert max(turns) <= 400 + 100  # the bound, and at most one record read past a turn's end


async def test_idle_actors_are_passivated_and_max_actors_holds(store: SqliteStore) -> None:
    h = Harness(store, max_actors=8)
    for b in range(8):  # 8 records of 5 accounts each
        await h.accept([track(f"{b}-{i}", f"u{b}-{i}", f"acct{b}-{i}") for i in range(5)])
    live: list[int] = []
    route = h.dispatcher._route

    async def routed(row: InboxRow) -> None:
        await route(row)
        live.append(len(h.dispatcher))

    h.dispatcher._route = routed  # type: ignore[method-assign]
    await h.applied(lambda: len(h.dispatcher) == 0)
    assert (await store.counts()).ledger_events == 40
    assert len({r["account"] for r in await store.ledger("main", None)}) == 40
    # reaching 8 ends the turn and passivates; a record adds at most its 5 accounts
    assert len(live) == 8 and max(live) < 8 + 5


async def test_a_turn_the_store_refuses_is_tried_again_and_nothing_is_lost(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.actors.dispatcher.RETRY", 0.05)
    h = Harness(store)
    await h.accept([track(str(i), "u1", "a") for i in range(10)])
    transact = store.transact
    refused: list[int] = []

    def failing(
        script: Callable[[Turn], Any], now: float | None = None, partition: int = 0
    ) -> Any:
        if len(refused) < 2:
            refused.append(1)

            def broken(tx: Turn) -> Any:
                script(tx)
                raise OSError("disk full")

            return transact(broken, now, partition)
        return transact(script, now, partition)

    store.transact = failing  # type: ignore[method-assign]
    await h.applied()
    counts = await store.counts()
    assert len(refused) == 2
    # the refused turns left nothing behind (their writes rolled back): counted once
    assert (counts.ledger_events, counts.outbox, counts.inbox) == (10, 10, 0)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_partitioned_turn_behind_a_backlog_waits_to_fill_for_a_while(
    store: SqliteStore, kind: StoreKind
) -> None:
    # a turn of a partitioned store commits each partition apart: cut at every interval
    # while the worker is behind, it got smaller and dearer an event, turn after turn
    settings = Settings(sources=[SOURCE], store=kind, flush_interval=1.0)
    d = Dispatcher(store, Router(store, {"main": SOURCE}), settings, Metrics(["main"]),
                   Backlog(10**9), lambda source: None)
    assert not d._due(READ_AHEAD)  # nothing held
    d._started = time.monotonic() - 1.5
    assert d._due(READ_AHEAD - 1)  # the last read was short: caught up, the interval holds
    assert d._due(0)
    # the last read brought all it asked for: more is ready
    assert d._due(READ_AHEAD) is (kind == "sqlite")
    d._started = time.monotonic() - BEHIND * 1.0
    assert d._due(READ_AHEAD)  # but not for ever


async def test_the_tail_of_a_backlog_commits_when_the_inbox_runs_dry(store: SqliteStore) -> None:
    # the last turn of a backlog waited for `flush_interval` with the worker idle (most of a
    # second of a few seconds' apply): it commits when the reads find the inbox dry
    h = Harness(store)
    h.dispatcher.settings = msgspec.structs.replace(h.settings, flush_interval=60.0)
    for b in range(DRAINED * READ_AHEAD + 20):
        await h.accept([track(f"{b}", f"u{b % 7}", "a")])
    started = time.monotonic()
    await h.applied()  # (20 s at most: the interval alone would hold the turn for 60)
    assert time.monotonic() - started < 20
    assert (await store.counts()).ledger_events == DRAINED * READ_AHEAD + 20
    # a trickle, or a stream that finds the inbox dry between a few full reads, does not;
    # nor a short read (a partitioned store's streams run out one by one): only a read that
    # finds nothing after a backlog, however the backlog's reads fell into turns
    d = h.dispatcher
    for _ in range(DRAINED - 1):
        assert not d._drained(READ_AHEAD)
        assert not d._drained(2)
    assert not d._drained(0)
    for _ in range(DRAINED - 1):
        assert not d._drained(READ_AHEAD)
    assert not d._drained(0)
    for _ in range(DRAINED):
        assert not d._drained(READ_AHEAD)
    assert not d._drained(READ_AHEAD - 1)
    assert d._drained(0)
    assert not d._drained(0)
