"""Freshness: how long events take to reach a profile, as bucketed delay counts (no Ray).

A shard records two delays for every event it applies: from the event's own time,
and from the batch's arrival at the fleet (carried with the batch), to the moment
the batch is applied in memory. A batch costs one vectorised bucketing of its event
times (the arrival delay is one value for the whole batch), never a call per event.

Two views of the same counts:

- ``DelayHistogram``: lifetime counts in fine buckets (1-1.5-2-3-5-7 per decade, so a
  percentile read from them is within about 25% of the true value), summed into the
  coarser 1-2-5 ``EXPORT_BOUNDS_S`` for Prometheus (cumulative ``le`` buckets, a count
  and a sum, the shape ``histogram_quantile`` reads).
- ``RecentDelays``: the same buckets over a sliding window (a ring of slots), which
  is what ``persona status`` summarises as p50/p99: a lifetime percentile would be
  dominated by a shard's history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

# Fine bucket upper bounds in seconds, 1 ms to ~3 years; above the last: the overflow
# bucket, whose percentiles read as the largest delay seen.
BOUNDS_S: tuple[float, ...] = tuple(
    round(m * 10.0**k, 6) for k in range(-3, 9) for m in (1, 1.5, 2, 3, 5, 7)
)[:-5]
# The buckets exported to Prometheus: a subset of BOUNDS_S, so their counts are exact.
EXPORT_BOUNDS_S: tuple[float, ...] = tuple(
    round(m * 10.0**k, 6) for k in range(-2, 6) for m in (1, 2, 5)
)
_BOUNDS = np.asarray(BOUNDS_S)
_EXPORT_INDEX = np.searchsorted(_BOUNDS, np.asarray(EXPORT_BOUNDS_S))
assert np.array_equal(_BOUNDS[_EXPORT_INDEX], np.asarray(EXPORT_BOUNDS_S))

DELAYS = ("event", "arrival")  # event time -> applied; arrival at the fleet -> applied
_TS = itemgetter(3)  # a validated event's time (actors.events.ValidEvent)


def bucket_counts(delays: np.ndarray) -> np.ndarray:
    """Counts per fine bucket (``le`` semantics: a delay equal to a bound is in its
    bucket); negative delays (events stamped ahead of the clock) count as zero."""
    index = np.searchsorted(_BOUNDS, delays, side="left")
    return np.bincount(index, minlength=len(_BOUNDS) + 1)


def quantile(counts: np.ndarray, q: float, largest: float) -> float | None:
    """The ``q`` quantile (0-1) of bucketed delays, interpolated linearly inside its
    bucket (as Prometheus' histogram_quantile does); in the overflow bucket, the
    largest delay seen. None when nothing was counted."""
    total = int(counts.sum())
    if total == 0:
        return None
    rank = max(q, 1e-12) * total
    cumulative = np.cumsum(counts)
    bucket = int(np.searchsorted(cumulative, rank, side="left"))
    bucket = min(bucket, len(counts) - 1)
    if bucket >= len(_BOUNDS):
        return largest
    lower = 0.0 if bucket == 0 else BOUNDS_S[bucket - 1]
    upper = min(BOUNDS_S[bucket], max(largest, lower))
    before = 0 if bucket == 0 else int(cumulative[bucket - 1])
    inside = int(counts[bucket])
    return lower + (upper - lower) * ((rank - before) / inside if inside else 1.0)


@dataclass
class DelayHistogram:
    """Counts of delays per fine bucket, their sum and the largest one."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(BOUNDS_S) + 1, np.int64))
    total_s: float = 0.0
    largest_s: float = 0.0

    def add(self, delays: np.ndarray) -> None:
        if not len(delays):
            return
        clipped = np.maximum(delays, 0.0)
        self.counts += bucket_counts(clipped)
        self.total_s += float(clipped.sum())
        self.largest_s = max(self.largest_s, float(clipped.max()))

    def add_repeated(self, delay: float, times: int) -> None:
        """``times`` events of one delay (a batch's arrival delay): one bucket bump."""
        if times <= 0:
            return
        delay = max(delay, 0.0)
        self.counts[int(np.searchsorted(_BOUNDS, delay, side="left"))] += times
        self.total_s += delay * times
        self.largest_s = max(self.largest_s, delay)

    def merge(self, other: DelayHistogram) -> None:
        self.counts += other.counts
        self.total_s += other.total_s
        self.largest_s = max(self.largest_s, other.largest_s)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q, self.largest_s)

    def exported(self) -> list[tuple[str, int]]:
        """Cumulative counts per export bound as ``(le, count)``, ``+Inf`` last."""
        cumulative = np.cumsum(self.counts)
        return [
            (_le(bound), int(cumulative[i]))
            for bound, i in zip(EXPORT_BOUNDS_S, _EXPORT_INDEX, strict=True)
        ] + [("+Inf", int(cumulative[-1]))]


def _le(bound: float) -> str:
    """A bound as Prometheus prints ``le`` values (``0.01``, ``1``, ``200000``)."""
    return f"{bound:g}" if bound < 1e6 else str(int(bound))


class RecentDelays:
    """Delay histograms over the last ``window_s`` seconds: a ring of ``slots`` slots,
    each holding what was recorded during its ``window_s / slots`` seconds. Times are
    given by the caller (monotonic seconds), so it is exact under test."""

    def __init__(self, window_s: float = 300.0, slots: int = 10):
        self.window_s = window_s
        self.slot_s = window_s / slots
        self._slots: list[tuple[int, DelayHistogram] | None] = [None] * slots

    def _slot(self, now: float) -> DelayHistogram:
        number = math.floor(now / self.slot_s)
        at = number % len(self._slots)
        held = self._slots[at]
        if held is None or held[0] != number:
            held = (number, DelayHistogram())
            self._slots[at] = held
        return held[1]

    def add(self, delays: np.ndarray, now: float) -> None:
        self._slot(now).add(delays)

    def add_repeated(self, delay: float, times: int, now: float) -> None:
        self._slot(now).add_repeated(delay, times)

    def merged(self, now: float) -> DelayHistogram:
        """Everything recorded in the slots of the last ``window_s`` seconds."""
        newest = math.floor(now / self.slot_s)
        merged = DelayHistogram()
        for held in self._slots:
            if held is not None and newest - len(self._slots) < held[0] <= newest:
                merged.merge(held[1])
        return merged


class Freshness:
    """A shard's two delays, lifetime (for export) and recent (for status)."""

    def __init__(self, window_s: float = 300.0):
        self.lifetime = {delay: DelayHistogram() for delay in DELAYS}
        self.recent = {delay: RecentDelays(window_s) for delay in DELAYS}

    def record(
        self,
        events: Sequence[Sequence],
        arrived_at: float | None,
        applied_at: float,
        now: float,
    ) -> None:
        """One applied batch: its events' times and its arrival (both wall-clock
        seconds) against ``applied_at``; ``now`` (monotonic) picks the recent slot."""
        n = len(events)
        if not n:
            return
        times = np.fromiter(map(_TS, events), dtype=np.float64, count=n)
        delays = applied_at - times
        self.lifetime["event"].add(delays)
        self.recent["event"].add(delays, now)
        if arrived_at is not None:
            self.lifetime["arrival"].add_repeated(applied_at - arrived_at, n)
            self.recent["arrival"].add_repeated(applied_at - arrived_at, n, now)

    def summary(self, now: float, quantiles: Iterable[float] = (0.5, 0.99)) -> dict:
        """p50/p99 (seconds) and event counts per delay over the recent window."""
        report: dict = {"window_s": next(iter(self.recent.values())).window_s}
        for delay, recent in self.recent.items():
            merged = recent.merged(now)
            report[delay] = {
                "events": merged.count,
                **{f"p{round(q * 100):d}_s": merged.quantile(q) for q in quantiles},
            }
        return report
