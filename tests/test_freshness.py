"""Freshness: the bucketed delay histogram and its percentiles (pure), and a shard
reporting the delays of the batches it applied (real Ray)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from actors.freshness import (
    BOUNDS_S,
    EXPORT_BOUNDS_S,
    DelayHistogram,
    Freshness,
    RecentDelays,
    quantile,
)


def _bucket_of(delay: float) -> tuple[float, float]:
    """The fine bucket (lower, upper] a delay falls in."""
    upper = next(b for b in BOUNDS_S if delay <= b)
    at = BOUNDS_S.index(upper)
    return (0.0 if at == 0 else BOUNDS_S[at - 1]), upper


def test_percentiles_fall_in_the_bucket_of_the_true_percentile():
    rng = np.random.default_rng(7)
    delays = rng.lognormal(mean=1.0, sigma=2.0, size=20_000)
    histogram = DelayHistogram()
    for chunk in np.array_split(delays, 40):  # batch by batch, as a shard records
        histogram.add(chunk)
    assert histogram.count == len(delays)
    for q in (0.5, 0.9, 0.99):
        lower, upper = _bucket_of(float(np.quantile(delays, q)))
        assert lower <= histogram.quantile(q) <= upper


def test_one_delay_reads_back_within_its_bucket_and_never_above_it():
    histogram = DelayHistogram()
    histogram.add(np.full(10, 3600.0))
    lower, _upper = _bucket_of(3600.0)
    for q in (0.01, 0.5, 0.99, 1.0):
        assert lower <= histogram.quantile(q) <= 3600.0


def test_a_delay_on_a_bound_is_in_that_bucket():
    histogram = DelayHistogram()
    histogram.add(np.array([1.0, 2.0]))
    exported = dict(histogram.exported())
    assert exported["1"] == 1 and exported["2"] == 2


def test_future_event_times_count_as_no_delay():
    histogram = DelayHistogram()
    histogram.add(np.array([-30.0, -0.5]))
    assert histogram.count == 2
    assert histogram.quantile(0.99) <= BOUNDS_S[0]
    assert histogram.total_s == 0.0


def test_delays_beyond_the_last_bound_read_as_the_largest_seen():
    histogram = DelayHistogram()
    histogram.add(np.array([1.0, 5e9, 6e9]))
    assert histogram.quantile(0.99) == 6e9
    assert dict(histogram.exported())["+Inf"] == 3


def test_nothing_counted_has_no_percentile():
    assert DelayHistogram().quantile(0.5) is None
    assert quantile(np.zeros(len(BOUNDS_S) + 1, np.int64), 0.99, 0.0) is None


def test_exported_buckets_are_cumulative_and_end_with_the_count():
    histogram = DelayHistogram()
    histogram.add(np.array([0.003, 0.04, 0.3, 7.0, 90.0, 4e5, 1e9]))
    histogram.add_repeated(0.15, 5)
    exported = histogram.exported()
    assert [le for le, _ in exported] == [f"{b:g}" for b in EXPORT_BOUNDS_S] + ["+Inf"]
    counts = [c for _, c in exported]
    assert counts == sorted(counts)
    assert counts[-1] == histogram.count == 12
    assert dict(exported)["0.2"] == 7  # 0.003, 0.04, five of 0.15
    assert histogram.total_s == pytest.approx(0.003 + 0.04 + 0.3 + 7 + 90 + 4e5 + 1e9 + 0.75)


def test_repeated_delay_counts_like_as_many_single_ones():
    one_by_one, repeated = DelayHistogram(), DelayHistogram()
    one_by_one.add(np.full(250, 0.42))
    repeated.add_repeated(0.42, 250)
    assert np.array_equal(one_by_one.counts, repeated.counts)
    assert one_by_one.total_s == pytest.approx(repeated.total_s)


def test_recent_window_forgets_what_is_older_than_the_window():
    recent = RecentDelays(window_s=60.0, slots=6)
    recent.add(np.full(100, 500.0), now=1000.0)
    recent.add(np.full(10, 2.0), now=1035.0)
    assert recent.merged(1035.0).count == 110
    assert recent.merged(1055.0).count == 110  # 1000 is still within the last 60 s
    assert recent.merged(1065.0).count == 10
    assert recent.merged(1100.0).count == 0
    # A slot reused by a later lap of the ring starts empty.
    recent.add(np.full(3, 1.0), now=1060.0)
    assert recent.merged(1060.0).count == 13


def test_freshness_records_event_and_arrival_delays_per_batch():
    freshness = Freshness(window_s=300.0)
    applied_at = 1_700_000_000.0
    events = [(f"u{n}", "i", "click", applied_at - 3600.0, (), 1.0) for n in range(50)]
    freshness.record(events, arrived_at=applied_at - 0.25, applied_at=applied_at, now=10.0)
    summary = freshness.summary(now=11.0)
    assert summary["event"]["events"] == summary["arrival"]["events"] == 50
    assert _bucket_of(3600.0)[0] <= summary["event"]["p50_s"] <= 3600.0
    assert _bucket_of(0.25)[0] <= summary["arrival"]["p99_s"] <= 0.25
    assert freshness.lifetime["event"].count == 50
    # A batch without an arrival time (a sender that did not stamp it) has event delays only.
    freshness.record(events[:5], arrived_at=None, applied_at=applied_at, now=12.0)
    assert freshness.lifetime["event"].count == 55
    assert freshness.lifetime["arrival"].count == 50


# --- a real shard -------------------------------------------------------------------


def test_a_shard_reports_the_delays_of_the_batches_it_applied(fleet):
    """Batches with known event times (an hour and a day old) through the fleet: each
    shard's stats show event delays in those buckets and arrival delays well under them."""
    now = time.time()
    hour_old = [
        {"user_id": f"fresh-{n}", "item_id": "i1", "action": "click", "ts": now - 3600.0}
        for n in range(40)
    ]
    day_old = [
        {"user_id": f"fresh-{n}", "item_id": "i2", "action": "view", "ts": now - 86_400.0}
        for n in range(40, 80)
    ]
    assert fleet.apply("hour-old", hour_old)["applied"] == 40
    assert fleet.apply("day-old", day_old)["applied"] == 40
    stats = fleet.stats()
    assert sum(s["freshness"]["event"]["events"] for s in stats) == 80
    assert sum(s["freshness"]["arrival"]["events"] for s in stats) == 80
    for shard in stats:
        event = shard["freshness"]["event"]
        if not event["events"]:
            continue
        # The median event is an hour or a day old (plus the time the test took).
        assert _bucket_of(3600.0)[0] <= event["p50_s"] <= _bucket_of(86_400.0 + 600)[1]
        assert _bucket_of(86_400.0)[0] <= event["p99_s"] <= _bucket_of(86_400.0 + 600)[1]
        # Arrival to applied is the shard's own work on the batch: far below an hour.
        assert shard["freshness"]["arrival"]["p99_s"] < 600.0
