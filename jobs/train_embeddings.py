"""Train item embeddings from the logged events, publish them as a model version, switch.

    python -m jobs.train_embeddings [EVENTS...] [--no-switch] [--factors N] [--json OUT]
    persona train [EVENTS...]
    ray job submit --working-dir . -- python -m jobs.train_embeddings

What it learns from: event files (JSONL or Parquet, files, directories or globs, read
with Ray Data: one read task per file, parsed across the cluster), or, with no files,
the store's profiles after a checkpoint of every shard (each user's last
``recent_actions`` actions: what Persona keeps of the log). The model is implicit-
feedback ALS from the ``implicit`` library on the users x items matrix, an engagement
weighing its action's weight (hides left out); its item factors, scaled to unit
length, are the embeddings. They are written to the store as a new version and,
unless ``--no-switch``, the version is switched to: every ingress replica reads the
model log on its signals interval and ranks with the new vectors from then on, no
restart. A user's embedding is not stored: ranking derives it from the profile (the
recency-weighted sum of the recent engagements' vectors, serving/ranking.py), so
shards hold nothing that a switch would make stale. `persona model rollback` returns
to the version before.

The hyperparameters' defaults (``model_*`` settings) were chosen on the validation
split of MovieLens-100k (bench/RESULTS.md), never its test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from persona.settings import Settings


@dataclass(frozen=True)
class Interactions:
    """Users x items engagement weights (scipy CSR) and the ids of its columns."""

    matrix: object
    items: list[str]
    users: int
    events: int


def interactions(
    events: Iterable[tuple[str, str, str]], weights: Mapping[str, float]
) -> Interactions:
    """(user, item, action) triples -> the weighted matrix; hides and actions without a
    positive weight are left out, repeats add up."""
    from scipy import sparse

    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows, cols, values = [], [], []
    count = 0
    for user, item, action in events:
        count += 1
        weight = float(weights.get(action, 0.0))
        if action == "hide" or weight <= 0:
            continue
        rows.append(users.setdefault(user, len(users)))
        cols.append(items.setdefault(item, len(items)))
        values.append(weight)
    matrix = sparse.csr_matrix(
        (np.asarray(values, dtype=np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()
    return Interactions(matrix, list(items), len(users), count)


def fit_item_vectors(data: Interactions, settings: Settings, seed: int = 1) -> np.ndarray:
    """ALS item factors (``implicit``): confidence = ``model_alpha`` x engagement weight."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's own threads do the work
        model = AlternatingLeastSquares(
            factors=settings.model_factors,
            regularization=settings.model_regularization,
            iterations=settings.model_iterations,
            random_state=seed,
        )
        model.fit(data.matrix * settings.model_alpha, show_progress=False)
    return np.asarray(model.item_factors, dtype=np.float32)


def train_and_publish(
    store,
    events: Iterable[tuple[str, str, str]],
    settings: Settings,
    *,
    source: str,
    switch: bool = True,
    seed: int = 1,
) -> dict:
    """Train on ``events``, publish the version, switch to it unless told not to."""
    from actors import item_model
    from persona.errors import ConfigError

    started = time.monotonic()
    data = interactions(events, settings.action_weights)
    if not data.items:
        raise ConfigError(f"no engagements to learn from in {source}")
    vectors = fit_item_vectors(data, settings, seed)
    info = {
        "algorithm": "implicit ALS",
        "source": source,
        "events": data.events,
        "users": data.users,
        "factors": settings.model_factors,
        "regularization": settings.model_regularization,
        "alpha": settings.model_alpha,
        "iterations": settings.model_iterations,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    version = item_model.publish(store, data.items, vectors, info)
    serving = item_model.switch(store, version) if switch else None
    return {"version": version, "serving": serving, **info, "items": len(data.items)}


# --- where the events come from ---
def events_from_files(paths: list[str]) -> Iterable[tuple[str, str, str]]:
    """(user, item, action) of JSONL / Parquet files, read and parsed by Ray Data."""
    import ray

    from jobs.ingest import expand

    files = [str(p) for p in expand(paths)]
    parquet = [f for f in files if f.endswith(".parquet")]
    jsonl = [f for f in files if not f.endswith(".parquet")]
    columns = ["user_id", "item_id", "action"]
    for kind, group in (("parquet", parquet), ("json", jsonl)):
        if not group:
            continue
        reader = ray.data.read_parquet if kind == "parquet" else ray.data.read_json
        dataset = reader(group, **({"columns": columns} if kind == "parquet" else {}))
        for batch in dataset.select_columns(columns).iter_batches(batch_format="numpy"):
            yield from zip(
                batch["user_id"].tolist(),
                batch["item_id"].tolist(),
                batch["action"].tolist(),
                strict=True,
            )


def events_from_profiles(store, settings: Settings) -> Iterable[tuple[str, str, str]]:
    """(user, item, action) of every stored profile's recent actions."""
    from actors.profile import Profile, ProfileRules
    from storage import codec

    rules = ProfileRules.from_settings(settings)
    for user, blob in store.scan_profiles():
        profile = Profile.from_record(codec.decode(blob, what=f"profile {user}"), rules)
        for _ts, item, code in profile.recent:
            yield user, item, rules.actions[code]


def run(paths: list[str], settings: Settings, *, switch: bool = True, seed: int = 1) -> dict:
    """The job: join the cluster, read the events, train, publish, switch."""
    from jobs.common import fleet_for_job, join_ray

    join_ray(settings)
    if paths:
        from storage import open_store

        store = open_store(settings=settings)
        events, source = events_from_files(paths), f"{len(paths)} path(s): {', '.join(paths)}"
    else:
        fleet = fleet_for_job(settings)
        fleet.checkpoint()  # the store then holds every applied event's profile
        store, source = fleet.store, "the store's profiles"
        events = events_from_profiles(store, settings)
    return train_and_publish(store, events, settings, source=source, switch=switch, seed=seed)


def main(argv: list[str] | None = None) -> int:
    from jobs.common import settings_for_command
    from persona.errors import PersonaError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="event files, directories or globs")
    parser.add_argument("--no-switch", action="store_true", help="publish only")
    parser.add_argument("--factors", type=int, help="embedding dimension (model_factors)")
    parser.add_argument("--json", type=Path, help="write the summary here as JSON")
    args = parser.parse_args(argv)
    try:
        settings = settings_for_command()
        if args.factors:
            settings = replace(settings, model_factors=args.factors)
        result = run(args.paths, settings, switch=not args.no_switch)
    except PersonaError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    line = (
        f"trained {result['version']} on {result['events']:,} events ({result['users']:,} "
        f"users, {result['items']:,} items, {result['factors']} factors) in "
        f"{result['train_seconds']}s; serving: {result['serving'] or 'unchanged'}"
    )
    print(line, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
