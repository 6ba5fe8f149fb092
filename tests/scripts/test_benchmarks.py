"""Short runs of the benchmarks: each ends with the report it promises, every figure from
a real measurement. No timing is asserted: on a shared machine only the shape is stable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchkit.wrk import have_wrk

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def last_json_line(*argv: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=SCRIPTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_bench_ingest_compares_gateway_with_both_baselines(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_ingest.py"), "--duration", "1", "--warmup", "0",
        "--latency-duration", "1", "--connections", "4", "--bodies", "5",
        "--workdir", str(tmp_path),
    )
    assert s["generator"] == ("wrk" if have_wrk() else "aiohttp")
    assert s["duration_s"] == 1 and s["connections"] == 4 and s["batch_events"] == 100
    for target in ("noop", "noop_lean", "naive", "gateway"):
        assert s[f"{target}_events_per_s"] > 0, target
        assert s.get(f"{target}_errors") is None, s.get(f"{target}_errors")
    # relative: the ratios come from unrounded rates, the rates are reported to 0.1 event/s,
    # and a ratio near 100 moves by more than 0.001 with that rounding
    assert s["gateway_vs_noop"] == pytest.approx(
        s["gateway_events_per_s"] / s["noop_events_per_s"], rel=2e-3, abs=1e-3)
    assert s["gateway_vs_noop_lean"] == pytest.approx(
        s["gateway_events_per_s"] / s["noop_lean_events_per_s"], rel=2e-3, abs=1e-3)
    # which no-op is which is said in the report itself
    assert set(s["baselines"]) == {"noop", "noop_lean"} and "DESIGN" in s["baselines"]["noop"]
    assert s["gateway_vs_naive"] == pytest.approx(
        s["gateway_events_per_s"] / s["naive_events_per_s"], rel=2e-3, abs=1e-3)
    # each server's own CPU per request, and the ratio of requests a core serves
    for target in ("noop", "noop_lean", "gateway"):
        assert s[f"{target}_cpu_us_per_request"] > 0 and 0 < s[f"{target}_core_busy"] <= 1.2
    for name in ("noop", "noop_lean"):
        assert s[f"gateway_vs_{name}_per_core"] == pytest.approx(
            s[f"{name}_cpu_us_per_request"] / s["gateway_cpu_us_per_request"], rel=0.01)
    half = s["half_rate"]
    assert half["events_per_s_target"] == pytest.approx(s["gateway_events_per_s"] / 2, rel=0.01)
    assert half["errors"] == {}
    # the measured run starts once what the warm-up left is applied (or the wait gave up)
    assert half["backlog_start"] == 0 or half["drain_wait_s"] >= 300
    assert half["backlog_after_warmup"] >= 0 and half["backlog_after"] >= 0
    assert s["half_rate_p99_ms"] == half["latency_ms"]["p99"] > 0


def test_bench_ingest_falls_back_to_aiohttp_and_says_so(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_ingest.py"), "--generator", "aiohttp", "--targets", "noop",
        "--duration", "1", "--warmup", "0", "--latency-duration", "0", "--connections", "4",
        "--bodies", "3", "--workdir", str(tmp_path),
    )
    assert s["generator"] == "aiohttp" and s["threads"] is None
    assert s["noop_events_per_s"] > 0
    assert s["gateway_vs_noop"] is None and "half_rate" not in s


def test_bench_forward_drains_everything_and_compares(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_forward.py"), "--calls", "1500", "--concurrency", "8",
        "--accounts", "20", "--users", "200", "--workdir", str(tmp_path),
        "--json", str(tmp_path / "forward.json"),
    )
    assert s["complete"] and s["calls"] == s["expected_calls"] == s["queued_before_drain"]
    assert s["bare_status"] == {"202": s["calls"]}
    assert s["gateway_calls_per_s"] > 0 and s["bare_calls_per_s"] > 0
    assert s["gateway_vs_bare"] == pytest.approx(
        s["gateway_calls_per_s"] / s["bare_calls_per_s"], abs=1e-3)
    assert s["dead_letters"] == 0
    assert json.loads((tmp_path / "forward.json").read_text()) == s


def test_bench_memory_samples_every_phase(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_memory.py"), "--events", "3000", "--accounts", "300",
        "--drain-seconds", "0", "--idle-wait", "10", "--no-progress",
        "--gateway-env", "GATEWAY_ACTOR_IDLE=0.5", "--workdir", str(tmp_path),
    )
    assert s["ingest"]["distinct_accounts"] == 300
    assert s["ingest"]["status"] == {"200": 30}
    assert s["applied"]["ledger"]["events"] > 0
    assert s["idle"]["all_passivated"] and s["idle"]["active_actors"] == 0
    drain = s["drain"]
    assert drain["emptied"] and drain["sent_calls"] == drain["queued_calls"] > 0
    assert drain["calls_per_s"] > 0
    peaks = [s["ingest"]["peak_rss_mb"], s["applied"]["peak_rss_mb"], drain["peak_rss_mb"]]
    assert all(p > 10 for p in peaks)  # a Python process with aiohttp: tens of MB at least
    assert s["peak_rss_mb"] == max(peaks) <= s["vm_hwm_mb"]


def test_bench_apply_windows_say_where_a_long_apply_spends(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_apply.py"), "--modes", "pure", "--stores", "sqlite",
        "--workloads", "track", "--rounds", "1", "--events", "60000", "--windows", "20000",
        "--json", str(tmp_path / "apply.json"),
    )
    [windows] = s["sqlite_track"]["pure"]["windows"]
    assert windows  # a window closes in the turn that reaches its bound: one at least
    assert [w["events"] >= 20000 * (i + 1) for i, w in enumerate(windows)] == [True] * len(windows)
    assert sum(w["window_events"] for w in windows) == windows[-1]["events"] <= 60000
    for w in windows:
        us = w["us_per_event"]
        # the turn runs on the writer's thread; its dedupe inside it; every stage timed
        assert 0 < us["dedupe"] < us["turn"] < us["writer"]
        assert us["dedupe_insert"] > 0 and us["ledger_write"] > 0 and us["outbox"] > 0
        assert us["dispatcher"] > 0
        assert sum(w["dedupe_rows"].values()) == w["events"]  # every key unique, stored
        assert 0 < w["ledger_rows"] == w["outbox_rows"]
    assert json.loads((tmp_path / "apply.json").read_text()) == s


def test_bench_apply_older_days_fill_the_store_s_tables_before_the_clock(tmp_path: Path) -> None:
    from gateway.store.sqlite import _Dedupe

    keys = _Dedupe.MERGE + 3  # a day's merged keys in its large table, 3 left in the small one
    s = last_json_line(
        str(SCRIPTS / "bench_apply.py"), "--modes", "pure", "--stores", "sqlite",
        "--workloads", "track", "--rounds", "1", "--events", "20000", "--windows", "10000",
        "--older-days", "2", "--older-keys", str(keys),
    )
    assert (s["older_days"], s["older_keys"]) == (2, keys)
    run = s["sqlite_track"]["pure"]
    tables = run["older_tables"]
    days = sorted({t[7:15] for t in tables}, reverse=True)
    assert len(days) == 2 and run["older_fill_s"][0] >= 0
    for day in days:
        assert tables[f"dedupe_{day}"] == _Dedupe.MERGE and tables[f"dedupe_{day}_new"] == 3
    [windows] = run["windows"]
    for w in windows:
        rows = w["dedupe_rows"]
        today = {t: n for t, n in rows.items() if t[7:15] not in days}
        # the older days are left as filled (their keys are other than the apply's), every
        # key of the apply is stored under today, after the older days
        assert {t: rows[t] for t in tables} == tables
        assert sum(today.values()) == w["events"] and min(today)[7:15] > days[0]


def test_bench_apply_older_days_run_side_by_side_for_each_number_of_days() -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_apply.py"), "--modes", "pure", "--stores", "sqlite",
        "--workloads", "track", "--rounds", "1", "--events", "2000",
        "--older-days", "0,2", "--older-keys", "700",
    )
    assert (s["older_days"], s["older_keys"]) == ([0, 2], 700)
    none, two = s["sqlite_track_older0"]["pure"], s["sqlite_track_older2"]["pure"]
    assert "older_tables" not in none and none["cpu_us_per_event"]["min"] > 0
    # the parent's fill, copied into the pass: two days of 700 keys
    assert sum(two["older_tables"].values()) == 1400 and two["cpu_us_per_event"]["min"] > 0


def test_bench_apply_older_days_need_the_sqlite_store() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_apply.py"), "--stores", "core",
                           "--older-days", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--older-days takes --stores sqlite" in proc.stderr


def test_bench_forward_capacity_scenario_reports_every_phase(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_forward.py"), "--scenario", "capacity",
        "--phases", "200:3,50:2,200:2", "--calls", "1300", "--latency", "0.02",
        "--accounts", "20", "--users", "200", "--workdir", str(tmp_path),
        "--json", str(tmp_path / "capacity.json"),
    )
    assert s["scenario"] == "capacity" and s["latency_s"] == 0.02
    assert [p["capacity_per_s"] for p in s["phases"]] == [200.0, 50.0, 200.0]
    # every event counted by the mock exactly once, whatever the pace
    assert s["complete"] and s["lost"] == 0 and s["doubled"] == 0
    assert s["counted"] == s["expected_calls"] == s["queued_before_drain"] == s["accepted_calls"]
    assert s["other_answers"] == 0, s["other_replies"]
    assert s["dead_letters"] == 0
    first = s["phases"][0]
    assert first["accepted"] > 0 and s["drain_calls_per_s"] == first["accepted_per_s"]
    assert s["drain_vs_capacity"] == pytest.approx(first["accepted_per_s"] / 200.0, abs=1e-3)
    # the phases end when the last one does; 429s of the rest of the drain come on top
    assert s["answered_429"] >= sum(p["answered_429"] for p in s["phases"])
    assert 0.0 <= s["share_429"] <= 1.0
    assert len(s["converged_after_s"]) == 2
    assert s["timeline"] and s["limit_samples"]
    assert s["gateway_forwarding"]["max_concurrency"] is None  # default pacing: no cap
    assert isinstance(s["meets_targets"], bool)
    assert json.loads((tmp_path / "capacity.json").read_text()) == s


def test_bench_sustained_waits_for_every_acknowledged_event_in_the_ledger(tmp_path: Path) -> None:
    s = last_json_line(
        str(SCRIPTS / "bench_sustained.py"), "--duration", "1", "--connections", "2",
        "--batch-size", "10", "--bodies", "5", "--accounts", "20", "--users", "200",
        "--workdir", str(tmp_path), timeout=300,
    )
    gw = s["gateway"]
    assert gw["errors"] == {}
    assert gw["acknowledged_events"] > 0
    # the ledger holds what wrk counted, and the requests on the wire when it stopped
    assert gw["ledger_events"] >= gw["acknowledged_events"]
    assert gw["first_ack_to_last_applied_s"] >= gw["burst_seconds"]
    assert gw["sustained_events_per_s"] == pytest.approx(
        gw["ledger_events"] / gw["first_ack_to_last_applied_s"], rel=0.02)
    assert gw["worker_cpu_us_per_event"] is not None and gw["worker_cpu_us_per_event"] > 0
    assert gw["peak_rss_mb"] >= gw["rss_start_mb"] > 0
    assert s["sustained_vs_noop"] == pytest.approx(
        gw["sustained_events_per_s"] / s["noop_events_per_s"], rel=2e-3, abs=1e-3)


def test_bench_sustained_store_redis_runs_both_modes_side_by_side(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed: `bash scripts/ensure_redis.sh` installs it")
    s = last_json_line(
        str(SCRIPTS / "bench_sustained.py"), "--store", "redis", "--duration", "1",
        "--connections", "2", "--batch-size", "10", "--bodies", "5", "--accounts", "20",
        "--users", "200", "--workdir", str(tmp_path), timeout=300,
    )
    sqlite, redis = s["gateway"], s["redis_gateway"]
    for gw in (sqlite, redis):
        assert gw["errors"] == {} and gw["acknowledged_events"] > 0
        assert gw["ledger_events"] >= gw["acknowledged_events"]
    assert s["redis_sustained_vs_sqlite"] == pytest.approx(
        redis["sustained_events_per_s"] / sqlite["sustained_events_per_s"], rel=2e-3, abs=1e-3)
    figures = redis["redis"]
    assert figures["appendfsync"] == "everysec"
    # every applied event went through Redis: at least its XADD share and its commit
    assert figures["commands"] > 0 and figures["commands_per_event"] > 0.1
    assert figures["cpu_us_per_event"] > 0 and figures["net_in_bytes_per_event"] > 50
    # by command: each part of a request is an XADD (inside ingest's script), each
    # partition turn a commit script
    assert figures["calls_per_event"]["xadd"] > 0 and figures["calls_per_event"]["evalsha"] > 0
    # how the worker read and committed, from its own counters
    pipeline = redis["pipeline"]
    assert pipeline["reads"] > 0 and pipeline["entries_per_read"] >= 1
    assert pipeline["commits"] > 0
    assert pipeline["events_per_commit"] == pytest.approx(
        redis["ledger_events"] / pipeline["commits"], rel=2e-3, abs=0.1)
    assert pipeline["partitions_owned"][1] == 64  # every partition held at the end
    for gw in (sqlite, redis):
        assert 0 <= gw["applied_in_burst"] <= gw["ledger_events"]
        assert set(gw["worker_cpu_us_per_event_by_phase"]) == {"burst", "apply"}
        assert gw["hwm_mb"]["front"] > 0 and gw["hwm_mb"]["worker"] > 0
        # the ledger read at least after the burst and once the inbox looked drained
        assert gw["stats_polls"] >= 2 and gw["stats_cost"]["wall_ms"] > 0
        for phase in ("burst", "apply"):
            shares = gw["cpu_share"][phase]
            assert set(shares) >= {"front", "worker"} and all(v >= 0 for v in shares.values())
    # the front took the burst's requests; Redis's share is measured in Redis mode only
    assert redis["cpu_share"]["burst"]["front"] > 0 and "redis" in redis["cpu_share"]["burst"]
    assert "redis" not in sqlite["cpu_share"]["burst"]
    # what Redis forked for and when, and the apply's timeline from the backlog file
    watch = redis["watch"]
    assert set(watch["phases"]) == {"burst", "apply"}
    for phase in watch["phases"].values():
        assert phase["forks"] >= phase["aof_rewrites"] + phase["rdb_saves"] >= 0
    assert watch["timeline_columns"][:3] == ["t", "accepted", "applied"]
    last = watch["timeline"][-1]
    assert last[1] >= redis["acknowledged_events"] and last[2] == last[1]


def test_bench_decode_times_each_decode_against_a_baseline() -> None:
    # this tree's module against itself as the baseline: both count the same messages
    segment = str(SCRIPTS.parent / "gateway" / "segment.py")
    for decode in ("check", "stored", "batch"):
        s = last_json_line(str(SCRIPTS / "bench_decode.py"), "--decode", decode,
                           "--traffic", "ingest,track,sdk", "--rounds", "2", "--passes", "1",
                           "--bodies", "2", "--baseline", segment)
        assert s["decode"] == decode
        for traffic in ("ingest", "track", "sdk"):
            this, baseline = s[traffic]["this"], s[traffic]["baseline"]
            assert 0 < this["min_ns_per_message"] <= this["median_ns_per_message"]
            assert 0 < baseline["min_ns_per_message"] <= baseline["median_ns_per_message"]
            assert this["median_vs_baseline"] > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_bench_decode_counts_instructions_under_callgrind() -> None:
    s = last_json_line(str(SCRIPTS / "bench_decode.py"), "--decode", "check", "--callgrind",
                       "--traffic", "ingest", "--passes", "1", "--bodies", "2", timeout=300)
    counted = s["callgrind"]["ingest"]["this"]
    # a message of the ingest benchmark's batch costs thousands of instructions to check
    assert 500 < counted["instructions_per_message"] < 100_000
    assert abs(counted["instructions_per_100"] - counted["instructions_per_message"] * 100) <= 5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("redis-server") is None,
                    reason="valgrind or redis-server is not installed")
def test_bench_redis_state_counts_the_apply_s_instructions_under_callgrind() -> None:
    s = last_json_line(str(SCRIPTS / "bench_redis_state.py"), "--track-only", "--callgrind",
                       "--events", "300", "--partitions", "8", timeout=900)
    assert s["measure"] == "callgrind" and s["events"] == [300, 900]
    # an event applied through the dispatcher and a RedisStore: thousands of instructions
    assert 1_000 < s["instructions_per_event"] < 10_000_000
    assert all(us > 0 for us in s["redis_cpu_usec_per_event"])
    assert s["store_file"].endswith("gateway/store/redis/store.py")
