"""Item signals a shard keeps from the events it applies: trending and co-engagement.

Pure Python, no Ray. Trending is each item's decayed engagement; the
co-engagement graph links each engagement of a user to the user's CONTEXT
engagements before it that lie within the window (hides are never engagement, so
they are never paired), top-M neighbours per item. Raw co-counts favour whatever
is popular, so each item also keeps its engagement count with the graph's decay:
the recommender turns co-counts into cosine similarities
``c(i, j) / sqrt(n(i) * n(j))`` once the shards' snapshots are added up, and a
shard's snapshot offers each item's M most similar neighbours by that score. All of it uses
forward decay on event time with one reference time per shard, so an update is
one addition. The recommender pulls each shard's snapshot (decayed to a common
"now") and adds them up.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

import numpy as np

from actors.profile import EXP_FLOOR, REBASE_EXPONENT, ProfileRules
from persona.settings import Settings

# Items kept in a snapshot's trending list (the long tail adds nothing to rankings).
SNAPSHOT_TRENDING = 5_000
# Column-wise updates are buffered and folded into the dicts past this many entries.
PENDING_LIMIT = 500_000
# Bytes of item signals per stored record (see ItemStats.chunks).
SIGNAL_CHUNK_BYTES = 512 * 1024
# Engagements a new one is paired with (the shards keep them per user: the context).
# Three paired only neighbours in the sequence; on MovieLens a context of 20 raised
# validation Recall@10 of the co-engagement source from 0.18 to 0.22 (bench/RESULTS.md).
CONTEXT = 20


class ItemStats:
    def __init__(self, settings: Settings, positive: dict[str, float]):
        self.trend_rate = math.log(2.0) / (settings.trending_half_life_days * 86_400.0)
        self.pair_rate = math.log(2.0) / (settings.co_engagement_half_life_days * 86_400.0)
        self.fastest_rate = max(self.trend_rate, self.pair_rate)
        self.neighbours = settings.co_engagement_neighbours
        self.window_s = settings.co_engagement_window_s
        # Action -> weight for actions that count as engagement (hide does not).
        self.positive = {a: w for a, w in positive.items() if w > 0}
        # Action codes (as profiles store them) that are engagement.
        self.positive_codes = frozenset(
            code
            for code, action in enumerate(ProfileRules.from_settings(settings).actions)
            if action in self.positive
        )
        self.t0: float | None = None
        self.trending: dict[str, float] = {}
        # Engagements per item, decayed like the graph: the norms of its cosine.
        self.counts: dict[str, float] = {}
        self.graph: dict[str, dict[str, float]] = {}
        # Buffered column-wise updates (item ids into ``_names``), relative to self.t0.
        self._names: list[str] = []
        self._pending_trend: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0
        self._code_weights: np.ndarray | None = None
        self._snapshot: tuple[float, dict] | None = None

    def _rebase(self, ts: float) -> None:
        self.flush()
        trend = math.exp(-self.trend_rate * (ts - self.t0))
        pair = math.exp(-self.pair_rate * (ts - self.t0))
        self.trending = {i: s * trend for i, s in self.trending.items()}
        self.counts = {i: s * pair for i, s in self.counts.items()}
        self.graph = {i: {n: w * pair for n, w in nb.items()} for i, nb in self.graph.items()}
        self.t0 = ts

    def observe(self, events: Sequence[Sequence], previous: Sequence[tuple]) -> None:
        """Record one user's events; ``previous`` is the user's recent (ts, item, code)
        sequence before them, so pairs span batch boundaries."""
        self._snapshot = None
        positive, codes = self.positive, self.positive_codes
        ordered = events if len(events) == 1 else sorted(events, key=_event_time)
        # The last CONTEXT engagements before each event, as (ts, item, ...) tuples.
        context = [p for p in previous if p[2] in codes][-CONTEXT:]
        trending, counts, window, link, exp = (
            self.trending, self.counts, self.window_s, self._link, math.exp
        )  # fmt: skip
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
                trending, counts, age = self.trending, self.counts, 0.0
            exponent = self.trend_rate * age
            trending[item] = trending.get(item, 0.0) + weight * exp(
                exponent if exponent > EXP_FLOOR else EXP_FLOOR
            )
            exponent = self.pair_rate * age
            pair_weight = exp(exponent if exponent > EXP_FLOOR else EXP_FLOOR)
            counts[item] = counts.get(item, 0.0) + pair_weight
            for before in context:
                other = before[1]
                if other != item and -window <= ts - before[0] <= window:
                    link(item, other, pair_weight)
                    link(other, item, pair_weight)
            context = [*context, (ts, item)][-CONTEXT:]

    def code_weights(self, rules) -> np.ndarray:
        """Engagement weight per action code (0 for actions that are not engagement)."""
        if self._code_weights is None:
            self._code_weights = np.array(
                [self.positive.get(a, 0.0) for a in rules.actions], dtype=np.float64
            )
        return self._code_weights

    def observe_columns(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ts: np.ndarray,
        weights: np.ndarray,
        context_ts: np.ndarray,
        context_items: np.ndarray,
        names: list[str],
    ) -> None:
        """``observe`` for a whole batch of engagements at once.

        ``users`` index rows of ``context_ts``/``context_items``: each user's last
        entries before the batch, oldest first (item id 0 is an empty entry). Items are ids
        into ``names``. Same pairs as ``observe``: each engagement, in time order per
        user, is linked to the CONTEXT entries before it within the window."""
        self._names = names
        self._snapshot = None
        if self.t0 is None:
            self.t0 = float(ts[0])
        newest = float(ts.max())
        if self.fastest_rate * (newest - self.t0) > REBASE_EXPONENT:
            self._rebase(newest)
        age = ts - self.t0
        trend = weights * np.exp(np.maximum(self.trend_rate * age, EXP_FLOOR))
        count = np.exp(np.maximum(self.pair_rate * age, EXP_FLOOR))
        self._pending_trend.append((items, trend, count))
        sources, targets, ages = [], [], []
        single = np.bincount(users)[users] == 1
        one = np.flatnonzero(single)
        if len(one):  # one engagement in the batch: it pairs with each context entry
            user, item, at = users[one], items[one], ts[one]
            for k in range(context_ts.shape[1]):
                other_ts, other = context_ts[user, k], context_items[user, k]
                linked = (other > 0) & (other != item)  # item id 0: an empty entry
                linked &= np.abs(at - other_ts) <= self.window_s
                sources.append(item[linked])
                targets.append(other[linked])
                ages.append(age[one[linked]])
        many = np.flatnonzero(~single)
        if len(many):
            self._pairs_in_sequence(
                users[many], items[many], ts[many], age[many], context_ts, context_items,
                sources, targets, ages,
            )  # fmt: skip
        source, target = np.concatenate(sources), np.concatenate(targets)
        if len(source):
            pair = np.exp(np.maximum(self.pair_rate * np.concatenate(ages), EXP_FLOOR))
            self._pending_pairs.append((source, target, pair))
            self._pending_pairs.append((target, source, pair))
        self._pending += len(items) + 2 * len(source)
        if self._pending > PENDING_LIMIT:
            self.flush()

    def _pairs_in_sequence(
        self, users, items, ts, age, context_ts, context_items, sources, targets, ages
    ) -> None:
        """Pairs for users with several engagements: their context, then their
        engagements by time, each linked to the CONTEXT entries before it."""
        touched = np.unique(users)
        width = context_ts.shape[1]
        context = np.flatnonzero(context_items[touched].ravel() > 0)
        seq_user = np.concatenate([touched[context // width], users])
        seq_event = np.r_[np.zeros(len(context), dtype=bool), np.ones(len(users), dtype=bool)]
        seq_ts = np.concatenate([context_ts[touched].ravel()[context], ts])
        seq_item = np.concatenate([context_items[touched].ravel()[context], items])
        seq_age = np.concatenate([np.zeros(len(context)), age])
        order = np.lexsort((seq_ts, seq_event, seq_user))
        seq_user, seq_event = seq_user[order], seq_event[order]
        seq_ts, seq_item, seq_age = seq_ts[order], seq_item[order], seq_age[order]
        for lag in range(1, width + 1):
            here = np.arange(lag, len(order))
            there = here - lag
            linked = (
                seq_event[here]
                & (seq_user[here] == seq_user[there])
                & (seq_item[here] != seq_item[there])
                & (np.abs(seq_ts[here] - seq_ts[there]) <= self.window_s)
            )
            sources.append(seq_item[here[linked]])
            targets.append(seq_item[there[linked]])
            ages.append(seq_age[here[linked]])

    def flush(self) -> None:
        """Fold buffered column-wise updates into the trending dict and the graph."""
        if not self._pending:
            return
        names = self._names
        if self._pending_trend:
            items = np.concatenate([i for i, _, _ in self._pending_trend])
            unique, inverse = np.unique(items, return_inverse=True)
            for into, column in ((self.trending, 1), (self.counts, 2)):
                amounts = np.concatenate([entry[column] for entry in self._pending_trend])
                sums = np.bincount(inverse.ravel(), weights=amounts, minlength=len(unique))
                for item, amount in zip(unique.tolist(), sums.tolist(), strict=True):
                    name = names[item]
                    into[name] = into.get(name, 0.0) + amount
        if self._pending_pairs:
            keys = np.concatenate(
                [(s.astype(np.int64) << 32) | t.astype(np.int64) for s, t, _ in self._pending_pairs]
            )
            amounts = np.concatenate([w for _, _, w in self._pending_pairs])
            unique, inverse = np.unique(keys, return_inverse=True)
            sums = np.bincount(inverse.ravel(), weights=amounts, minlength=len(unique))
            link = self._link
            for key, amount in zip(unique.tolist(), sums.tolist(), strict=True):
                link(names[key >> 32], names[key & 0xFFFFFFFF], amount)
        self._pending_trend, self._pending_pairs, self._pending = [], [], 0

    def _link(self, item: str, other: str, weight: float) -> None:
        neighbours = self.graph.get(item)
        if neighbours is None:
            neighbours = self.graph[item] = {}
        neighbours[other] = neighbours.get(other, 0.0) + weight
        # Keep memory bounded: past 2M neighbours, keep the M largest co-counts. Not the
        # most similar: a pair seen once with a rare item has a high cosine and would
        # push out established pairs again and again (trimming by cosine here cost a
        # quarter of validation recall on MovieLens); the snapshot ranks by cosine.
        if len(neighbours) > 2 * self.neighbours:
            strongest = sorted(neighbours.items(), key=lambda kv: -kv[1])[: self.neighbours]
            self.graph[item] = dict(strongest)

    def _most_similar(self, neighbours: dict[str, float]) -> dict[str, float]:
        """The M neighbours of one item with the largest ``c(i, j) / sqrt(n(j))``
        (its cosine, but for the item's own norm, which orders nothing)."""
        counts = self.counts
        ranked = sorted(
            neighbours.items(), key=lambda kv: -kv[1] / math.sqrt(counts.get(kv[0]) or kv[1])
        )
        return dict(ranked[: self.neighbours])

    def state(self) -> dict:
        """Everything needed to restore (persisted with the shard's checkpoint)."""
        self.flush()
        return {
            "t0": self.t0, "trending": self.trending, "counts": self.counts, "graph": self.graph
        }  # fmt: skip

    def restore(self, state: dict | None) -> None:
        self._snapshot = None
        if state:
            self.t0, self.trending, self.graph = state["t0"], state["trending"], state["graph"]
            self.counts = state.get("counts") or _counts_from_graph(self.graph)

    def chunks(self, max_bytes: int = SIGNAL_CHUNK_BYTES) -> list[dict]:
        """The state cut into records of at most about ``max_bytes`` each: a shard's
        signals grow with the catalog, and no single store write may (Cassandra
        refuses a mutation over half a commitlog segment, 16 MiB by default)."""
        self.flush()
        chunks: list[dict] = []
        entries: list[list] = []
        size = 0
        graph, trending, counts = self.graph, self.trending, self.counts
        for item in trending.keys() | graph.keys() | counts.keys():
            neighbours = graph.get(item)
            entries.append([item, trending.get(item), neighbours, counts.get(item)])
            # ~ bytes in msgpack: the id, two floats, and (id, float) per neighbour.
            size += len(item) + 21 + sum(len(n) + 11 for n in neighbours or ())
            if size >= max_bytes:
                chunks.append({"t0": self.t0, "entries": entries})
                entries, size = [], 0
        if entries or not chunks:
            chunks.append({"t0": self.t0, "entries": entries})
        return chunks

    def restore_chunks(self, chunks: Iterable[dict]) -> None:
        trending: dict[str, float] = {}
        counts: dict[str, float] = {}
        graph: dict[str, dict[str, float]] = {}
        t0 = None
        for chunk in chunks:
            t0 = chunk["t0"]
            for item, trend, neighbours, *count in chunk["entries"]:
                if trend is not None:
                    trending[item] = trend
                if neighbours:
                    graph[item] = neighbours
                if count and count[0] is not None:
                    counts[item] = count[0]
        self.restore({"t0": t0, "trending": trending, "counts": counts, "graph": graph})

    def snapshot(self, now: float) -> dict:
        """Trending (top items), engagement counts and the top-M neighbours (raw
        co-counts, chosen by cosine), decayed to ``now``. The last
        snapshot is kept: every recommender replica asks for the same ``now`` within
        a refresh interval, and building one takes a while for a big catalog."""
        if self._snapshot is not None and self._snapshot[0] == now:
            return self._snapshot[1]
        snapshot = self._build_snapshot(now)
        self._snapshot = (now, snapshot)
        return snapshot

    def _build_snapshot(self, now: float) -> dict:
        self.flush()
        if self.t0 is None:
            return {"trending": {}, "counts": {}, "graph": {}}
        trend = math.exp(max(EXP_FLOOR, -self.trend_rate * (now - self.t0)))
        pair = math.exp(max(EXP_FLOOR, -self.pair_rate * (now - self.t0)))
        top = heapq.nlargest(SNAPSHOT_TRENDING, self.trending.items(), key=_score)
        similar = self._most_similar
        return {
            "trending": {i: s * trend for i, s in top},
            "counts": {i: s * pair for i, s in self.counts.items()},
            "graph": {
                i: {n: w * pair for n, w in similar(nb).items()} for i, nb in self.graph.items()
            },
        }


def _score(entry: tuple[str, float]) -> float:
    return entry[1]


def _event_time(event: Sequence) -> float:
    return event[3]


def _counts_from_graph(graph: dict[str, dict[str, float]]) -> dict[str, float]:
    """Engagement counts for signals checkpointed before counts were kept: an item's
    co-counts add up to about its engagements times the pairs each one makes."""
    return {item: sum(neighbours.values()) / CONTEXT for item, neighbours in graph.items()}


def merge_snapshots(snapshots: Iterable[dict]) -> dict:
    """Add shard snapshots taken at the same ``now``."""
    trending: dict[str, float] = {}
    counts: dict[str, float] = {}
    graph: dict[str, dict[str, float]] = {}
    for snap in snapshots:
        for item, score in snap["trending"].items():
            trending[item] = trending.get(item, 0.0) + score
        for item, count in snap.get("counts", {}).items():
            counts[item] = counts.get(item, 0.0) + count
        for item, neighbours in snap["graph"].items():
            merged = graph.setdefault(item, {})
            for other, weight in neighbours.items():
                merged[other] = merged.get(other, 0.0) + weight
    return {"trending": trending, "counts": counts, "graph": graph}
