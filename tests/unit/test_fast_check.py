"""The compiled check of the common batch (gateway/_check.c) against the pure `check_batch`.

The rule that makes the accelerator safe: whenever `fast_check` takes a body (returns a
count n), the pure path returns exactly `Checked(n, n, [], None, body)`, and so does
`decode_batch`. It may refuse (None) anything. The bodies below are written as JSON text,
not encoded from values, so that they hold what an encoder never writes: escapes of every
kind, odd whitespace, number forms, datetimes near their limits, bad UTF-8, truncations.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import segment
from gateway.segment import MAX_BATCH, MAX_MESSAGE_BYTES, Checked, InvalidBody

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchkit.traffic import DEFAULT_MIX, Traffic, parse_mix  # noqa: E402

fast_check = segment._fast_check


@contextmanager
def pure() -> Iterator[None]:
    """`check_batch` without the compiled check, as where it did not build."""
    saved = segment._fast_check
    segment._fast_check = None
    try:
        yield
    finally:
        segment._fast_check = saved


def verdict(body: bytes) -> Checked | str:
    try:
        return segment.check_batch(body)
    except InvalidBody as exc:
        return f"InvalidBody: {exc.reason}"


def pure_verdict(body: bytes) -> Checked | str:
    with pure():
        return verdict(body)


def holds(body: bytes) -> int | None:
    """The property: an accept is the pure path's accept, the identical verdict, every
    message valid; with no write key named, the body stored as sent."""
    assert fast_check is not None
    found = fast_check(body)
    n = found[0] if isinstance(found, tuple) else found
    if n is not None:
        keyed = isinstance(found, tuple)
        got = segment.check_batch(body)
        assert isinstance(got, Checked)
        assert got == pure_verdict(body) == segment.decode_batch(body).checked()
        assert (got.count, got.valid, got.rejected) == (n, n, [])
        # a key to strip exactly when the pure path finds one
        assert (got.write_key is not None) is keyed
        if not keyed:
            assert got == Checked(n, n, [], None, body)
    return n


needs_module = pytest.mark.skipif(fast_check is None, reason="gateway._check is not built")


def test_the_module_is_built_where_a_compiler_is() -> None:
    # a broken build must fail CI, not fall back to the slow path unnoticed
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert fast_check is not None, "gateway._check did not build: run `make install`"
    assert segment.COMPILED_CHECK


# --- JSON text, written fragment by fragment ----------------------------------------------

ws = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])
ascii_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
    max_size=12)
GOOD_ESCAPES = ['\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u0041",
                "\\u00e9", "\\u0000", "\\ud83d\\ude00", "\\uD83D\\uDE00", "\\uffff", "\x7f"]
BAD_ESCAPES = ["\\ud800", "\\udc00", "\\ud800x", "\\ud800\\u0041", "\\x", "\\u12", "\\uZZZZ",
               "\x01"]
unicode = st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=1,
                  max_size=4)


def quoted(body: str) -> str:
    return f'"{body}"'


def string_of(pieces: st.SearchStrategy[str], min_size: int = 0) -> st.SearchStrategy[str]:
    return st.lists(pieces, min_size=min_size, max_size=5).map(lambda p: quoted("".join(p)))


good_piece = st.one_of(ascii_text, ascii_text, unicode, st.sampled_from(GOOD_ESCAPES))
good_strings = string_of(good_piece)
nonempty = string_of(st.one_of(ascii_text.filter(bool), unicode, st.sampled_from(GOOD_ESCAPES)),
                     min_size=1)
strings = st.one_of(good_strings, good_strings, string_of(
    st.one_of(good_piece, st.sampled_from(BAD_ESCAPES))))
numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["0", "-0", "01", "-01", "1.", ".5", "1e", "1e400", "-1e400", "1E+2",
                     "1e-400", "0.0", "+1", "-", "1" * 18, "1" * 19, "9" * 30, "1.5e5",
                     "123456789012345678", "-123456789012345678", "NaN", "Infinity"]),
)
good_numbers = st.one_of(
    st.integers(-(10**18) + 1, 10**18 - 1).map(str),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e17, max_value=1e17).map(repr),
    st.sampled_from(["-0", "1E+2", "1e400", "-1e-400", "0.0", "1.5e5"]))
literals = st.sampled_from(["null", "true", "false", "null", "true", "false", "nul", "nulll"])


def join_object(pairs: list[tuple[str, str]], space: str) -> str:
    return "{" + space + ",".join(f"{k}{space}:{space}{v}" for k, v in pairs) + space + "}"


def json_values(
    leaves: st.SearchStrategy[str], keys: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """JSON text of arrays and objects nested over `leaves`, objects keyed by `keys`."""
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(st.lists(inner, max_size=3), ws).map(
                lambda t: "[" + t[1] + ",".join(t[0]) + "]"),
            st.tuples(st.lists(st.tuples(keys, inner), max_size=3), ws).map(
                lambda t: join_object(t[0], t[1])),
        ),
        max_leaves=6,
    )


json_text = json_values(st.one_of(literals, numbers, strings), strings)
good_json = json_values(
    st.one_of(st.sampled_from(["null", "true", "false"]), good_numbers, good_strings), good_strings)
objects = st.tuples(st.lists(st.tuples(good_strings, good_json), max_size=3), ws).map(
    lambda t: join_object(t[0], t[1]))
deep = st.integers(1, 40).map(lambda n: '{"a":' * n + "1" + "}" * n)


@st.composite
def odd_datetimes(draw: st.DrawFn) -> str:
    """RFC 3339 and near it: parts in and out of range, leap days, every offset form."""
    year = draw(st.sampled_from([0, 1, 1900, 1999, 2000, 2024, 2026, 2100, 9999]))
    month = draw(st.integers(0, 13))
    day = draw(st.sampled_from([0, 1, 28, 29, 30, 31, 32]))
    hour, minute, second = draw(st.integers(0, 24)), draw(st.integers(0, 60)), draw(
        st.integers(0, 60))
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    fraction = draw(st.sampled_from(["", "", ".", ".1", ".123", ".123456", ".1234567",
                                     ".999999", ".9999999", ".123456789012"]))
    offset = draw(st.sampled_from(["Z", "Z", "z", "", "+00:00", "-00:00", "+01:00", "-23:59",
                                   "+24:00", "+05:60", "+0100", "+01", "Zx"]))
    text = f"{year:04}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}:{second:02}{fraction}{offset}"
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return quoted(text)


@st.composite
def good_datetimes(draw: st.DrawFn) -> str:
    """Valid datetimes as SDKs write them: Z or an offset, 0 to 6 fraction digits."""
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    text = moment.isoformat(timespec=draw(st.sampled_from(["seconds", "milliseconds",
                                                           "microseconds"])))
    offset = draw(st.sampled_from(["Z", "+00:00", "-05:30", "+14:00", ""]))
    return quoted(text + offset)


ids = st.one_of(st.sampled_from(['"u1"', '""', "0", "7", "-0", "1.0", "true", "null"]),
                strings, numbers)
good_ids = st.one_of(nonempty, st.integers(-(10**18) + 1, 10**18 - 1).map(str))
TYPES = ["identify", "group", "track", "page", "screen", "alias"]
# each field: (valid forms, any forms)
FIELDS: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "messageId": (st.one_of(good_strings, st.just("null"), st.just(quoted("é" * 200)),
                            st.just(quoted("\\ud83d\\ude00" * 200))),
                  st.one_of(ids, st.just(quoted("m" * 201)), st.just(quoted("\\u00e9" * 201)))),
    "anonymousId": (st.one_of(good_ids, st.just("null"), st.just('""')), ids),
    "timestamp": (st.one_of(good_datetimes(), st.just("null")), odd_datetimes()),
    "originalTimestamp": (good_datetimes(), odd_datetimes()),
    "sentAt": (good_datetimes(), st.one_of(odd_datetimes(), json_text)),
    "context": (st.one_of(objects, st.just("null")), st.one_of(json_text, deep)),
    "integrations": (objects, json_text),
    "traits": (st.one_of(objects, st.just("null")), json_text),
    "properties": (st.one_of(objects, deep), json_text),
    "groupId": (good_ids, ids),
    "event": (nonempty, ids),
    "previousId": (good_ids, ids),
    "name": (st.one_of(good_strings, st.just("null")), ids),
    "category": (good_strings, ids),
    "writeKey": (st.just("null"), st.sampled_from(['"wk"', "1", '""'])),
    "extra": (good_json, json_text),
}


@st.composite
def messages(draw: st.DrawFn) -> str:
    """A message of the common shape (a userId, no writeKey), its fields in any order,
    now and then one field or its type out of it."""
    odd = draw(st.integers(0, 7)) == 0
    kind = draw(st.sampled_from(TYPES))
    fields: dict[str, str] = {"type": quoted(kind), "userId": draw(good_ids)}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=8)):
        fields[key] = draw(FIELDS[key][0])
    if kind == "group" or (kind == "alias") or (kind == "track"):
        required = {"group": "groupId", "alias": "previousId", "track": "event"}[kind]
        fields.setdefault(required, draw(FIELDS[required][0]))
    if odd:
        key = draw(st.sampled_from(["type", "userId", "escaped", *sorted(FIELDS)]))
        if key == "escaped":  # a field's name spelt with an escape
            fields['"user\\u0049d"'] = draw(st.sampled_from(['"u"', '""', "null"]))
        elif key == "type":
            fields[key] = draw(st.sampled_from(['"Track"', '"tr\\u0061ck"', "1", '"x"']))
        elif key == "userId":
            if draw(st.booleans()):
                del fields[key]
            else:
                fields[key] = draw(ids)
        else:
            fields[key] = draw(FIELDS[key][1])
    pairs = [(k if k.startswith('"') else quoted(k), v) for k, v in fields.items()]
    pairs = draw(st.permutations(pairs))
    if draw(st.integers(0, 29)) == 0:
        pairs = [*pairs, draw(st.sampled_from(pairs))]  # a field twice
    return join_object(list(pairs), draw(ws))


@st.composite
def bodies(draw: st.DrawFn, keyed: bool = False) -> bytes:
    """A batch body; `keyed`: with a write key at the top, as the SDKs send it."""
    space = draw(ws)
    pairs = [('"batch"', "[" + space + ",".join(draw(st.lists(messages(), max_size=5))) + "]")]
    if keyed:
        pairs.append(('"writeKey"', draw(good_strings)))
    extra = {"context": st.one_of(objects, st.just("null"), json_text),
             "integrations": st.one_of(objects, json_text),
             "sentAt": st.one_of(good_datetimes(), odd_datetimes()),
             "writeKey": st.one_of(st.sampled_from(["null", '"wk"', '""', "1"]), strings),
             "extra": st.one_of(good_json, json_text)}
    for key, strategy in extra.items():
        if draw(st.integers(0, 3)) == 0 and not (keyed and key == "writeKey"):
            pairs.append((quoted(key), draw(strategy)))
    body = (draw(ws) + join_object(draw(st.permutations(pairs)), space) + draw(ws)).encode()
    return draw(mutated(body))


JUNK = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\x0c", b"\x00", b"\x80",
        b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf5", b"\xe2\x82", b"x", b"0"]


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """The body, or the body broken in one place: cut short, a byte dropped, one put in."""
    how = draw(st.integers(0, 11))
    if how > 2 or not body:
        return body
    at = draw(st.integers(0, len(body) - 1))
    if how == 0:
        return body[:at]
    if how == 1:
        return body[:at] + body[at + 1:]
    return body[:at] + draw(st.sampled_from(JUNK)) + body[at:]


@needs_module
@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(body=bodies())
@example(body=b'{"batch":[]}')
@example(body=b'{"batch":[{"type":"track","userId":"u","event":"e","writeKey":null}],'
              b'"writeKey":null}')
def test_an_accept_is_the_pure_paths_accept(body: bytes) -> None:
    holds(body)


@needs_module
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(body=bodies(keyed=True))
def test_an_accept_of_a_keyed_batch_is_the_pure_paths_accept(body: bytes) -> None:
    # the key read and the stored body written without it, as the pure path writes it
    holds(body)


# --- what must be taken ------------------------------------------------------------------


def test_the_benchmarks_batches_are_taken() -> None:
    if fast_check is None:
        pytest.skip("gateway._check is not built")
    for accounts, users, mix in ((1000, 10000, parse_mix(DEFAULT_MIX)), (500, 5000, None),
                                 (500, 5000, {"track": 1.0})):
        traffic = Traffic(accounts=accounts, users=users, mix=mix, seed=3)
        for _ in range(5):
            body = traffic.batch(100).body
            assert holds(body) == 100


def sdk_messages() -> list[dict[str, Any]]:
    """Every call as analytics-python builds it (`send=False` returns the message)."""
    from segment.analytics.client import Client

    client = Client("wk", send=False)
    when = datetime(2026, 12, 1, 12, 30, 5, 123456, tzinfo=UTC)
    made = [
        client.identify("u1", {"email": "a@b.c", "plan": "pro", "logins": 3}, timestamp=when),
        client.group("u1", "acct-1", {"name": "Acme", "mrr": 99.5}),
        client.track("u1", "Signed Up", {"plan": "pro", "tags": ["a", "b"], "ok": True},
                     context={"groupId": "acct-1"}, integrations={"Accoil": True}),
        client.page("u1", "Docs", "Home", {"path": "/docs", "title": "Docs — Ünïcode ✓ 😀"}),
        client.screen("u1", "App", "Settings"),
        client.alias("u2", "u1"),
        client.track(12345, "Numbered", anonymous_id="anon-1"),
    ]
    return [msg for ok, msg in made if ok]


def sdk_body(messages: list[dict[str, Any]], *, ensure_ascii: bool) -> bytes:
    """As `segment.analytics.request.post` writes a body: json.dumps, datetimes as isoformat,
    the write key at the top (as @segment/analytics-node does too)."""
    body = {"batch": messages, "sentAt": datetime.now(UTC).isoformat(), "writeKey": "wk_sdk"}
    return json.dumps(body, default=lambda o: o.isoformat(), ensure_ascii=ensure_ascii).encode()


def test_the_sdks_batches_are_taken() -> None:
    if fast_check is None:
        pytest.skip("gateway._check is not built")
    sent = sdk_messages()
    assert len(sent) == 7
    for ensure_ascii in (True, False):
        body = sdk_body(sent, ensure_ascii=ensure_ascii)
        assert holds(body) == 7
        checked = segment.check_batch(body)
        assert checked.write_key == "wk_sdk" and b"wk_sdk" not in checked.body
        # spaces, the fields in another order, no key: still taken
        pretty = json.dumps({"writeKey": None, **json.loads(body)} | {"writeKey": None},
                            indent=2, ensure_ascii=ensure_ascii).encode()
        assert holds(pretty) == 7
        assert segment.check_batch(pretty).body == pretty


@needs_module
@pytest.mark.parametrize(
    "body",
    [
        # left to the pure path: a key to strip, a message it decides one by one, errors
        b'{"batch":[],"writeKey":1}',
        b'{"batch":[],"w\\u0072iteKey":"wk"}',
        b'{"batch":[{"type":"track","userId":"u","event":"e","writeKey":"wk"}]}',
        b'{"batch":[{"type":"track","anonymousId":"a","event":"e"}]}',
        b'{"batch":[{"type":"track","userId":"","event":"e"}]}',
        b'{"batch":[{"type":"track","userId":"u","event":""}]}',
        b'{"batch":[{"type":"track","userId":"u","ev\\u0065nt":"e"}]}',
        b'{"batch":[{"type":"track","userId":"u","event":"e","event":"f"}]}',
        b'{"batch":[{"type":"track","userId":1234567890123456789,"event":"e"}]}',
        b'{"batch":[{"type":"track","userId":"u","event":"e","timestamp":"2021-02-29T00:00:00Z"}]}',
        b'{"batch":[{"type":"track","userId":"u","event":"e","properties":' + b'[' * 40
        + b']' * 40 + b"}]}",
        b'{"batch":[{"type":"track","userId":"u","event":"\\ud800"}]}',
        b'{"batch":[{"type":"track","userId":"u","event":"\xed\xa0\x80"}]}',
        b'{"batch":[]} x',
        b'{"batch":[]}\x0c',
        b"",
        b"[]",
    ],
)
def test_what_it_leaves_to_the_pure_path(body: bytes) -> None:
    assert fast_check is not None
    assert fast_check(body) is None
    assert verdict(body) == pure_verdict(body)


def message_of(size: int, index: int) -> bytes:
    """A valid track message of exactly `size` bytes."""
    head = b'{"type":"track","userId":"u","event":"e","messageId":"m%d","pad":"' % index
    return head + b"x" * (size - len(head) - 2) + b'"}'


@needs_module
def test_the_size_limits() -> None:
    assert fast_check is not None
    # a body over 32 KB of messages under it is taken; a message over it is left to Python
    small = b'{"batch":[' + b",".join(message_of(1000, i) for i in range(40)) + b"]}"
    assert len(small) > MAX_MESSAGE_BYTES
    assert holds(small) == 40
    edge = b'{"batch":[' + message_of(MAX_MESSAGE_BYTES, 0) + b"]}"
    assert holds(edge) == 1
    over = b'{"batch":[' + message_of(MAX_MESSAGE_BYTES + 1, 0) + b"]}"
    assert fast_check(over) is None
    assert pure_verdict(over).rejected[0].index == 0  # type: ignore[union-attr]
    # the batch's length: 2,500 taken, one more left to Python (which refuses it)
    one = b'{"type":"track","userId":"u","event":"e"}'
    assert holds(b'{"batch":[' + b",".join([one] * MAX_BATCH) + b"]}") == MAX_BATCH
    too_many = b'{"batch":[' + b",".join([one] * (MAX_BATCH + 1)) + b"]}"
    assert fast_check(too_many) is None
    assert str(pure_verdict(too_many)).startswith("InvalidBody")


@needs_module
def test_it_takes_only_bytes() -> None:
    assert fast_check is not None
    with pytest.raises(TypeError, match="bytes"):
        fast_check(bytearray(b'{"batch":[]}'))  # type: ignore[arg-type]


@needs_module
@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 19_000), seed=st.integers(0, 3))
def test_every_cut_of_a_real_batch_is_refused(cut: int, seed: int) -> None:
    body = Traffic(accounts=10, users=100, mix=parse_mix(DEFAULT_MIX), seed=seed).batch(90).body
    cut = min(cut, len(body) - 1)
    assert holds(body[:cut]) is None


@needs_module
@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"writeKey":"wk_1","batch":[{"type":"track","userId":"u","event":"e"}]}', "wk_1"),
        (b'{"batch":[{"type":"track","userId":"u","event":"e","writeKey":null}],'
         b'"writeKey":"wk_2","context":{"ip":"1.2.3.4","n":1e400},"sentAt":"2026-12-01T00:00:00Z",'
         b'"extra":[1,2]}', "wk_2"),
        (b'{"batch":[{"type":"track","userId":"u","event":"e","context":{"writeKey":"x"}}],'
         b'"writeKey":"w\\u006b_3"}', "wk_3"),
        # "writeKey" named, but no key to strip: the body stays as sent
        (b'{"batch":[{"type":"page","userId":"u","name":"\\"writeKey\\"","writeKey":null}]}', None),
        (b'{"batch":[{"type":"page","userId":"u","properties":{"writeKey":"x"}}],'
         b'"writeKey":null}', None),
    ],
)
def test_a_key_named_in_the_body_is_read_and_stripped_as_the_pure_path_does(
    body: bytes, key: str | None
) -> None:
    assert holds(body) == 1
    checked = segment.check_batch(body)
    assert checked.write_key == key
    assert (checked.body == body) is (key is None)
    if key is not None:
        assert key.encode() not in checked.body
