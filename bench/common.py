"""What the benchmarks share: a fresh local Ray, a throwaway store, synthetic events."""

from __future__ import annotations

import random
import tempfile
import time
import uuid

T0 = time.time() - 30 * 86_400
ACTIONS = ["view"] * 14 + ["click"] * 4 + ["save", "like", "hide"]


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def start_local_ray(namespace: str | None = None) -> None:
    """A new single-machine Ray for this benchmark process (never an existing cluster)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        namespace=namespace,
        include_dashboard=False,
        logging_level="error",
        resources={"persona_shard": 64},
    )


def store_url(kind: str, settings) -> tuple[str, str | None]:
    """A fresh store of the given kind, and the Cassandra keyspace to drop afterwards."""
    if kind == "cassandra":
        keyspace = f"persona_bench_{uuid.uuid4().hex[:8]}"
        return (
            f"cassandra://127.0.0.1:{settings.cassandra_port}/{keyspace}"
            "?replication=1&consistency=LOCAL_QUORUM",
            keyspace,
        )
    return f"sqlite:///{tempfile.mkdtemp()}/bench.db", None


def bench_settings(kind: str, **overrides):
    """Settings for one benchmark fleet: a fresh store of ``kind``, its own namespace,
    no periodic checkpoints; returns (settings, keyspace to drop or None)."""
    from persona.settings import load_settings

    url, keyspace = store_url(kind, load_settings())
    defaults = {"namespace": f"bench-{uuid.uuid4().hex[:6]}", "checkpoint_interval_s": 3600}
    return load_settings(store_url=url, **{**defaults, **overrides}), keyspace


def drop(store, keyspace: str | None) -> None:
    if keyspace:
        store._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    store.close()


def synthetic_events(count: int, users: int, items: int = 100_000, seed: int = 1) -> list[tuple]:
    rng = random.Random(seed)
    topics = [f"topic-{t}" for t in range(500)]
    return [
        (
            f"user-{rng.randrange(users)}",
            f"item-{rng.randrange(items)}",
            rng.choice(ACTIONS),
            T0 + rng.uniform(0, 30 * 86_400),
            (topics[rng.randrange(500)], topics[rng.randrange(500)]),
            1.0,
        )
        for _ in range(count)
    ]


def as_dicts(events: list[tuple]) -> list[dict]:
    return [
        {"user_id": u, "item_id": i, "action": a, "ts": ts, "topics": list(t)}
        for u, i, a, ts, t, _w in events
    ]
