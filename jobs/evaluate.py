"""Offline recommendation quality: Recall@K and NDCG@K next to a popularity baseline.

    python -m jobs.evaluate EVENTS.jsonl [--items ITEMS.jsonl] [--k 10] [--users 500]

Chronological split per user (the last 20% of each user's events are held out),
the earlier part replayed into a fresh fleet with its own store, then for each
evaluated user the recommender's top K (seen items excluded) is scored against
the items the user engaged with positively in the held-out part. The baseline
recommends the globally most engaged items of the same training part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from persona.settings import load_settings

HOLDOUT = 0.2
MIN_EVENTS = 5
NEGATIVE = {"hide"}


def split(events: list[dict]) -> tuple[list[dict], dict[str, set[str]], dict[str, set[str]]]:
    """Training events, held-out relevant items per user, training items seen per user."""
    by_user: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_user[event["user_id"]].append(event)
    train, relevant, seen = [], {}, {}
    for user, history in by_user.items():
        history.sort(key=lambda e: e["ts"])
        cut = (
            len(history) - max(1, int(len(history) * HOLDOUT))
            if len(history) >= MIN_EVENTS
            else len(history)
        )
        train += history[:cut]
        seen[user] = {e["item_id"] for e in history[:cut]}
        held = {e["item_id"] for e in history[cut:] if e["action"] not in NEGATIVE} - seen[user]
        if held:
            relevant[user] = held
    train.sort(key=lambda e: e["ts"])
    return train, relevant, seen


def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / min(len(relevant), k)


def ndcg_at(ranked: list[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def popularity_ranking(train: list[dict]) -> list[str]:
    counts = Counter(e["item_id"] for e in train if e["action"] not in NEGATIVE)
    return [item for item, _ in counts.most_common()]


def evaluate(
    events_file: Path, items_file: Path | None, *, k: int, users: int, seed: int = 1
) -> dict:

    from actors.catalog import encode_item
    from actors.fleet import Fleet
    from jobs.common import join_ray
    from serving.recommend import RecommenderCore

    events = [json.loads(line) for line in events_file.open() if line.strip()]
    train, relevant, seen = split(events)
    base = load_settings()
    settings = load_settings(
        store_url=f"sqlite:///{tempfile.mkdtemp(prefix='persona-eval-')}/eval.db",
        namespace=f"persona-eval-{uuid.uuid4().hex[:8]}",
        checkpoint_interval_s=3600.0,
        data_dir=base.data_dir,
    )
    join_ray(settings)
    fleet = Fleet.start(settings)
    try:
        if items_file:
            fleet.store.upsert_items(
                {
                    (item := json.loads(line))["item_id"]: encode_item(item)
                    for line in items_file.open()
                    if line.strip()
                }
            )
        for at in range(0, len(train), 5_000):
            fleet.apply(f"eval-{at}", train[at : at + 5_000])
        core = RecommenderCore(settings, fleet)
        core.load_catalog()
        asyncio.run(core.load_signals())
        popular = popularity_ranking(train)
        evaluated = sorted(relevant)
        random.Random(seed).shuffle(evaluated)
        evaluated = evaluated[:users]
        profiles = fleet.get_profiles(evaluated)
        scores = {
            "persona": {"recall": 0.0, "ndcg": 0.0},
            "popularity": {"recall": 0.0, "ndcg": 0.0},
        }
        for user in evaluated:
            result = core.recommend(user, profiles.get(user), k, None, True)
            ranked = [r["item_id"] for r in result["items"]]
            baseline = [i for i in popular if i not in seen[user]][:k]
            for name, items in (("persona", ranked), ("popularity", baseline)):
                scores[name]["recall"] += recall_at(items, relevant[user], k)
                scores[name]["ndcg"] += ndcg_at(items, relevant[user], k)
        for name in scores:
            for metric in scores[name]:
                scores[name][metric] /= max(len(evaluated), 1)
    finally:
        fleet.shutdown()
    return {
        "k": k,
        "users_evaluated": len(evaluated),
        "train_events": len(train),
        "persona": scores["persona"],
        "popularity": scores["popularity"],
        "recall_lift": scores["persona"]["recall"] / max(scores["popularity"]["recall"], 1e-12),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", type=Path)
    parser.add_argument(
        "--items", type=Path, help="catalog JSONL (default: items.jsonl beside the events)"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--users", type=int, default=500, help="users evaluated (a seeded sample)")
    args = parser.parse_args(argv)
    if not args.events.is_file():
        print(f"evaluate: no such events file: {args.events}", file=sys.stderr)
        return 2
    items = args.items or (args.events.parent / "items.jsonl")
    result = evaluate(args.events, items if items.is_file() else None, k=args.k, users=args.users)
    k = result["k"]
    print(f"{'':12s} Recall@{k}  NDCG@{k}   ({result['users_evaluated']} users)")
    for name in ("persona", "popularity"):
        print(f"{name:12s} {result[name]['recall']:8.4f}  {result[name]['ndcg']:7.4f}")
    print(f"Persona / popularity Recall@{k}: {result['recall_lift']:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
