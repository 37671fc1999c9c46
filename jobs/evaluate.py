"""Offline recommendation quality on real or generated logs, next to baselines.

    python -m jobs.evaluate --dataset movielens-100k [--tune] [--http] [--json OUT]
    python -m jobs.evaluate EVENTS.jsonl [--items ITEMS.jsonl] [--holdout 0.2]

Chronological split per user: each user's last ``--holdout`` events (a count, or a
fraction below 1) are the test; a validation split is carved from the training part
the same way, for tuning. A held-out item is relevant when its action says the user
wanted it (MovieLens: a rating of 4 or 5) and the user had not met it in training.
Metrics: Recall, NDCG and MRR at 10 and 20 (averaged over users with relevant items;
recall is hits / min(relevant, K)) and catalog coverage (distinct items shown to the
evaluated users / catalog size).

Persona goes through the code that serves: the training events are ingested into a
fleet of shards on a private local Ray (or the cluster in RAY_ADDRESS) with its own
store, then each user's profile is read from the shards and ranked by
``RecommenderCore`` against the signals it pulled from them. With ``--http`` the
same users are also asked over HTTP, from a Serve application on that fleet. The
log is moved in time so that it ends now (decays are computed at the current time).
The model loop is part of the run: Persona is scored before (``persona-before``) and
after (``persona``, ``persona-http``) the training job (jobs/train_embeddings.py)
learns item embeddings from the same training events, publishes them to the fleet's
store and switches serving to them.
Baselines, computed in the same run from the same training events: popularity,
item-kNN (cosine) over each user's 10 most recent items, and ALS from ``implicit``.
``--tune`` chooses Persona's blend weights (and ALS's factors) on the validation
split (with its own model, trained on the validation split's training part) and
scores the test split with them; nothing is chosen on the test split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from actors.profile import ProfileView
from jobs.datasets import MOVIELENS_100K, Dataset, load
from persona.settings import Settings, load_settings

KS = (10, 20)
# Held out per user: MovieLens users have at least 20 ratings, so 5 leaves 10 or more
# to train on after the validation split takes 5 more; event files keep the last 20%.
MOVIELENS_HOLDOUT = 5
FILE_HOLDOUT = 0.2
MIN_TRAIN = 3  # a user needs this many training events to be evaluated
KNN_RECENT = 10
BATCH = 5_000
RECOMMENDERS = (
    "persona-before",
    "persona",
    "persona-tuned",
    "persona-http",
    "popularity",
    "item-knn",
    "als",
)


@dataclass
class Split:
    """Training events (time order), and per evaluated user the relevant held-out
    items and the items met in training."""

    train: list[dict]
    relevant: dict[str, set[str]]
    seen: dict[str, set[str]] = field(default_factory=dict)


def split(events: Iterable[dict], holdout: float, is_relevant: Callable[[str], bool]) -> Split:
    """Per user, chronologically: the last ``holdout`` events (a count when >= 1, else
    a fraction, at least one) are held out. Users with fewer than MIN_TRAIN events
    left to train on keep all their events in training and are not evaluated."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_user[event["user_id"]].append(event)
    train, relevant, seen = [], {}, {}
    for user, history in by_user.items():
        history.sort(key=lambda e: (e["ts"], e["item_id"]))
        held = int(holdout) if holdout >= 1 else max(1, int(len(history) * holdout))
        cut = len(history) - held
        if cut < MIN_TRAIN:
            train += history
            continue
        train += history[:cut]
        seen[user] = {e["item_id"] for e in history[:cut]}
        wanted = {e["item_id"] for e in history[cut:] if is_relevant(e["action"])}
        if wanted - seen[user]:
            relevant[user] = wanted - seen[user]
    train.sort(key=lambda e: e["ts"])
    return Split(train, relevant, {u: seen[u] for u in relevant})


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / min(len(relevant), k)


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def mrr_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return next((1.0 / (i + 1) for i, item in enumerate(ranked[:k]) if item in relevant), 0.0)


def score(
    recommended: Mapping[str, Sequence[str]],
    relevant: Mapping[str, set[str]],
    catalog_size: int,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Mean Recall/NDCG/MRR@K over the users in ``relevant`` (a user without a list
    scores 0) and coverage@K: distinct items in their top K / ``catalog_size``."""
    users = list(relevant)
    result: dict[str, float] = {}
    for k in ks:
        shown: set[str] = set()
        totals = {"recall": 0.0, "ndcg": 0.0, "mrr": 0.0}
        for user in users:
            ranked = list(recommended.get(user, ()))[:k]
            shown.update(ranked)
            totals["recall"] += recall_at(ranked, relevant[user], k)
            totals["ndcg"] += ndcg_at(ranked, relevant[user], k)
            totals["mrr"] += mrr_at(ranked, relevant[user], k)
        for name, total in totals.items():
            result[f"{name}@{k}"] = total / max(len(users), 1)
        result[f"coverage@{k}"] = len(shown) / max(catalog_size, 1)
    return result


# --- baselines ---
def popularity(
    train: list[dict], users: Iterable[str], seen: Mapping[str, set[str]], k: int
) -> dict[str, list[str]]:
    """The most engaged items of the training part, each user's own removed."""
    counts = Counter(e["item_id"] for e in train if e["action"] != "hide")
    ranked = [item for item, _ in counts.most_common()]
    result = {}
    for user in users:
        own = seen.get(user, set())
        result[user] = [i for i in ranked[: k + len(own)] if i not in own][:k]
    return result


class _Matrix:
    """Users x items of the training engagements (hides left out), as scipy CSR."""

    def __init__(self, train: list[dict], weighted: bool, weights: Mapping[str, float]):
        from scipy import sparse

        self.items = sorted({e["item_id"] for e in train})
        self.item_index = {item: n for n, item in enumerate(self.items)}
        self.users = sorted({e["user_id"] for e in train})
        self.user_index = {user: n for n, user in enumerate(self.users)}
        rows, cols, values = [], [], []
        for e in train:
            if e["action"] == "hide":
                continue
            rows.append(self.user_index[e["user_id"]])
            cols.append(self.item_index[e["item_id"]])
            values.append(float(weights.get(e["action"], 1.0)) if weighted else 1.0)
        shape = (len(self.users), len(self.items))
        matrix = sparse.csr_matrix((values, (rows, cols)), shape=shape, dtype=np.float32)
        if not weighted:
            matrix.data[:] = 1.0  # an item engaged with twice is still one item
        self.matrix = matrix


def item_knn(
    train: list[dict],
    users: Iterable[str],
    seen: Mapping[str, set[str]],
    k: int,
    recent: int = KNN_RECENT,
) -> dict[str, list[str]]:
    """Item-kNN: cosine similarity of items over the users who engaged with them,
    summed over each user's ``recent`` most recent engaged items."""
    data = _Matrix(train, weighted=False, weights={})
    matrix = data.matrix.tocsc()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=0)).ravel()) + 1e-12
    last: dict[str, list[int]] = defaultdict(list)
    for e in train:
        if e["action"] != "hide":
            last[e["user_id"]].append(data.item_index[e["item_id"]])
    result = {}
    for user in users:
        anchors = list(dict.fromkeys(reversed(last.get(user, []))))[:recent]
        if not anchors:
            result[user] = []
            continue
        columns = matrix[:, anchors]
        similarity = (matrix.T @ columns).toarray() / norms[:, None] / norms[anchors][None, :]
        scores = similarity.sum(axis=1)
        result[user] = _top(scores, data.items, seen.get(user, set()), k)
    return result


def als(
    train: list[dict],
    users: Iterable[str],
    seen: Mapping[str, set[str]],
    k: int,
    *,
    weights: Mapping[str, float],
    factors: int = 64,
    seed: int = 1,
) -> dict[str, list[str]]:
    """Implicit-feedback ALS (the ``implicit`` library); confidence grows with the
    action's weight (a save counts more than a view)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    data = _Matrix(train, weighted=True, weights=weights)
    with threadpool_limits(1, "blas"):  # implicit's own threads do the work
        model = AlternatingLeastSquares(
            factors=factors, regularization=0.05, iterations=15, random_state=seed
        )
        model.fit(data.matrix * 5.0, show_progress=False)
    user_factors = np.asarray(model.user_factors)
    item_factors = np.asarray(model.item_factors)
    result = {}
    for user in users:
        row = data.user_index.get(user)
        if row is None:
            result[user] = []
            continue
        result[user] = _top(item_factors @ user_factors[row], data.items, seen.get(user, set()), k)
    return result


def _top(scores: np.ndarray, items: list[str], own: set[str], k: int) -> list[str]:
    take = min(len(scores), k + len(own))
    best = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(take)
    best = best[np.argsort(-scores[best], kind="stable")]
    return [items[n] for n in best.tolist() if items[n] not in own][:k]


# --- Persona ---
class PersonaFleet:
    """Shards on a private store holding the training events; the recommender of an
    ingress replica (RecommenderCore) over their profiles and signals."""

    def __init__(self, settings: Settings, dataset: Dataset, train: list[dict]):
        from actors.catalog import encode_item
        from jobs.common import fleet_for_job
        from serving.recommend import RecommenderCore

        self.settings = settings
        self.fleet = fleet_for_job(settings)
        if dataset.items:
            self.fleet.store.upsert_items({i["item_id"]: encode_item(i) for i in dataset.items})
        for at in range(0, len(train), BATCH):
            part = train[at : at + BATCH]
            ack = self.fleet.apply(
                f"evaluate-{dataset.name}", part, lines=list(range(at, at + len(part)))
            )
            if ack["rejected"]:
                raise RuntimeError(
                    f"{ack['rejected']} training events rejected: {ack['errors'][:3]}"
                )
        self.core = RecommenderCore(settings, self.fleet, self.fleet.store)
        self.core.load_catalog()
        asyncio.run(self.core.load_signals())
        self._profiles: dict[str, ProfileView] = {}

    def train_model(self, train: list[dict], seed: int = 1) -> dict:
        """The training job on these events, published to this fleet's store and
        switched to; the recommender picks the version up as a replica does."""
        from jobs.train_embeddings import train_and_publish

        events = ((e["user_id"], e["item_id"], e["action"]) for e in train)
        result = train_and_publish(
            self.fleet.store, events, self.settings, source="training events", seed=seed
        )
        self.core.load_model()
        return result

    def profiles(self, users: Sequence[str]) -> dict[str, ProfileView | None]:
        missing = [u for u in users if u not in self._profiles]
        for at in range(0, len(missing), 1_000):
            self._profiles.update(self.fleet.get_profiles(missing[at : at + 1_000]))
        return {u: self._profiles.get(u) for u in users}

    def recommend(
        self,
        users: Sequence[str],
        k: int,
        blend: Mapping[str, float] | None = None,
        ranking: Mapping | None = None,
    ) -> dict[str, list[str]]:
        """Each user's top ``k`` (seen items excluded), as served: by the user's
        experiment variant, or with ``blend`` for every user (tuning); with a blend,
        ``ranking`` overrides ranking settings (``seed_*``, ``max_per_topic``)."""
        from serving.ranking import Seeds, recommend

        profiles = self.profiles(users)
        seeds, max_per_topic = self.core.seeds, self.settings.max_per_topic
        if ranking:
            tuned = replace(self.settings, **ranking)
            seeds, max_per_topic = Seeds.from_settings(tuned), tuned.max_per_topic
        result = {}
        for user in users:
            if blend is None:
                items = self.core.recommend(user, profiles[user], k, None, True)["items"]
            else:
                items = recommend(
                    profiles[user],
                    self.core.catalog,
                    self.core.signals,
                    blend,
                    k=k,
                    exclude_seen=True,
                    max_per_topic=max_per_topic,
                    seeds=seeds,
                )
            result[user] = [i["item_id"] for i in items]
        return result

    def recommend_over_http(
        self, users: Sequence[str], k: int, port: int | None = None
    ) -> dict[str, list[str]]:
        """The same through GET /v1/users/{u}/recommendations of a Serve application
        on this fleet (Serve's proxy on ``port``, or a free one when Serve is not
        running yet), deleted again afterwards."""
        from urllib.parse import quote

        from ray import serve

        from serving.app import build_ingress

        port = port or _free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        name = f"persona-evaluate-{uuid.uuid4().hex[:8]}"
        overrides = {
            "store_url": self.settings.resolved_store_url(),
            "namespace": self.settings.namespace,
            "experiments": self.settings.experiments,
            "data_dir": self.settings.data_dir,
        }
        serve.run(build_ingress(overrides, replicas=1), name=name, route_prefix=f"/{name}")
        try:
            base = f"http://127.0.0.1:{port}/{name}/v1/users"
            result = {}
            for user in users:
                url = f"{base}/{quote(user, safe='')}/recommendations?k={k}&exclude_seen=true"
                with urllib.request.urlopen(url, timeout=60) as reply:
                    result[user] = [i["item_id"] for i in json.loads(reply.read())["items"]]
            return result
        finally:
            serve.delete(name)

    def close(self) -> None:
        self.fleet.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- tuning ---
BLEND_GRID = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)


def tune_blend(
    evaluate_blend: Callable[[dict[str, float]], float],
    sources: Sequence[str],
    start: Mapping[str, float],
    rounds: int = 2,
) -> tuple[dict[str, float], float]:
    """Coordinate ascent over blend weights (``co`` fixed at 1: only ratios matter),
    keeping a change only when it improves the validation metric."""
    blend = dict(start)
    best = evaluate_blend(blend)
    for _ in range(rounds):
        improved = False
        for source in sources:
            for weight in BLEND_GRID:
                if weight == blend.get(source, 0.0):
                    continue
                trial = {**blend, source: weight}
                value = evaluate_blend(trial)
                if value > best + 1e-9:
                    blend, best, improved = trial, value, True
        if not improved:
            break
    return {s: w for s, w in blend.items() if w > 0}, best


# --- tuning across horizons ---
# When the user comes back is not known, so ranking settings are chosen for the worst
# ratio to item-kNN over validation splits carved at several horizons: the last 1, 5
# and 10 events, and the last 20%, of each user's training part.
TUNE_HORIZONS = (1.0, 5.0, 10.0, 0.2)
# Ranking settings (persona/settings.py) and the blend's model weight ("blend:model").
RANKING_GRID: dict[str, tuple] = {
    "seed_items": (10, 20, 30, 50),
    "seed_recency": (0.6, 0.7, 0.8, 0.9),
    "seed_model_recency": (0.6, 0.8, 0.9, 1.0),
    "max_per_topic": (5, 8, 12),
    "blend:model": (0.1, 0.2, 0.3, 0.5),
}


def tune_worst_ratio(
    recalls: Callable[[dict], Mapping[float, float]],
    baseline: Mapping[float, float],
    grid: Mapping[str, Sequence],
    start: Mapping,
    rounds: int = 2,
) -> tuple[dict, float]:
    """Coordinate ascent over ``grid`` maximising the worst ratio, over horizons, of
    ``recalls(params)[h]`` to ``baseline[h]``; a change is kept only when it raises
    that worst ratio. Returns the parameters and their worst ratio."""

    def worst(params: Mapping) -> float:
        measured = recalls(dict(params))
        return min(measured[h] / max(baseline[h], 1e-12) for h in baseline)

    params = dict(start)
    best = worst(params)
    for _ in range(rounds):
        improved = False
        for name, values in grid.items():
            for value in values:
                if value == params.get(name):
                    continue
                trial = {**params, name: value}
                value_worst = worst(trial)
                if value_worst > best + 1e-9:
                    params, best, improved = trial, value_worst, True
        if not improved:
            break
    return params, best


def split_tuned(params: Mapping) -> tuple[dict[str, float], dict]:
    """Tuned parameters as (the blend's overrides, ranking settings)."""
    blend = {k.split(":", 1)[1]: float(v) for k, v in params.items() if k.startswith("blend:")}
    return blend, {k: v for k, v in params.items() if not k.startswith("blend:")}


def _tune_horizons(
    train: list[dict],
    horizons: Sequence[float],
    dataset: Dataset,
    settings: Settings,
    catalog_size: int,
    blend: Mapping[str, float],
    seed: int,
    log: Callable[[str], None],
) -> dict:
    """Validation splits carved from ``train`` at each horizon, a fleet and a trained
    model on each; the ranking settings and model weight with the best worst ratio to
    item-kNN across them, starting from the defaults."""
    fleets: dict[float, tuple[PersonaFleet, Split]] = {}
    knn: dict[float, float] = {}
    try:
        for horizon in horizons:
            valid = split(train, horizon, dataset.is_relevant)
            fleet = PersonaFleet(_private_settings(settings), dataset, valid.train)
            fleets[horizon] = (fleet, valid)
            fleet.train_model(valid.train, seed)
            users = sorted(valid.relevant)
            ranked = item_knn(valid.train, users, valid.seen, 10)
            knn[horizon] = score(ranked, valid.relevant, catalog_size, (10,))["recall@10"]
            log(f"horizon {horizon:g}: {len(users)} validation users, item-kNN {knn[horizon]:.4f}")

        def recalls(params: dict) -> dict[float, float]:
            overrides, ranking = split_tuned(params)
            result = {}
            for horizon, (fleet, valid) in fleets.items():
                ranked = fleet.recommend(
                    sorted(valid.relevant), 10, {**blend, **overrides}, ranking
                )
                result[horizon] = score(ranked, valid.relevant, catalog_size, (10,))["recall@10"]
            return result

        start = {name: getattr(settings, name) for name in RANKING_GRID if ":" not in name}
        start["blend:model"] = float(blend.get("model", 0.0))
        default = recalls(start)
        params, worst = tune_worst_ratio(recalls, knn, RANKING_GRID, start)
        tuned = recalls(params)
    finally:
        for fleet, _ in fleets.values():
            fleet.close()
    return {
        "chosen": params,
        "worst_ratio": worst,
        "item_knn": knn,
        "default": default,
        "tuned": tuned,
        "default_worst_ratio": min(default[h] / max(knn[h], 1e-12) for h in knn),
    }


# --- the run ---
def _shift_to_now(events: list[dict]) -> list[dict]:
    """The log moved in time so that it ends a minute ago (order and gaps kept)."""
    if not events:
        return events
    offset = (time.time() - 60.0) - max(e["ts"] for e in events)
    return [{**e, "ts": e["ts"] + offset} for e in events]


def _private_settings(base: Settings, **overrides) -> Settings:
    root = tempfile.mkdtemp(prefix="persona-eval-")
    return load_settings(
        store_url=f"sqlite:///{root}/eval.db",
        namespace=f"persona-eval-{uuid.uuid4().hex[:8]}",
        checkpoint_interval_s=3600.0,
        data_dir=base.data_dir,
        **overrides,
    )


def _start_ray(namespace: str) -> bool:
    """A private local Ray (another developer's cluster on this machine is left alone),
    or the cluster named by RAY_ADDRESS; False when Ray was already initialised."""
    import ray

    from jobs.local import local_resources

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=namespace, logging_level="warning")
    else:
        ray.init(
            address="local",
            namespace=namespace,
            include_dashboard=False,
            logging_level="warning",
            resources=local_resources(),
        )
    return True


def evaluate(
    dataset: Dataset,
    *,
    holdout: float,
    users: int | None = None,
    tune: bool = False,
    tune_horizons: Sequence[float] = (),
    http: bool = False,
    http_port: int | None = None,
    baselines: Sequence[str] = ("popularity", "item-knn", "als"),
    seed: int = 1,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict:
    """The whole evaluation; returns the tables (``test``, and ``validation`` when
    tuning) as {recommender: metrics}, plus what was chosen and how it was run."""
    import ray

    base = settings or load_settings()
    events = _shift_to_now(dataset.events)
    test = split(events, holdout, dataset.is_relevant)
    catalog_size = len(dataset.items) or len({e["item_id"] for e in events})
    result: dict = {"dataset": dataset.name, "holdout": holdout, "events": len(events)}
    started = _start_ray(base.namespace)
    try:
        blend, factors = None, 64
        if tune:
            valid = _sample(split(test.train, holdout, dataset.is_relevant), users, seed)
            log(f"validation: {len(valid.train):,} training events, {len(valid.relevant)} users")
            table, blend, factors = _tune(valid, dataset, base, catalog_size, baselines, seed)
            log(f"chosen on validation: blend {blend}, ALS factors {factors}")
            result.update(
                validation=table,
                validation_users=len(valid.relevant),
                chosen={"blend": blend, "als_factors": factors},
            )
        ranking = None
        if tune_horizons:
            start = blend or _default_blend(base)
            tuned = _tune_horizons(
                test.train, tune_horizons, dataset, base, catalog_size, start, seed, log
            )
            overrides, ranking = split_tuned(tuned["chosen"])
            blend = {**start, **overrides}
            log(f"chosen across horizons: {tuned['chosen']} (worst {tuned['worst_ratio']:.3f}x)")
            result["horizons"] = tuned
            result.setdefault("chosen", {})["ranking"] = ranking
            result["chosen"]["blend"] = blend
        test = _sample(test, users, seed)
        log(f"test: {len(test.train):,} training events, {len(test.relevant)} users")
        table = {}
        fleet = PersonaFleet(_private_settings(base), dataset, test.train)
        try:
            table["persona-before"] = _score_persona(fleet, test, catalog_size)
            result["model"] = fleet.train_model(test.train, seed)
            log(f"trained and switched to {result['model']['version']}")
            table["persona"] = _score_persona(fleet, test, catalog_size)
            if blend is not None:
                table["persona-tuned"] = _score_persona(fleet, test, catalog_size, blend, ranking)
            if http:
                ranked = fleet.recommend_over_http(sorted(test.relevant), max(KS), http_port)
                table["persona-http"] = score(ranked, test.relevant, catalog_size)
        finally:
            fleet.close()
        table.update(_baselines(test, catalog_size, base, baselines, factors, seed))
        result.update(test=table, train_events=len(test.train), users_evaluated=len(test.relevant))
    finally:
        if started:
            ray.shutdown()
    result["variants"] = {n: v["blend"] for n, v in base.experiments.items()}
    result["catalog"] = catalog_size
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    result["date"] = time.strftime("%Y-%m-%d")
    return result


def _tune(
    valid: Split,
    dataset: Dataset,
    settings: Settings,
    catalog_size: int,
    baselines: Sequence[str],
    seed: int,
) -> tuple[dict[str, dict], dict[str, float], int]:
    """The validation table, the blend chosen for Persona and the factors for ALS."""
    table: dict[str, dict] = {}
    fleet = PersonaFleet(_private_settings(settings), dataset, valid.train)
    try:
        table["persona-before"] = _score_persona(fleet, valid, catalog_size)
        fleet.train_model(valid.train, seed)
        table["persona"] = _score_persona(fleet, valid, catalog_size)
        users = sorted(valid.relevant)

        def recall(blend: dict[str, float]) -> float:
            ranked = fleet.recommend(users, 10, blend)
            return score(ranked, valid.relevant, catalog_size, (10,))["recall@10"]

        sources = ("model", "popular", "topic", "embedding", "trending", "hidden")
        blend, _ = tune_blend(recall, sources, {"co": 1.0})
        table["persona-tuned"] = _score_persona(fleet, valid, catalog_size, blend)
    finally:
        fleet.close()
    factors = 64
    if "als" in baselines:  # the baseline gets its own choice on validation, too

        def als_recall(factors: int) -> float:
            ranked = _baselines(valid, catalog_size, settings, ["als"], factors, seed)
            return ranked["als"]["recall@10"]

        factors = max((32, 64, 128), key=als_recall)
    table.update(_baselines(valid, catalog_size, settings, baselines, factors, seed))
    return table, blend, factors


def _score_persona(
    fleet: PersonaFleet,
    data: Split,
    catalog_size: int,
    blend: dict | None = None,
    ranking: Mapping | None = None,
) -> dict[str, float]:
    ranked = fleet.recommend(sorted(data.relevant), max(KS), blend, ranking)
    return score(ranked, data.relevant, catalog_size)


def _default_blend(settings: Settings) -> dict[str, float]:
    """The blend of the first experiment variant (the one tuning starts from)."""
    return dict(next(iter(settings.experiments.values()))["blend"])


def _sample(data: Split, users: int | None, seed: int) -> Split:
    """The split for all its evaluated users, or for a seeded sample of ``users``."""
    if not users:
        return data
    chosen = sorted(data.relevant)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:users]
    return Split(
        data.train, {u: data.relevant[u] for u in chosen}, {u: data.seen[u] for u in chosen}
    )


def _baselines(
    data: Split,
    catalog_size: int,
    settings: Settings,
    names: Sequence[str],
    als_factors: int,
    seed: int,
) -> dict[str, dict]:
    users, k, table = sorted(data.relevant), max(KS), {}
    if "popularity" in names:
        ranked = popularity(data.train, users, data.seen, k)
        table["popularity"] = score(ranked, data.relevant, catalog_size)
    if "item-knn" in names:
        ranked = item_knn(data.train, users, data.seen, k)
        table["item-knn"] = score(ranked, data.relevant, catalog_size)
    if "als" in names:
        ranked = als(
            data.train, users, data.seen, k, weights=settings.action_weights,
            factors=als_factors, seed=seed,
        )  # fmt: skip
        table["als"] = score(ranked, data.relevant, catalog_size)
    return table


def markdown(table: Mapping[str, Mapping[str, float]]) -> str:
    """A table: one row per recommender, Recall/NDCG/MRR/coverage at each K."""
    columns = [f"{m}@{k}" for k in KS for m in ("recall", "ndcg", "mrr", "coverage")]
    lines = [
        "| recommender | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    order = {name: n for n, name in enumerate(RECOMMENDERS)}
    for name in sorted(table, key=lambda n: order.get(n, len(order))):
        lines.append(f"| {name} | " + " | ".join(f"{table[name][c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's arguments (shared by ``python -m jobs.evaluate`` and ``persona evaluate``)."""
    parser.add_argument("events", nargs="?", help="an events JSONL file")
    parser.add_argument(
        "--dataset", choices=[MOVIELENS_100K], help="a public data set (fetched once, cached)"
    )
    parser.add_argument(
        "--items", type=Path, help="catalog JSONL (default: items.jsonl beside the events)"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        help=f"held out per user: a count, or a fraction below 1 (default "
        f"{MOVIELENS_HOLDOUT} for {MOVIELENS_100K}, {FILE_HOLDOUT} for files)",
    )
    parser.add_argument("--users", type=int, help="evaluate a seeded sample of this many users")
    parser.add_argument("--tune", action="store_true", help="choose the blend on validation data")
    parser.add_argument(
        "--tune-horizons",
        nargs="?",
        const=",".join(f"{h:g}" for h in TUNE_HORIZONS),
        help="choose ranking settings (seed_*, max_per_topic, the model weight) for the "
        "worst ratio to item-kNN over validation splits at these holdouts (default "
        + ",".join(f"{h:g}" for h in TUNE_HORIZONS)
        + "); persona-tuned uses them",
    )
    parser.add_argument("--http", action="store_true", help="also ask a Serve app over HTTP")
    parser.add_argument(
        "--no-als", action="store_true", help="leave out the ALS baseline (needs `implicit`)"
    )
    parser.add_argument("--json", type=Path, help="write the result here as JSON")
    parser.add_argument(
        "--k", type=int, default=10, choices=KS, help="K of the summary line (and JSON keys)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if bool(args.events) == bool(args.dataset):
        print("evaluate: name an events file or a --dataset (one of them)", file=sys.stderr)
        return 2
    settings = load_settings()
    try:
        dataset = load(args.dataset or args.events, settings.data_dir, args.items)
    except Exception as exc:  # a missing file, or the download refused
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    holdout = args.holdout or (
        MOVIELENS_HOLDOUT if dataset.name == MOVIELENS_100K else FILE_HOLDOUT
    )
    baselines = ("popularity", "item-knn") if args.no_als else ("popularity", "item-knn", "als")
    result = evaluate(
        dataset,
        holdout=holdout,
        users=args.users,
        tune=args.tune,
        tune_horizons=[float(h) for h in args.tune_horizons.split(",")]
        if args.tune_horizons
        else (),
        http=args.http,
        baselines=baselines,
        settings=settings,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if "horizons" in result:
        tuned = result["horizons"]
        print("\nvalidation across horizons (Recall@10; ratio to item-kNN)")
        for horizon, knn in tuned["item_knn"].items():
            default, chosen = tuned["default"][horizon], tuned["tuned"][horizon]
            print(
                f"holdout {horizon:g}: item-kNN {knn:.4f}, defaults {default:.4f} "
                f"({default / max(knn, 1e-12):.3f}x), tuned {chosen:.4f} "
                f"({chosen / max(knn, 1e-12):.3f}x)"
            )
        print(f"chosen: {tuned['chosen']}")
    for part in ("validation", "test"):
        if part in result:
            print(f"\n{part} ({result.get(part + '_users', result['users_evaluated'])} users)")
            print(markdown(result[part]))
    test, k = result["test"], args.k
    recall = f"recall@{k}"
    for name in ("persona-before", "persona", "persona-tuned", "persona-http"):
        if name in test:
            ratios = ", ".join(
                f"{test[name][recall] / max(test[base][recall], 1e-12):.2f}x {base}"
                for base in ("popularity", "item-knn")
                if base in test
            )
            print(f"{name}: Recall@{k} {test[name][recall]:.4f} = {ratios}")
    # The summary at --k under the keys bench/run_all.py reads.
    for name in ("persona", "popularity"):
        result[name] = {m: test[name][f"{m}@{k}"] for m in ("recall", "ndcg", "mrr", "coverage")}
    result["k"] = k
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
