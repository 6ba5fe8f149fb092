"""Logging redaction and rendering; Prometheus metrics exposition."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Settings, Source
from gateway.observability.logging import (
    Redactor,
    configure_logging,
    is_secret_key,
)
from gateway.observability.metrics import Metrics

WK, AK, STG, TOKEN = "wk_obs_secret_111", "ak_obs_secret_222", "STG_obs_secret_333", "adm_obs_444"


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("logging_reset")


def settings() -> Settings:
    return Settings(
        admin_token=TOKEN,
        sources=[Source(write_key=WK, accoil_api_key=AK), Source(write_key="wk2", accoil_api_key=STG)],
    )


def json_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def assert_clean(text: str) -> None:
    for secret in (WK, AK, STG, TOKEN, STG[4:]):
        assert secret not in text


@pytest.mark.parametrize(
    "key",
    ["api_key", "accoil_api_key", "write_key", "writeKey", "Authorization", "admin_token",
     "password", "token", "x-api-key", "bearer_token", "client_secret", "Set-Cookie"],
)
def test_secret_looking_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["source_id", "account", "event", "userId", "tokens_used", "status"])
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_json_lines_mask_keys_and_values() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", redactor=Redactor.from_settings(settings()), stream=buf)
    log = structlog.get_logger().bind(source_id="src_x", account="acme")
    log.info(
        f"forwarding with {AK}",
        write_key="anything",
        writeKey=WK,
        password=None,
        headers={"Authorization": f"Basic {AK}", "Content-Type": "application/json"},
        calls=[f"retry {WK}", {"api_key": "zzz"}],
        body=f'{{"userId": "u1", "key": "{STG}"}}',
        count=3,
    )
    log.debug("not shown at info")
    text = buf.getvalue()
    assert_clean(text)
    (line,) = json_lines(buf)
    assert line["event"] == "forwarding with ***"
    assert (line["source_id"], line["account"], line["level"]) == ("src_x", "acme", "info")
    assert line["write_key"] == "***" and line["writeKey"] == "***"
    assert line["password"] is None  # nothing to hide
    assert line["headers"] == {"Authorization": "***", "Content-Type": "application/json"}
    assert line["calls"] == ["retry ***", {"api_key": "***"}]
    assert line["body"] == '{"userId": "u1", "key": "***"}'
    assert line["count"] == 3
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]


def test_secret_variants_are_masked() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", redactor=Redactor.from_settings(settings()), stream=buf)
    log = structlog.get_logger()
    basic_wk = base64.b64encode(f"{WK}:".encode()).decode()
    basic_stg = base64.b64encode(f"{STG[4:]}:".encode()).decode()
    raw_stg = base64.b64encode(STG[4:].encode()).decode()
    log.info("sent", header=f"Basic {basic_wk}", upstream=f"{basic_stg} / {raw_stg} / {STG[4:]}")
    text = buf.getvalue()
    for form in (basic_wk, basic_stg, raw_stg):
        assert form not in text
    assert_clean(text)
    (line,) = json_lines(buf)
    assert line["header"] == "Basic ***" and line["upstream"] == "*** / *** / ***"


def test_tracebacks_are_masked() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", redactor=Redactor([AK]), stream=buf)
    try:
        raise ValueError(f"rejected key {AK}")
    except ValueError:
        structlog.get_logger().exception("call failed")
    (line,) = json_lines(buf)
    assert "ValueError: rejected key ***" in line["exception"]
    assert_clean(buf.getvalue())


def test_stdlib_records_go_through_the_same_chain() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", redactor=Redactor([WK]), stream=buf)
    logging.getLogger("aiohttp.access").info("GET /v1/batch %s", WK, extra={"writeKey": WK})
    logging.getLogger("noisy").debug("below the level")
    (line,) = json_lines(buf)
    assert line["event"] == "GET /v1/batch ***"
    assert (line["logger"], line["level"], line["writeKey"]) == ("aiohttp.access", "info", "***")
    assert_clean(buf.getvalue())


def test_console_when_auto_on_a_tty() -> None:
    buf = TtyBuffer()
    configure_logging("auto", "debug", redactor=Redactor([AK]), stream=buf)
    structlog.get_logger().debug("hello", source_id="web", api_key=AK, note=f"k={AK}")
    text = buf.getvalue()
    assert "hello" in text and "source_id" in text and "web" in text
    assert not text.lstrip().startswith("{")
    assert "\x1b[" in text  # colours on a terminal
    assert_clean(text)


def test_auto_is_json_when_not_a_tty() -> None:
    buf = io.StringIO()
    configure_logging("auto", "info", stream=buf)
    structlog.get_logger().info("hello", account="acme")
    (line,) = json_lines(buf)
    assert line["account"] == "acme"


def test_forced_console_without_tty_has_no_colours() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", redactor=Redactor([WK]), stream=buf)
    try:
        raise RuntimeError(f"bad {WK}")
    except RuntimeError:
        structlog.get_logger().exception("oops")
    text = buf.getvalue()
    assert "\x1b[" not in text and "oops" in text and "RuntimeError" in text
    assert_clean(text)


def test_reconfigure_replaces_handler_and_level() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "error", stream=second)
    logging.getLogger("x").warning("dropped")
    structlog.get_logger().warning("dropped too")
    logging.getLogger("x").error("kept")
    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second)] == ["kept"]


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("json", "chatty", stream=io.StringIO())


def test_redactor_without_secrets_changes_nothing() -> None:
    r = Redactor()
    assert r.mask("plain text") == "plain text"
    assert r(None, "info", {"event": "e", "n": 1}) == {"event": "e", "n": 1}


METRIC_NAMES = {
    "accoil_gateway_messages_received": "counter",
    "accoil_gateway_messages_accepted": "counter",
    "accoil_gateway_messages_rejected": "counter",
    "accoil_gateway_messages_deduplicated": "counter",
    "accoil_gateway_messages_coalesced": "counter",
    "accoil_gateway_messages_unsupported": "counter",
    "accoil_gateway_messages_skipped": "counter",
    "accoil_gateway_calls_forwarded": "counter",
    "accoil_gateway_retries": "counter",
    "accoil_gateway_dead_letters": "counter",
    "accoil_gateway_backlog": "gauge",
    "accoil_gateway_inbox_messages": "gauge",
    "accoil_gateway_active_actors": "gauge",
    "accoil_gateway_upstream_latency_seconds": "histogram",
    "accoil_gateway_http_requests": "counter",
    "accoil_gateway_circuit_open": "gauge",
    "accoil_gateway_ready": "gauge",
}


def test_metrics_render_every_name() -> None:
    m = Metrics(sources=["web"])
    m.received.labels(source="web").inc(3)
    m.rejected.labels(source="web", reason="invalid").inc()
    m.coalesced.labels(source="web", kind="track").inc(2)
    m.unsupported.labels(source="web", type="alias").inc()
    m.skipped.labels(source="web", reason="unnamed").inc()
    m.forwarded.labels(source="web", call="track", status="202").inc()
    m.forwarded.labels(source="web", call="identify", status="error").inc()
    m.dead_letters.labels(source="web", stage="forward").inc()
    m.upstream_latency.labels(source="web", call="track").observe(0.03)
    m.requests.labels(route="/v1/batch", status="200").inc()
    m.backlog.set(42)
    m.ready.set(1)
    body, content_type = m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in METRIC_NAMES.items():
        assert families[name].type == kind, name
    assert "# HELP accoil_gateway_backlog Events accepted and not yet forwarded." in text
    assert 'accoil_gateway_messages_received_total{source="web"} 3.0' in text
    assert 'accoil_gateway_messages_rejected_total{reason="invalid",source="web"} 1.0' in text
    assert 'accoil_gateway_calls_forwarded_total{call="identify",source="web",status="error"} 1.0' in text
    assert 'accoil_gateway_upstream_latency_seconds_bucket{call="track",le="0.05",source="web"} 1.0' in text
    assert "accoil_gateway_backlog 42.0" in text
    assert 'accoil_gateway_messages_skipped_total{reason="unnamed",source="web"} 1.0' in text


def test_known_sources_start_at_zero() -> None:
    m = Metrics(sources=["web", "src_abc"])
    text = m.render()[0].decode()
    for source in ("web", "src_abc"):
        assert f'accoil_gateway_messages_accepted_total{{source="{source}"}} 0.0' in text
        assert f'accoil_gateway_circuit_open{{source="{source}"}} 0.0' in text


def test_each_metrics_owns_its_registry() -> None:
    a, b = Metrics(), Metrics()  # a shared default registry would raise "Duplicated timeseries"
    a.ready.set(1)
    assert "accoil_gateway_ready 1.0" in a.render()[0].decode()
    assert "accoil_gateway_ready 0.0" in b.render()[0].decode()


def test_batched_counts_reach_every_reader_of_the_registry() -> None:
    m = Metrics(["web"])
    received = m.child(m.received, "web")
    assert m.child(m.received, "web") is received  # one per family and labels
    received.inc(5)
    m.child(m.requests, "/v1/batch", "200").inc()
    text = m.render()[0].decode()
    assert 'accoil_gateway_messages_received_total{source="web"} 5.0' in text
    assert 'accoil_gateway_http_requests_total{route="/v1/batch",status="200"} 1.0' in text
    received.inc(2)
    # a collection of the registry itself (as a custom exporter would make) sees them too
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.registry.collect() for s in family.samples
    }
    assert samples[("accoil_gateway_messages_received_total", (("source", "web"),))] == 7.0
    assert 'accoil_gateway_messages_received_total{source="web"} 7.0' in m.render()[0].decode()


def test_operations_doc_lists_every_metric() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    for family in Metrics().registry.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{exposed}` | {family.type} |" in doc, exposed
