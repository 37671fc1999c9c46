"""Item signals a shard keeps from the events it applies: trending and co-engagement.

Pure Python, no Ray. Trending is each item's decayed engagement; the
co-engagement graph links items a user engaged with close together in time,
top-M neighbours per item. Both use forward decay on event time with one
reference time per shard, so an update is one addition. The recommender pulls
each shard's snapshot (scores decayed to a common "now") and adds them up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from persona.settings import Settings

REBASE_EXPONENT = 200.0
# Items kept in a snapshot's trending list (the long tail adds nothing to rankings).
SNAPSHOT_TRENDING = 5_000


class ItemStats:
    def __init__(self, settings: Settings, positive: dict[str, float]):
        self.trend_rate = math.log(2.0) / (settings.trending_half_life_days * 86_400.0)
        self.pair_rate = math.log(2.0) / (settings.co_engagement_half_life_days * 86_400.0)
        self.fastest_rate = max(self.trend_rate, self.pair_rate)
        self.neighbours = settings.co_engagement_neighbours
        self.window_s = settings.co_engagement_window_s
        # Action -> weight for actions that count as engagement (hide does not).
        self.positive = {a: w for a, w in positive.items() if w > 0}
        self.t0: float | None = None
        self.trending: dict[str, float] = {}
        self.graph: dict[str, dict[str, float]] = {}

    def _rebase(self, ts: float) -> None:
        trend = math.exp(-self.trend_rate * (ts - self.t0))
        pair = math.exp(-self.pair_rate * (ts - self.t0))
        self.trending = {i: s * trend for i, s in self.trending.items()}
        self.graph = {i: {n: w * pair for n, w in nb.items()} for i, nb in self.graph.items()}
        self.t0 = ts

    def observe(self, events: Sequence[Sequence], previous: Sequence[tuple]) -> None:
        """Record one user's events; ``previous`` is the user's recent (ts, item, code)
        sequence before them, so pairs span batch boundaries."""
        positive = self.positive
        ordered = events if len(events) == 1 else sorted(events, key=_event_time)
        # The last three engagements before each event, as (ts, item, ...) tuples.
        context = previous[-3:]
        trending, window, link, exp = self.trending, self.window_s, self._link, math.exp
        for event in ordered:
            weight = positive.get(event[2])
            if weight is None:
                continue
            item, ts = event[1], event[3]
            if self.t0 is None:
                self.t0 = ts
            age = ts - self.t0
            if self.fastest_rate * age > REBASE_EXPONENT:
                self._rebase(ts)
                trending, age = self.trending, 0.0
            exponent = self.trend_rate * age
            trending[item] = trending.get(item, 0.0) + weight * exp(
                exponent if exponent > -745.0 else -745.0
            )
            pair_weight = None
            for before in context:
                other = before[1]
                if other != item and -window <= ts - before[0] <= window:
                    if pair_weight is None:  # most events have no pair: skip the exp
                        exponent = self.pair_rate * age
                        pair_weight = exp(exponent if exponent > -745.0 else -745.0)
                    link(item, other, pair_weight)
                    link(other, item, pair_weight)
            context = (*context[-2:], (ts, item))

    def _link(self, item: str, other: str, weight: float) -> None:
        neighbours = self.graph.get(item)
        if neighbours is None:
            neighbours = self.graph[item] = {}
        neighbours[other] = neighbours.get(other, 0.0) + weight
        # Keep memory bounded: past 2M neighbours, keep the strongest M.
        if len(neighbours) > 2 * self.neighbours:
            strongest = sorted(neighbours.items(), key=lambda kv: -kv[1])[: self.neighbours]
            self.graph[item] = dict(strongest)

    def state(self) -> dict:
        """Everything needed to restore (persisted with the shard's checkpoint)."""
        return {"t0": self.t0, "trending": self.trending, "graph": self.graph}

    def restore(self, state: dict | None) -> None:
        if state:
            self.t0, self.trending, self.graph = state["t0"], state["trending"], state["graph"]

    def snapshot(self, now: float) -> dict:
        """Trending (top items) and top-M neighbours, decayed to ``now``."""
        if self.t0 is None:
            return {"trending": {}, "graph": {}}
        trend = math.exp(max(-745.0, -self.trend_rate * (now - self.t0)))
        pair = math.exp(max(-745.0, -self.pair_rate * (now - self.t0)))
        top = sorted(self.trending.items(), key=lambda kv: -kv[1])[:SNAPSHOT_TRENDING]
        return {
            "trending": {i: s * trend for i, s in top},
            "graph": {
                i: dict(
                    (n, w * pair)
                    for n, w in sorted(nb.items(), key=lambda kv: -kv[1])[: self.neighbours]
                )
                for i, nb in self.graph.items()
            },
        }


def _event_time(event: Sequence) -> float:
    return event[3]


def merge_snapshots(snapshots: Iterable[dict]) -> dict:
    """Add shard snapshots taken at the same ``now``."""
    trending: dict[str, float] = {}
    graph: dict[str, dict[str, float]] = {}
    for snap in snapshots:
        for item, score in snap["trending"].items():
            trending[item] = trending.get(item, 0.0) + score
        for item, neighbours in snap["graph"].items():
            merged = graph.setdefault(item, {})
            for other, weight in neighbours.items():
                merged[other] = merged.get(other, 0.0) + weight
    return {"trending": trending, "graph": graph}
