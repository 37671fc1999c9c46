"""`persona demo`: the whole system on one machine, end to end.

Generates a small synthetic data set, loads its catalog, ingests its events with
the progress bar, trains item embeddings from the stored profiles (the training
job, published and switched to), starts the HTTP API, prints a real profile and its
recommendations fetched over HTTP, prints an offline evaluation of the same data
before and after training, and keeps serving until Ctrl-C (``--once`` stops after
the walkthrough). Embedded defaults: local Ray and SQLite; pass
``--store cassandra://...`` for the same against Cassandra.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from persona.settings import Settings

DEMO_EVALUATION_USERS = 300


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _load_catalog(store, items_file: Path) -> int:
    from actors.catalog import encode_item

    items = {}
    with items_file.open() as f:
        for line in f:
            item = json.loads(line)
            items[item["item_id"]] = encode_item(item)
    store.upsert_items(items)
    return len(items)


def _evaluation(data: Path, settings: Settings) -> str:
    """`persona evaluate` on a sample of the demo's users: the last 20% of each one's
    events held out, Persona before and after its training job, next to baselines."""
    from jobs.datasets import load
    from jobs.evaluate import FILE_HOLDOUT, evaluate, markdown

    result = evaluate(
        load(str(data / "events.jsonl"), settings.data_dir),
        holdout=FILE_HOLDOUT,
        users=DEMO_EVALUATION_USERS,
        baselines=("popularity", "item-knn"),
        settings=settings,
    )
    return (
        f"Offline evaluation ({result['users_evaluated']} users, last 20% of their events "
        f"held out; `persona evaluate {data / 'events.jsonl'}`):\n" + markdown(result["test"])
    )


def run(
    settings: Settings, *, once: bool, users: int, items: int, events: int, out=sys.stdout
) -> int:
    import ray
    from ray import serve

    from jobs import ingest
    from jobs.common import fleet_for_job
    from jobs.generate import generate
    from serving.app import build_app

    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731 - local shorthand
    data = Path(settings.data_dir) / "demo"
    say(
        f"1. Generating a synthetic engagement log ({users:,} users, {items:,} items, "
        f"{events:,} events) in {data}"
    )
    summary = generate(data, users=users, items=items, events=events, seed=7)
    say(f"   {summary['events']:,} events written")

    say(f"2. Starting the shards (store: {settings.resolved_store_url()})")
    fleet = fleet_for_job(settings, join_local_head=False)
    say(f"   {len(fleet.shards)} shards over {fleet.partitions} partitions")
    say(f"   catalog: {_load_catalog(fleet.store, data / 'items.jsonl'):,} items")

    say("3. Ingesting the events (exactly once: a rerun reports them as duplicates)")
    result = ingest.run([str(data / "events.jsonl")], settings=settings, distributed=False)
    say(f"   {result.line()}")
    for checkpoint in fleet.checkpoint():
        say(f"   checkpoint {checkpoint['shard']}: {checkpoint['profiles']} profiles")

    say("4. Training item embeddings from the stored profiles (python -m jobs.train_embeddings)")
    from jobs import train_embeddings

    model = train_embeddings.run([], settings)
    say(
        f"   {model['version']}: {model['items']:,} items x {model['factors']} from "
        f"{model['events']:,} events in {model['train_seconds']}s; serving it now"
    )

    say("5. Starting the HTTP API (Ray Serve)")
    serve.start(http_options={"host": "127.0.0.1", "port": settings.http_port})
    serve.run(build_app(settings), name="persona", route_prefix="/")
    base = f"http://127.0.0.1:{settings.http_port}"
    counts = Counter()
    with (data / "events.jsonl").open() as f:
        for line in f:
            counts[json.loads(line)["user_id"]] += 1
    user = counts.most_common(1)[0][0]
    time.sleep(settings.signals_refresh_s + 1)

    profile = _get(f"{base}/v1/users/{user}/profile")
    say(f"\n6. Profile of {user} (GET /v1/users/{user}/profile):")
    say(f"   events {profile['events']}, counters {profile['counters']}")
    say(
        "   top interests: "
        + ", ".join(f"{i['topic']} ({i['score']:.2f})" for i in profile["interests"][:5])
    )
    say(
        "   recent: "
        + ", ".join(f"{a['action']} {a['item_id']}" for a in profile["recent_actions"][:5])
    )
    recs = _get(f"{base}/v1/users/{user}/recommendations?k=8")
    say(f"\n7. Recommendations for {user} (variant {recs['variant']}, model {recs['model']}):")
    for item in recs["items"]:
        say(f"   {item['item_id']}  {item['score']:.3f}  {item['reason']}")
    say(f"\n8. {_evaluation(data, settings)}")
    say(f"\nAPI:  {base}/v1/users/{user}/profile")
    say(f"Docs: {base}/docs")
    if once:
        serve.shutdown()
        fleet.shutdown()
        ray.shutdown()
        return 0
    say("Serving until Ctrl-C ...")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")
    serve.shutdown()
    ray.shutdown()
    return 0
