"""The capacity model's arithmetic (bench/capacity.py): rates from daily users, nodes
rounded up, the first bottleneck, and a missing benchmark figure named, not a traceback."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import capacity
from bench.capacity import ASSUMPTIONS, Costs, MissingFigures, measured_costs, plan

COSTS = Costs(
    shard_us_per_event=20.0,
    router_us_per_event=5.0,
    cassandra_us_per_event=10.0,
    profile_request_ms=1.0,
    recommendation_request_ms=2.0,
    resident_bytes_per_profile=1000.0,
    encode_us_per_profile=5.0,
    cassandra_core_us_per_write=50.0,
    cassandra_core_us_per_read=50.0,
    journal_bytes_per_event=100.0,
    stored_bytes_per_profile=1000.0,
    dedup_bytes_per_entry=50.0,
    exposure_row_bytes=400.0,
)


def assumptions(**changes) -> dict[str, float]:
    return {**{name: a.value for name, a in ASSUMPTIONS.items()}, **changes}


def results_with_every_figure() -> dict:
    store_bytes = {
        "journal_bytes_per_event": 70.0,
        "generated_profile_bytes": 1500.0,
        "dedup_bytes_per_request_entry": 90.0,
        "exposure_row_bytes": 400.0,
    }
    run = {
        "shards": 4,
        "nodes": 4,
        "ingest": {"cpu_us_per_event": {"shards": 18.0}},
        "store_bytes": store_bytes,
    }
    fewer = {"shards": 1, "nodes": 1, "ingest": {"cpu_us_per_event": {"shards": 9.0}}}
    return {
        "machine": {"cpus": 2, "date": "2026-12-01 10:00 UTC"},
        "scaling": {"runs": [fewer, run], "date": "2026-12-01 10:30 UTC", "command": "cluster"},
        "ingest": {
            "cpu_us_per_event_by_process": {"fleet (validation, routing)": 7.0, "cassandra": 9.0},
            "command": "ingest",
        },
        "http": {
            "profile": {"cpu_ms_per_request": 1.2},
            "recommendations": {"cpu_ms_per_request": 2.7},
            "date": "2026-12-01",
        },
        "memory": [
            {"bytes_per_profile": 2800.0, "command": "memory --users 100000"},
            {"bytes_per_profile": 2400.0, "command": "memory --users 3000000"},
        ],
        "checkpoint": {"encode_seconds": 7.0, "profiles": 1_000_000},
        "store": {"store_bench": {"cassandra": {"write_per_s": 20_000.0, "read_per_s": 40_000.0}}},
    }


def test_rates_follow_daily_users_and_the_peak_factor():
    p = plan(864_000, COSTS, assumptions(events_per_user_day=100, peak_to_average=2))
    assert p.values["events/s at peak"] == pytest.approx(2_000)
    # 5 us per event in the router: 2,000 events/s keep 0.01 of a core busy.
    assert p.values["router cores"] == pytest.approx(2_000 * 5.0 / 1e6)
    assert p.values["ingest batches/s"] == pytest.approx(20)


def test_every_rate_and_size_grows_with_daily_users():
    a = assumptions()
    small, large = plan(1_000_000, COSTS, a), plan(10_000_000, COSTS, a)
    for name in ("events/s at peak", "Persona cores", "resident profile memory", "disk: total"):
        assert large.values[name] == pytest.approx(10 * small.values[name])


def test_node_counts_round_up_and_cassandra_has_at_least_rf_nodes():
    p = plan(1_000, COSTS, assumptions())
    assert p.values["Persona nodes"] == 1
    assert p.values["Cassandra nodes"] == 3
    a = assumptions(node_memory_gb=10, memory_target=1.0, node_overhead_gb=0)
    # 25M profiles of 1,000 B = 25 GB on nodes of 10 GB: 2.5 -> 3 nodes.
    p = plan(25_000_000, COSTS, a)
    assert p.values["Persona nodes for memory"] == 3


def test_dedup_entries_count_the_partitions_a_batch_touches():
    assert capacity.expected_distinct(256, 1) == pytest.approx(1)
    assert capacity.expected_distinct(256, 100_000) == pytest.approx(256)
    assert 80 < capacity.expected_distinct(256, 100) < 90


def test_the_first_bottleneck_is_the_limit_asking_for_most_nodes():
    a = assumptions()
    heavy_profiles = dataclasses.replace(COSTS, resident_bytes_per_profile=1e6)
    name, driver = capacity.first_bottleneck(plan(10_000_000, heavy_profiles, a), a)
    assert (name, driver) == ("Persona memory", "resident profiles")
    slow_reads = dataclasses.replace(COSTS, profile_request_ms=500.0, exposure_row_bytes=1)
    name, driver = capacity.first_bottleneck(plan(10_000_000, slow_reads, a), a)
    assert (name, driver) == ("Persona CPU", "serving (HTTP)")


def test_costs_are_read_from_results_with_their_benchmark_and_date():
    costs, sources = measured_costs(results_with_every_figure())
    assert costs.resident_bytes_per_profile == 2400.0  # the largest memory run
    assert costs.encode_us_per_profile == pytest.approx(7.0)
    assert costs.cassandra_core_us_per_write == pytest.approx(2 / 20_000 * 1e6)
    memory = next(s for s in sources if s.figure.startswith("resident"))
    assert memory.bench == "`memory --users 3000000`"
    # Shard CPU at the most shards measured (the smallest parts per shard).
    assert costs.shard_us_per_event == 18.0
    shard = next(s for s in sources if s.figure.startswith("shard"))
    assert shard.date == "2026-12-01 10:30 UTC"


def test_a_missing_figure_is_named_with_the_command_that_measures_it(tmp_path):
    results = results_with_every_figure()
    results["scaling"] = {"error": "exit 1", "command": "cluster"}
    del results["http"]["recommendations"]
    with pytest.raises(MissingFigures) as caught:
        capacity.write_capacity(results, tmp_path / "CAPACITY.md")
    message = str(caught.value)
    assert "GET recommendations" in message and "make bench" in message
    assert "exit 1" in message and "--only scaling" in message
    assert not (tmp_path / "CAPACITY.md").exists()


def test_the_report_shows_each_formula_and_every_assumption(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_with_every_figure()))
    out = tmp_path / "CAPACITY.md"
    assert (
        capacity.main(["--results", str(path), "--out", str(out), "--set", "peak_to_average=2"])
        == 0
    )
    text = out.read_text()
    assert "daily users x events_per_user_day / 86,400 x peak_to_average" in text
    assert all(f"`{name}`" in text for name in ASSUMPTIONS)
    assert "| `peak_to_average` | 2 x |" in text
    assert "100,000,000" in text and "2026-12-01 10:30 UTC" in text


def test_store_bytes_come_from_the_run_that_measured_them_or_its_error_is_named():
    results = results_with_every_figure()
    measured = results["scaling"]["runs"][1]
    failed = {"shards": 4, "nodes": 4, "error": "StoreUnavailable: write timeout"}
    results["scaling"]["runs"] = [measured, failed]
    costs, _ = measured_costs(results)
    assert costs.journal_bytes_per_event == 70.0
    measured.pop("store_bytes")
    measured["store_bytes_error"] = "StoreUnavailable: checkpoint timed out"
    with pytest.raises(MissingFigures, match="checkpoint timed out"):
        measured_costs(results)
