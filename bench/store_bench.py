"""Store throughput: write and read N profiles of ~1 KB through each store, in profiles/s.

    python -m bench.store_bench [--profiles 100000] [--stores sqlite,cassandra]

Cassandra must be running (`persona cassandra start`); the bench uses its own
keyspace (persona_bench, replication 1, LOCAL_QUORUM) and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from persona.settings import load_settings
from storage import codec, open_store

CHUNK = 5_000
FEAST_SAMPLE = 2_000


def _profiles(count: int) -> dict[str, bytes]:
    # ~1 KB: 20 topics, 20 recent actions, counters -- what a real profile carries.
    blobs = {}
    for i in range(count):
        user = f"user-{i:08d}"
        blobs[user] = codec.encode(
            {
                "v": 1,
                "counts": {"view": i % 97, "click": i % 13, "save": i % 5},
                "topics": {f"topic-{(i + t) % 500}": [t * 0.37, 1.7e9] for t in range(20)},
                "recent": [[f"item-{(i * 7 + r) % 100000}", 0, 1.7e9 + r] for r in range(20)],
            }
        )
    return blobs


def measure(store, profiles: dict[str, bytes]) -> dict[str, float]:
    keys = list(profiles)
    start = time.perf_counter()
    for at in range(0, len(keys), CHUNK):
        store.put_profiles({k: profiles[k] for k in keys[at : at + CHUNK]})
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    read = 0
    for at in range(0, len(keys), CHUNK):
        read += len(store.get_profiles(keys[at : at + CHUNK]))
    read_s = time.perf_counter() - start
    assert read == len(keys), f"read back {read} of {len(keys)} profiles"
    return {
        "profiles": len(keys),
        "avg_bytes": sum(map(len, profiles.values())) / len(keys),
        "write_per_s": len(keys) / write_s,
        "read_per_s": len(keys) / read_s,
    }


def feast_style(store, profiles: dict[str, bytes]) -> dict[str, float]:
    """The peer baseline: one row per feature, as Feast's Cassandra online store writes
    (entity, feature) rows with execute_concurrent at concurrency 100."""
    from cassandra.concurrent import execute_concurrent_with_args

    session = store._session
    session.execute(
        "CREATE TABLE IF NOT EXISTS feature_rows (entity text, feature text, value blob, "
        "PRIMARY KEY (entity, feature))"
    )
    insert = session.prepare("INSERT INTO feature_rows (entity, feature, value) VALUES (?, ?, ?)")
    rows = []
    # A sample is enough for a rate, and the row-per-feature path is slow.
    sample = dict(list(profiles.items())[:FEAST_SAMPLE])
    for user, blob in sample.items():
        record = codec.decode(blob)
        features = {f"count:{a}": n for a, n in record["counts"].items()}
        features.update({f"topic:{t}": v[0] for t, v in record["topics"].items()})
        features["recent"] = len(record["recent"])
        rows += [(user, name, str(value).encode()) for name, value in features.items()]
    start = time.perf_counter()
    execute_concurrent_with_args(session, insert, rows, concurrency=100, raise_on_first_error=True)
    seconds = time.perf_counter() - start
    return {
        "profiles_per_s": len(sample) / seconds,
        "rows_per_s": len(rows) / seconds,
        "rows_per_profile": len(rows) / len(sample),
    }


def run(count: int, stores: list[str]) -> dict[str, dict]:
    settings = load_settings()
    profiles = _profiles(count)
    results = {}
    if "sqlite" in stores:
        with tempfile.TemporaryDirectory() as tmp, open_store(f"sqlite:///{tmp}/bench.db") as st:
            results["sqlite"] = measure(st, profiles)
    if "cassandra" in stores:
        url = (
            f"cassandra://127.0.0.1:{settings.cassandra_port}/persona_bench"
            "?replication=1&consistency=LOCAL_QUORUM"
        )
        with open_store(url, settings) as st:
            try:
                results["cassandra"] = measure(st, profiles)
                results["cassandra"]["concurrency"] = st.options.write_concurrency
                results["feast_style_cassandra"] = feast_style(st, profiles)
            finally:
                st._session.execute("DROP KEYSPACE IF EXISTS persona_bench")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--stores", default="sqlite,cassandra")
    args = parser.parse_args()
    results = run(args.profiles, args.stores.split(","))
    for name, figures in results.items():
        if "write_per_s" not in figures:
            continue
        print(
            f"{name:9s} {figures['profiles']:>8,} profiles of {figures['avg_bytes']:.0f} B: "
            f"write {figures['write_per_s']:>9,.0f}/s  read {figures['read_per_s']:>9,.0f}/s"
        )
    print(json.dumps({"store_bench": results, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
