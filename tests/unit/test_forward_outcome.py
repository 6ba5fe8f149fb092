from __future__ import annotations

import msgspec

from gateway.forward import Delivered, Outcome, Reject, Retry
from gateway.forward.outcome import BODY_LIMIT, TRUNCATED, reject_body
from gateway.observability.redaction import MASK, Redactor

KEY = "k3y_ABCDEF123456"


def test_redact_every_case_and_longest_first() -> None:
    text = f"Basic {KEY} / {KEY.lower()} / {KEY.upper()}"
    assert Redactor([KEY, f"Basic {KEY}"]).mask(text) == f"{MASK} / {MASK} / {MASK}"


def test_redact_ignores_empty_secrets() -> None:
    assert Redactor(["", "zz"]).mask("abc") == "abc"
    assert Redactor([""]).longest == 0


def test_reject_body_short_complete_is_untouched() -> None:
    assert reject_body(b'{"error":"x"}', Redactor([KEY]), complete=True) == '{"error":"x"}'


def test_reject_body_invalid_utf8_is_replaced_not_raised() -> None:
    assert reject_body(b"bad \xff byte", Redactor(), complete=True) == "bad \ufffd byte"


def test_reject_body_clips_long_complete_body() -> None:
    out = reject_body(b"a" * (BODY_LIMIT + 1), Redactor([KEY]), complete=True)
    assert out == "a" * BODY_LIMIT + TRUNCATED


def test_reject_body_drops_partial_secret_at_end_of_incomplete_read() -> None:
    # The read stopped inside a key: its first half cannot be matched, so the tail goes.
    raw = ("ok " + KEY[:8]).encode()
    out = reject_body(raw, Redactor([KEY]), complete=False)
    assert KEY[:4] not in out
    assert out.endswith(TRUNCATED)


def test_reject_body_secret_shrinking_does_not_pull_a_partial_key_in() -> None:
    # Many long secrets redacted to a short marker shift the text left; a partial
    # key at the end of the read must still not reach the clipped body.
    long_key = "L" * 200 + KEY
    raw = (long_key * 40 + KEY[:10]).encode()
    out = reject_body(raw, Redactor([long_key, KEY]), complete=False)
    assert KEY[:6] not in out


def test_outcomes_round_trip_as_tagged_union() -> None:
    outcomes: list[Outcome] = [
        Delivered(202, 0.01),
        Retry("rate_limited", 429, 3.0, 0.02),
        Reject(400, "bad", 0.03),
    ]
    data = msgspec.json.encode(outcomes)
    assert msgspec.json.decode(data, type=list[Outcome]) == outcomes
