"""The compiled take (gateway/_route.c, `gateway.actors.fast`) against the pure path.

The rule that makes it safe: a record it takes leaves every actor, the dispatcher's registry
and the router's known accounts exactly as the Python path (`_deliver`, then each actor's
`_take`) leaves them; a record it refuses (None) it leaves untouched. Its BLAKE2b is held to
hashlib's, its `user_ids` to `user_id`.
"""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.actors import fast
from gateway.actors.dispatcher import Dispatcher
from gateway.actors.envelope import Envelope
from gateway.actors.router import Router
from gateway.backlog import Backlog
from gateway.config import Api, Settings, Source, UnnamedPages
from gateway.keys import dedupe_key, dedupe_prefix
from gateway.mapping import Call, to_call
from gateway.observability.metrics import Metrics
from gateway.segment import decode_stored, user_id
from gateway.store import InboxRow

needs_module = pytest.mark.skipif(fast.TAKE is None, reason="gateway._route is not built")


def test_the_module_is_built_where_a_compiler_is() -> None:
    # a broken build must fail CI, not fall back to the slow path unnoticed
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert fast.TAKE is not None, "gateway._route did not build: run `make install`"


# --- BLAKE2b and the dedupe key ----------------------------------------------------------


@needs_module
def test_blake2b_matches_hashlib_on_every_length_around_the_blocks() -> None:
    from gateway._route import blake2b_16

    data = bytes(range(256)) * 3
    for n in [*range(0, 300), 383, 384, 385, 511, 512, 513, 767, 768]:
        assert blake2b_16(data[:n]) == hashlib.blake2b(data[:n], digest_size=16).digest(), n
    # RFC 7693's "abc" is for a 64-byte digest; this is hashlib's value for 16 bytes
    assert blake2b_16(b"abc").hex() == "cf4ab791c62b8d2b2109c90275287816"


@needs_module
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700))
def test_blake2b_matches_hashlib(data: bytes) -> None:
    from gateway._route import blake2b_16

    assert blake2b_16(data) == hashlib.blake2b(data, digest_size=16).digest()


@needs_module
@settings(max_examples=200, deadline=None)
@given(source=st.text(max_size=30), message_id=st.text(max_size=200))
def test_the_dedupe_key_is_the_pure_one(source: str, message_id: str) -> None:
    from gateway._route import dedupe_key as compiled

    prefix = dedupe_prefix(source)
    try:
        expected = dedupe_key(prefix, message_id)
    except UnicodeEncodeError:  # a lone surrogate: neither encodes it
        with pytest.raises(UnicodeEncodeError):
            compiled(prefix, message_id)
        return
    assert compiled(prefix, message_id) == expected


# --- generated records -------------------------------------------------------------------

USERS = ["u1", "u2", "u3", 7, "", None]
IDS = ["m1", "m2", "m3", "m4", "m5", "é-✓", "", None]
# equal times, two UTC days, a day's edges, an offset, a naive time, none
TIMES = ["2026-11-20T10:00:00.000Z", "2026-11-20T10:00:00.000Z", "2026-11-20T23:59:59.999Z",
         "2026-11-21T00:00:00Z", "2026-11-21T08:30:00Z", "2026-11-21T01:00:00+02:00",
         "2026-11-20T10:00:00", None]
GROUPS = ["g1", "g2", 5, None, True, "", {"x": 1}]
CONTEXTS = st.one_of(
    st.none(), st.just({}), st.just({"ip": "1.2.3.4"}),
    st.builds(lambda g: {"groupId": g}, st.sampled_from(GROUPS)),
    st.builds(lambda g: {"groupId": g, "traits": {"plan": "pro"}}, st.sampled_from(GROUPS)),
)
INTEGRATIONS = st.sampled_from([{"Accoil": False}, {"All": True}, {"Accoil": True}])


def _maybe(draw: st.DrawFn, msg: dict[str, Any], field: str, values: list[Any]) -> None:
    value = draw(st.sampled_from(values))
    if value is not None:
        msg[field] = value


@st.composite
def messages(draw: st.DrawFn, plain: bool) -> dict[str, Any]:
    """A message; `plain`: a track, page or screen call mostly as the kernel takes it."""
    kinds = ["track"] * 5 + ["page", "screen", "identify", "group", "alias"]
    kind = draw(st.sampled_from(kinds[:7] if plain and draw(st.integers(0, 5)) else kinds))
    msg: dict[str, Any] = {"type": kind}
    odd = not plain or draw(st.integers(0, 9)) == 0
    _maybe(draw, msg, "userId", USERS if odd else USERS[:3])
    if "userId" not in msg or draw(st.integers(0, 3)) == 0:
        msg["anonymousId"] = "anon-1"
    _maybe(draw, msg, "messageId", IDS if odd else IDS[:6])
    _maybe(draw, msg, "timestamp", TIMES if odd else TIMES[:5])
    if odd and draw(st.integers(0, 5)) == 0:
        msg["originalTimestamp"] = "2026-11-20T09:00:00Z"
        msg["sentAt"] = "2026-11-20T09:00:05Z"
    context = draw(CONTEXTS)
    if context is not None:
        msg["context"] = context
    if odd and draw(st.integers(0, 7)) == 0:
        msg["integrations"] = draw(INTEGRATIONS)
    if kind == "track":
        msg["event"] = draw(st.sampled_from(["E", "F", "Signed Up"]))
        msg["properties"] = {"plan": "pro"}
    elif kind in ("page", "screen"):
        _maybe(draw, msg, "name", ["Home", "Ünïcode", "  ", "", None] if odd else ["Home", "Ünïcode"])
        props = draw(st.sampled_from([None, {"name": "Named"}, {"name": " "}, {"title": "T"},
                                      {"path": "/p"}, {"name": 3}]))
        if props is not None:
            msg["properties"] = props
    elif kind == "identify":
        msg["traits"] = {"email": "a@b.c"}
    elif kind == "group":
        msg["groupId"] = draw(st.sampled_from(["g1", "g3", 9]))
        msg["traits"] = {"name": "G"}
    else:
        msg["previousId"] = "old"
    return msg


@st.composite
def records(draw: st.DrawFn) -> list[bytes]:
    bodies = []
    for _ in range(draw(st.integers(1, 4))):
        plain = draw(st.booleans())
        top: dict[str, Any] = {"batch": draw(st.lists(messages(plain), max_size=10))}
        if not plain and draw(st.integers(0, 3)) == 0:
            top["context"] = {"groupId": "g-batch"}
        if not plain and draw(st.integers(0, 3)) == 0:
            top["integrations"] = draw(INTEGRATIONS)
        if draw(st.integers(0, 5)) == 0:
            top["sentAt"] = "2026-11-20T09:00:10Z"
        bodies.append(msgspec.json.encode(top))
    return bodies


class Accounts:
    """What the router and the dispatcher ask of a store here: users' known accounts."""

    def __init__(self) -> None:
        self.known = {"u2": "g-known", "u3": None}

    async def accounts_of(self, source: str, users: list[str]) -> dict[str, str]:
        return {u: a for u in users if (a := self.known.get(u)) is not None}

    def take(self, row_id: int, count: int) -> None:
        return None


def _dispatcher(source: Source, compiled: bool, taken: list[bool]) -> Dispatcher:
    store: Any = Accounts()
    d = Dispatcher(store, Router(store, {source.id: source}), Settings(sources=[source]),
                   Metrics([source.id]), Backlog(10**9), lambda s: None)
    if compiled:
        take = d._compiled
        assert take is not None

        def counting(*args: Any) -> list[int] | None:
            left = take(*args)  # type: ignore[arg-type]
            taken.append(left is not None)
            return left

        d._compiled = counting  # type: ignore[assignment]
    else:
        d._compiled = None
    return d


def _state(d: Dispatcher) -> dict[str, Any]:
    """Everything the record's routing left: per live actor its state, the dispatcher's
    bookkeeping, the router's known accounts."""
    actors: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, a in d._live.items():
        hits = {}
        for short, (ledger_key, latest) in a.hits.items():
            item = latest.item
            msg = item.message if isinstance(item, Envelope) else item
            hits[short] = (ledger_key, latest.count, latest.at, msg, item.context)
        actors[key] = {
            "held": a.held, "last": a.last, "partition": a.partition, "mail": list(a.mail),
            "hit_keys": list(a.hit_keys), "hit_refs": list(a.hit_refs), "hits": hits,
            "marks": list(a.marks), "accounts": list(a.accounts), "dead": list(a.dead),
            "pending": {k: (p.kind, p.path, p.body, p.ts, p.traits)
                        for k, p in a.pending.items()},
        }
        tallies = actors[key]["tallies"] = {k: (t.timestamp, t.path, t.body, t.count)
                                            for k, t in a.tallies().items()}
        for ledger_key, count, at, msg, context in hits.values():
            # the tally's call is `to_call`'s for its latest message
            call = to_call(msg, api=a.source.api, timestamp=at, context=context,
                           unnamed_pages=a.source.unnamed_pages)
            assert isinstance(call, Call)
            assert tallies[ledger_key] == (
                call.body["timestamp"], call.path, call.body, count)
    flushes = {p: (f.dead, f.inbox, f.messages) for p, f in d._flushes.items()}
    return {"actors": actors, "holding": sorted(id_of(a) for a in d._holding),
            "ready": len(d._ready), "flushes": flushes, "pending": d._pending,
            "known": d.router._users}


def id_of(actor: Any) -> tuple[str, str, int]:
    return (actor.source.id, actor.account, actor.partition)


def _count(body: bytes) -> int:
    try:
        stored = decode_stored(body)
    except Exception:
        return 1
    return len(stored.messages) + len(stored.rejected)


async def _both(
    bodies: list[bytes], unnamed: UnnamedPages = "skip", api: Api = "v2"
) -> list[bool]:
    source = Source(write_key="wk_test_1", accoil_api_key="key_test_1", name="main",
                    unnamed_pages=unnamed, api=api)
    taken: list[bool] = []
    compiled = _dispatcher(source, True, taken)
    pure = _dispatcher(source, False, [])
    # the clock `_route` sets is time.monotonic(): pinned by routing row by row alike
    await _route_pinned(compiled, bodies)
    await _route_pinned(pure, bodies)
    assert _state(compiled) == _state(pure)
    return taken


async def _route_pinned(d: Dispatcher, bodies: list[bytes]) -> None:
    rows = [InboxRow(i + 1, "main", 1_764_000_000.0 + i, body, _count(body))
            for i, body in enumerate(bodies)]
    await d.router.prepare(rows)
    for row in rows:
        await d._route(row)
    for actor in d._live.values():
        actor.last = 0.0  # when it was routed: the machine's clock, not the state's


TRACKS = [msgspec.json.encode({"batch": [
    {"type": "track", "messageId": f"m{i}", "userId": f"u{i % 3}", "event": "E",
     "timestamp": TIMES[i % 5], "context": {"groupId": f"g{i % 2}"}} for i in range(8)]})]


@needs_module
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=records(), unnamed=st.sampled_from(["skip", "title", "path"]),
       api=st.sampled_from(["v2", "segment"]))
@example(bodies=TRACKS, unnamed="skip", api="v2")
async def test_a_taken_record_leaves_the_state_the_pure_path_leaves(
    bodies: list[bytes], unnamed: UnnamedPages, api: Api
) -> None:
    await _both(bodies, unnamed, api)


def _body(*batch: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"batch": list(batch)})


def _track(mid: str, user: Any = "u1", **more: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": mid, "userId": user, "event": "E",
            "timestamp": "2026-11-20T10:00:00Z", **more}


@needs_module
@pytest.mark.parametrize(("batch", "taken"), [
    # the common record: taken, its accounts from the context, the known one, the user
    ([_track("1", context={"groupId": "g1"}), _track("2", "u2"), _track("3", "u9")], True),
    ([_track("1"), {"type": "page", "messageId": "2", "userId": "u1", "name": "Home",
                    "timestamp": "2026-11-21T10:00:00Z"}], True),
    # identify and alias are left to Python, the hits taken
    ([_track("1"), {"type": "identify", "messageId": "2", "userId": "u1"},
      {"type": "alias", "messageId": "3", "userId": "u1", "previousId": "x"}], True),
    # a group call with hits that have their own group: taken
    ([{"type": "group", "messageId": "1", "userId": "u1", "groupId": "g7"},
      _track("2", context={"groupId": "g1"})], True),
    # refused: a group call may move a user whose hit has no group of its own
    ([{"type": "group", "messageId": "1", "userId": "u1", "groupId": "g7"}, _track("2")],
     False),
    ([_track("1"), _track("2", integrations={"Accoil": False})], False),  # integrations
    ([_track("1"), _track("2", 7)], False),  # an integer userId
    ([_track("1"), {**_track("2"), "timestamp": "2026-11-20T10:00:00+01:00"}], False),
    ([_track("1"), {k: v for k, v in _track("2").items() if k != "timestamp"}], False),
    ([_track("1"), {k: v for k, v in _track("2").items() if k != "messageId"}], False),
    ([{"type": "page", "messageId": "1", "userId": "u1", "timestamp": "2026-11-20T10:00:00Z",
       "properties": {"title": "T"}}], False),  # a view named by `unnamed_pages`, or not
    ([{k: v for k, v in _track("1").items() if k != "userId"} | {"anonymousId": "a"}], False),
])
async def test_what_the_kernel_takes_and_refuses(batch: list[dict[str, Any]], taken: bool) -> None:
    assert await _both([_body(*batch)]) == [taken]


@needs_module
async def test_a_record_with_batch_context_or_integrations_goes_to_python() -> None:
    for top in ({"context": {"groupId": "g"}}, {"integrations": {"All": True}}):
        body = msgspec.json.encode({"batch": [_track("1")], **top})
        assert await _both([body]) == []


@needs_module
def test_user_ids_is_user_id() -> None:
    body = _body(_track("1"), _track("2", 7), _track("3", "", anonymousId="a"),
                 {"type": "identify", "messageId": "5", "anonymousId": "a"})
    stored = decode_stored(body).messages
    assert fast.user_ids(stored) == [user_id(m) for m in stored] == ["u1", "7", None, None]
