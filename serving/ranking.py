"""Recommendation ranking: candidates, blending, filtering, diversity. Pure numpy, no Ray.

Candidate sources, each scored in [0, 1] within its own source:
- ``co``:        items similar (cosine of co-engagement counts) to the user's recent
                 engagements, summed over the latest of them with weights that fade
                 with each step back (``Seeds``; the real-time sequence: the strongest
                 signal a profile has);
- ``topic``:     trending items of the user's top topics;
- ``embedding``: items nearest to the user's interest vector;
- ``trending``:  global trending (the cold-start source);
- ``popular``:   engagement over the co-engagement half-life (a steadier prior).
A variant's blend weights combine them; ``hidden`` (a weight, too) then takes away
the items similar to what the user recently hid. An item's reason is its strongest
source.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from actors.profile import HIDE, ProfileView
from persona.settings import Settings

TOPICS_FOR_CANDIDATES = 5
PER_SOURCE = 200
SOURCES = ("co", "topic", "embedding", "trending", "popular", "model")


@dataclass(frozen=True)
class Seeds:
    """How a user's recent engagements seed the ``co`` and ``model`` sources: the
    ``items`` latest distinct engagements, the n-th most recent weighing ``recency**n``
    (settings ``seed_*``; the values and why: persona/settings.py). ``co`` adds up each
    seed's neighbours with these weights; ``model``'s user is the sum of the seeds'
    vectors weighted ``model_recency**n``."""

    items: int
    recency: float
    model_recency: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Seeds:
        return cls(
            items=settings.seed_items,
            recency=settings.seed_recency,
            model_recency=settings.seed_model_recency,
        )

    def weights(self, count: int) -> np.ndarray:
        return self.recency ** np.arange(count, dtype=np.float64)

    def model_weights(self, count: int) -> np.ndarray:
        return self.model_recency ** np.arange(count, dtype=np.float64)


DEFAULT_SEEDS = Seeds.from_settings(Settings())


@dataclass
class Catalog:
    """Items held as arrays in replica memory."""

    ids: list[str] = field(default_factory=list)
    topics: list[tuple[str, ...]] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    index: dict[str, int] = field(default_factory=dict)
    # Rows by creation time, newest first (the fill when signals are thin).
    newest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # The serving model version's item embeddings, one unit row per catalog row (zero
    # for items the model does not know); empty until a version serves.
    model_version: str = ""
    model_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))

    def with_model(self, version: str, ids: Sequence[str], vectors: np.ndarray) -> Catalog:
        """This catalog with a model version's vectors aligned to its rows."""
        aligned = np.zeros((len(self.ids), vectors.shape[1]), dtype=np.float32)
        index = self.index
        pairs = [(index[item], n) for n, item in enumerate(ids) if item in index]
        if pairs:
            rows, found = (np.asarray(side) for side in zip(*pairs, strict=True))
            aligned[rows] = vectors[found]
        return replace(self, model_version=version, model_vectors=aligned)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> Catalog:
        """One pass over the records, keeping only what ranking needs: a catalog of
        100k items decodes ~2M short-lived objects, and holding them all at once made
        the replica's garbage collector pause requests for 100+ ms."""
        ids: list[str] = []
        topics: list[tuple[str, ...]] = []
        created: list[float] = []
        embeddings: list[np.ndarray | None] = []
        for record in records:
            ids.append(record["item_id"])
            topics.append(tuple(record.get("topics", ())))
            created.append(record.get("created_at", 0.0))
            embedding = record.get("embedding")
            embeddings.append(np.asarray(embedding, dtype=np.float32) if embedding else None)
        dim = max((len(e) for e in embeddings if e is not None), default=0)
        vectors = np.zeros((len(ids), dim), dtype=np.float32)
        for row, vector in enumerate(embeddings):
            if vector is not None and len(vector) == dim:
                norm = float(np.linalg.norm(vector))
                if norm > 0:
                    vectors[row] = vector / norm
        created_at = np.asarray(created, dtype=np.float64)
        return cls(
            ids=ids,
            topics=topics,
            vectors=vectors,
            index={item: row for row, item in enumerate(ids)},
            newest=np.argsort(-created_at, kind="stable"),
        )

    def nearest(self, unit: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` (rows, cosine similarity) of items nearest to a unit vector,
        exactly. A full partial sort of 100k scores costs ~1 ms here; instead a
        threshold from a strided sample keeps ~2x ``count`` candidates and only those
        are sorted (with the full sort as the fallback when too few pass)."""
        similarity = self.vectors @ unit
        take = min(count, len(similarity))
        if take <= 0:
            return np.zeros(0, dtype=np.int64), similarity[:0]
        step = max(1, len(similarity) // 4096)
        if step > 1:
            sample = similarity[::step]
            keep = min(len(sample) - 1, 2 * take // step + 1)
            threshold = np.partition(sample, len(sample) - 1 - keep)[len(sample) - 1 - keep]
            rows = np.flatnonzero(similarity >= threshold)
            if len(rows) >= take:
                best = rows[np.argpartition(-similarity[rows], take - 1)[:take]]
                return best, similarity[best]
        best = np.argpartition(-similarity, take - 1)[:take]
        return best, similarity[best]

    def __len__(self) -> int:
        return len(self.ids)

    def primary_topic(self, item: str) -> str:
        row = self.index.get(item)
        return self.topics[row][0] if row is not None and self.topics[row] else ""

    def has_topic(self, item: str, topic: str) -> bool:
        row = self.index.get(item)
        return row is not None and topic in self.topics[row]


@dataclass
class Signals:
    """Item signals merged from the shards: the co-engagement graph as cosine
    similarities, trending overall and per topic, and popularity."""

    trending: dict[str, float] = field(default_factory=dict)
    graph: dict[str, dict[str, float]] = field(default_factory=dict)
    by_topic: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    top: list[tuple[str, float]] = field(default_factory=list)
    popular: list[tuple[str, float]] = field(default_factory=list)
    # What the shards sent (raw co-counts): kept to rebuild against a new catalog.
    merged: Mapping = field(default_factory=dict)

    @classmethod
    def build(cls, merged: Mapping, catalog: Catalog) -> Signals:
        trending = dict(merged.get("trending", {}))
        top = sorted(trending.items(), key=lambda kv: -kv[1])
        by_topic: dict[str, list[tuple[str, float]]] = {}
        for item, score in top:
            row = catalog.index.get(item)
            if row is None:
                continue
            for topic in catalog.topics[row]:
                bucket = by_topic.setdefault(topic, [])
                if len(bucket) < PER_SOURCE:
                    bucket.append((item, score))
        counts = merged.get("counts", {})
        popular = sorted(counts.items(), key=lambda kv: -kv[1])[:PER_SOURCE]
        return cls(
            trending=trending,
            graph=cosine_graph(merged.get("graph", {}), counts),
            by_topic=by_topic,
            top=top,
            popular=popular,
            merged=merged,
        )


def cosine_graph(
    co_counts: Mapping[str, Mapping[str, float]], counts: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """``c(i, j) / sqrt(n(i) * n(j))``: how much more often two items are engaged with
    together than their popularity alone would make them. Raw co-counts rank the
    most popular items first next to anything; the cosine ranks the items that go
    with this one. An item with no count (a snapshot from before counts were kept)
    is normalised by the co-counts it has."""
    graph: dict[str, dict[str, float]] = {}
    sqrt = math.sqrt
    for item, neighbours in co_counts.items():
        if not neighbours:
            continue
        own = counts.get(item) or sum(neighbours.values())
        graph[item] = {
            other: weight / sqrt(own * (counts.get(other) or weight))
            for other, weight in neighbours.items()
        }
    return graph


def assign_variant(user_id: str, experiments: Mapping[str, Mapping]) -> str:
    """Deterministic bucketing: the same user always gets the same variant."""
    total = sum(float(v.get("share", 0)) for v in experiments.values())
    if total <= 0:
        return next(iter(experiments))
    point = (zlib.crc32(f"persona-exp:{user_id}".encode()) % 10_000) / 10_000 * total
    running = 0.0
    for name, variant in experiments.items():
        running += float(variant.get("share", 0))
        if point < running:
            return name
    return name


def _normalise(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return scores
    top = max(scores.values())
    return {k: v / top for k, v in scores.items()} if top > 0 else {}


def candidate_scores(
    profile: ProfileView | None,
    catalog: Catalog,
    signals: Signals,
    topic: str | None,
    seeds: Seeds = DEFAULT_SEEDS,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Per-source normalised scores (``hidden`` among them: what to take away), and the
    evidence behind each co/topic candidate."""
    sources: dict[str, dict[str, float]] = {name: {} for name in (*SOURCES, "hidden")}
    evidence: dict[str, str] = {}
    if profile is not None:
        recent = profile.recent  # newest first
        engaged = _latest_distinct(
            (item for _, item, action in recent if action != HIDE), seeds.items
        )
        weights = seeds.weights(len(engaged))
        evidence.update(_similar_to(engaged, weights, signals.graph, sources["co"], "co"))
        if catalog.model_version:
            sources["model"] = _nearest_in_model(
                engaged, seeds.model_weights(len(engaged)), catalog
            )
        hidden = _latest_distinct(
            (item for _, item, action in recent if action == HIDE), seeds.items
        )
        _similar_to(hidden, seeds.weights(len(hidden)), signals.graph, sources["hidden"], "hidden")
        interests = [(t, s) for t, s in profile.topics if s > 0][:TOPICS_FOR_CANDIDATES]
        if interests:
            strongest = interests[0][1]
            for name, score in interests:
                items = signals.by_topic.get(name, [])
                if not items:
                    continue
                best = items[0][1] or 1.0
                for item, trend in items:
                    value = (score / strongest) * (trend / best)
                    if value > sources["topic"].get(item, 0.0):
                        sources["topic"][item] = value
                        evidence[f"topic:{item}"] = name
        vector = profile.interest_vector
        if vector is not None and catalog.vectors.shape[1] == len(vector):
            user = np.asarray(vector, dtype=np.float32)
            norm = float(np.linalg.norm(user))
            if norm > 0 and len(catalog):
                rows, similarity = catalog.nearest(user / norm, PER_SOURCE)
                ids = catalog.ids
                for row, score in zip(rows.tolist(), similarity.tolist(), strict=True):
                    if score > 0:
                        sources["embedding"][ids[row]] = score
    pool = signals.by_topic.get(topic, []) if topic else signals.top[:PER_SOURCE]
    for item, score in pool[:PER_SOURCE]:
        sources["trending"][item] = score
    popular = signals.popular
    if topic:
        popular = [(i, s) for i, s in popular if catalog.has_topic(i, topic)]
    sources["popular"] = dict(popular)
    return {name: _normalise(scores) for name, scores in sources.items()}, evidence


def _latest_distinct(items: Iterable[str], count: int) -> list[str]:
    """The first ``count`` distinct items (the most recent first)."""
    chosen: dict[str, None] = {}
    for item in items:
        if len(chosen) >= count:
            break
        chosen.setdefault(item)
    return list(chosen)


def _nearest_in_model(
    engaged: list[str], weights: np.ndarray, catalog: Catalog
) -> dict[str, float]:
    """The PER_SOURCE items nearest to the user's recent engagements in the model,
    scored min-max within them: the top cosines lie close together (0.6-0.9 on
    MovieLens), and stretched to [0, 1] the blend sees their order, not their level."""
    user = _model_user(engaged, weights, catalog)
    if user is None:
        return {}
    similarity = catalog.model_vectors @ user
    take = min(PER_SOURCE, len(similarity))
    best = np.argpartition(-similarity, take - 1)[:take]
    scores = similarity[best]
    low, high = float(scores.min()), float(scores.max())
    scaled = (scores - low) / (high - low) if high > low else np.ones_like(scores)
    ids = catalog.ids
    return {ids[row]: float(v) for row, v in zip(best.tolist(), scaled.tolist(), strict=True)}


def _model_user(engaged: list[str], weights: np.ndarray, catalog: Catalog) -> np.ndarray | None:
    """The user in the serving model: the weighted sum of the recent engagements'
    vectors (``weights``, one per engagement), as a unit vector (None when the model
    knows none of them)."""
    known = [(catalog.index[item], n) for n, item in enumerate(engaged) if item in catalog.index]
    if not known or not catalog.model_version:
        return None
    rows, at = zip(*known, strict=True)
    user = np.asarray(weights, dtype=np.float32)[list(at)] @ catalog.model_vectors[list(rows)]
    norm = float(np.linalg.norm(user))
    return user / norm if norm > 0 else None


def nearest_items(
    profile: ProfileView, catalog: Catalog, k: int = 10, seeds: Seeds = DEFAULT_SEEDS
) -> dict[str, list[dict]]:
    """The ``k`` items nearest to a user in each embedding space ranking uses, best first
    with their cosine similarity: ``embedding``, the profile's interest vector among the
    catalog's item embeddings; ``model``, the recent engagements in the serving model (the
    ``model`` source). A space the user has no vector in gives an empty list."""
    found: dict[str, list[dict]] = {"embedding": [], "model": []}
    vector = profile.interest_vector
    if vector is not None and len(catalog) and catalog.vectors.shape[1] == len(vector):
        user = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(user))
        if norm > 0:
            rows, similarity = catalog.nearest(user / norm, k)
            found["embedding"] = _ranked_rows(catalog, rows, similarity)
    engaged = _latest_distinct(
        (item for _, item, action in profile.recent if action != HIDE), seeds.items
    )
    model_user = _model_user(engaged, seeds.model_weights(len(engaged)), catalog)
    if model_user is not None:
        similarity = catalog.model_vectors @ model_user
        take = min(k, len(similarity))
        rows = np.argpartition(-similarity, take - 1)[:take]
        found["model"] = _ranked_rows(catalog, rows, similarity[rows])
    return found


def _ranked_rows(catalog: Catalog, rows: np.ndarray, similarity: np.ndarray) -> list[dict]:
    order = np.argsort(-similarity, kind="stable")
    return [
        {
            "item_id": catalog.ids[row],
            "similarity": round(float(similarity[n]), 6),
            "topics": list(catalog.topics[row]),
        }
        for n, row in ((int(n), int(rows[n])) for n in order)
    ]


def _similar_to(
    anchors: list[str],
    weights: Sequence[float],
    graph: Mapping[str, Mapping[str, float]],
    into: dict,
    name: str,
) -> dict[str, str]:
    """Add up each anchor's similarities into ``into``, the n-th anchor weighing
    ``weights[n]``; returns the anchor that contributed most to each candidate."""
    evidence: dict[str, str] = {}
    best: dict[str, float] = {}
    for anchor, recency in zip(anchors, np.asarray(weights).tolist(), strict=True):
        neighbours = graph.get(anchor)
        if not neighbours:
            continue
        for other, similarity in neighbours.items():
            value = recency * similarity
            into[other] = into.get(other, 0.0) + value
            if value > best.get(other, 0.0):
                best[other] = value
                evidence[f"{name}:{other}"] = anchor
    return evidence


def recommend(
    profile: ProfileView | None,
    catalog: Catalog,
    signals: Signals,
    blend: Mapping[str, float],
    *,
    k: int = 20,
    topic: str | None = None,
    exclude_seen: bool = True,
    max_per_topic: int = 3,
    seeds: Seeds = DEFAULT_SEEDS,
) -> list[dict]:
    """Ranked items with score and reason; seen (the recent actions and the items met
    before them) and hidden removed; at most
    ``max_per_topic`` items share a primary topic; ``seeds``: how the recent sequence
    seeds ``co`` and ``model``."""
    sources, evidence = candidate_scores(profile, catalog, signals, topic, seeds)
    hidden, seen = set(), set()
    met_earlier = None  # items met before the recent actions (a filter): left out too
    if profile is not None:
        hidden.update(profile.hidden)
        if exclude_seen:
            seen.update(item for _, item, _ in profile.recent)
            if profile.earlier is not None:
                met_earlier = profile.saw_earlier
    # Blend in one pass: an item's score is the weighted sum over sources, its reason
    # the source that contributed most (the first such source on a tie).
    total: dict[str, float] = {}
    strongest: dict[str, tuple[float, str]] = {}
    for source in SOURCES:
        weight = float(blend.get(source, 0.0))
        if weight <= 0:
            continue
        for item, score in sources[source].items():
            value = weight * score
            total[item] = total.get(item, 0.0) + value
            if value > strongest.get(item, (0.0, ""))[0] or item not in strongest:
                strongest[item] = (value, source)
    # Negative feedback: what resembles the items the user hid weighs less.
    penalty = float(blend.get("hidden", 0.0))
    if penalty > 0:
        for item, score in sources["hidden"].items():
            if item in total:
                total[item] -= penalty * score
    restrict = len(catalog) > 0
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    results, per_topic = [], {}
    for item, score in ranked:
        source = strongest[item][1]
        if item in hidden or item in seen or score <= 0:
            continue
        if met_earlier is not None and met_earlier(item):
            continue
        if restrict and item not in catalog.index:
            continue
        if topic and not catalog.has_topic(item, topic):
            continue
        primary = catalog.primary_topic(item)
        if primary and per_topic.get(primary, 0) >= max_per_topic:
            continue
        per_topic[primary] = per_topic.get(primary, 0) + 1
        results.append(
            {
                "item_id": item,
                "score": round(score, 6),
                "reason": _reason(source, item, evidence),
                "sources": _contributions(item, sources, blend),
            }
        )
        if len(results) >= k:
            break
    if len(results) < k and restrict:
        taken = {r["item_id"] for r in results} | hidden | seen
        results += _newest_fill(
            catalog, k - len(results), taken, topic, per_topic, max_per_topic, met_earlier
        )
    return results


def _contributions(
    item: str, sources: Mapping[str, Mapping[str, float]], blend: Mapping[str, float]
) -> dict[str, float]:
    """What each source added to an item's score (its weight times its normalised score),
    and what ``hidden`` took away, negative: the sum is the item's score."""
    parts = {
        source: round(float(blend.get(source, 0.0)) * sources[source][item], 6)
        for source in SOURCES
        if float(blend.get(source, 0.0)) > 0 and item in sources[source]
    }
    penalty = float(blend.get("hidden", 0.0))
    if penalty > 0 and item in sources["hidden"]:
        parts["hidden"] = round(-penalty * sources["hidden"][item], 6)
    return parts


def _reason(source: str, item: str, evidence: Mapping[str, str]) -> str:
    if source == "co":
        anchor = evidence.get(f"co:{item}", "your recent items")
        return f"people who engaged with {anchor} also engaged with this"
    if source == "popular":
        return "popular with people lately"
    if source == "topic":
        return (
            f"trending in {evidence.get(f'topic:{item}', 'a topic you like')}, a top topic of yours"
        )
    if source == "embedding":
        return "similar to what you engage with"
    if source == "model":
        return "close to your recent items in the learned item embeddings"
    return "trending now"


def _newest_fill(
    catalog: Catalog,
    count: int,
    exclude: set[str],
    topic: str | None,
    per_topic: dict[str, int],
    max_per_topic: int,
    met_earlier: Callable[[str], bool] | None = None,
) -> list[dict]:
    """When signals are thin (a new deployment), fill with the newest catalog items,
    within the same per-topic cap."""
    filled = []
    for row in catalog.newest.tolist():
        item = catalog.ids[row]
        if item in exclude or (topic and topic not in catalog.topics[row]):
            continue
        if met_earlier is not None and met_earlier(item):
            continue
        primary = catalog.topics[row][0] if catalog.topics[row] else ""
        if primary and per_topic.get(primary, 0) >= max_per_topic:
            continue
        per_topic[primary] = per_topic.get(primary, 0) + 1
        filled.append(
            {"item_id": item, "score": 0.0, "reason": "new in the catalog", "sources": {}}
        )
        if len(filled) >= count:
            break
    return filled
