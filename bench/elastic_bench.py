"""Elasticity benchmarks: moving a partition, reads during a scale-out, cold vs resident
reads, and ingest of many users under a resident cap.

    python -m bench.elastic_bench [--quick] [--store cassandra]

Prints one JSON line. Cassandra must be running for --store cassandra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time

from actors.routing import partition_of
from bench.common import as_dicts, bench_settings, drop, start_local_ray, synthetic_events
from storage import open_store


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0


def _fleet(settings):
    import ray

    from actors.fleet import Fleet

    if not ray.is_initialized():
        start_local_ray(settings.namespace)
    return Fleet.start(settings)


def move_one_partition(kind: str, users: int) -> dict:
    settings, keyspace = bench_settings(kind, partitions=64, shards=2)
    fleet = _fleet(settings)
    ids, n = [], 0
    while len(ids) < users:
        user = f"mover-{n}"
        if partition_of(user, settings.partitions) == 0:
            ids.append(user)
        n += 1
    now = time.time()
    events = [
        {
            "user_id": u,
            "item_id": f"i{k % 97}",
            "action": "view",
            "ts": now - k,
            "topics": ["a", "b"],
        }
        for k, u in enumerate(ids)
    ]
    for at in range(0, len(events), 5_000):
        fleet.apply(f"m-{at}", events[at : at + 5_000])
    source = fleet.owners[0]
    target = next(s for s in fleet.shards if s != source)
    report = fleet.move_partitions([(0, source, target)])
    start = time.perf_counter()
    got = fleet.get_profiles(ids[:1000])
    first_reads_s = time.perf_counter() - start
    assert len(got) == 1000
    fleet.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {
        "users_in_partition": users,
        "move_seconds": report[0]["seconds"],
        "first_1000_reads_after_move_s": first_reads_s,
    }


def reads_during_scale_out(kind: str, users: int) -> dict:
    settings, keyspace = bench_settings(kind, shards=2)
    fleet = _fleet(settings)
    events = as_dicts(synthetic_events(users * 2, users, seed=4))
    for at in range(0, len(events), 10_000):
        fleet.apply(f"s-{at}", events[at : at + 10_000])
    names = [f"user-{n}" for n in range(users)]

    from actors.fleet import Fleet

    def sample(seconds: float) -> list[float]:
        reader = Fleet.connect(settings)
        latencies, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            reader.get_profiles([random.choice(names)])
            latencies.append((time.perf_counter() - start) * 1000)
        return latencies

    steady = sample(5.0)
    during: list[float] = []
    thread = threading.Thread(target=lambda: during.extend(sample(12.0)))
    thread.start()
    time.sleep(1.0)
    started = time.perf_counter()
    fleet.scale(4)
    scale_s = time.perf_counter() - started
    thread.join()
    fleet.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {
        "users": users,
        "scale_2_to_4_s": scale_s,
        "steady_p50_ms": statistics.median(steady),
        "steady_p99_ms": _percentile(steady, 99),
        "during_p50_ms": statistics.median(during),
        "during_p99_ms": _percentile(during, 99),
        "during_max_ms": max(during),
    }


def cold_vs_resident(kind: str, users: int) -> dict:
    import ray

    settings, keyspace = bench_settings(kind, shards=1)
    fleet = _fleet(settings)
    events = as_dicts(synthetic_events(users * 2, users, seed=6))
    for at in range(0, len(events), 10_000):
        fleet.apply(f"c-{at}", events[at : at + 10_000])
    fleet.checkpoint()
    shard = next(iter(fleet.shards.values()))
    os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
    time.sleep(2.0)
    names = [f"user-{n}" for n in random.Random(1).sample(range(users), 1000)]
    while True:
        try:
            fleet.stats()
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    timings = {}
    for label in ("cold", "resident"):
        latencies = []
        for user in names:
            start = time.perf_counter()
            fleet.get_profiles([user])
            latencies.append((time.perf_counter() - start) * 1000)
        timings[label] = {
            "p50_ms": statistics.median(latencies),
            "p99_ms": _percentile(latencies, 99),
        }
    fleet.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {"reads": len(names), **timings}


def ingest_under_cap(kind: str, users: int, cap: int) -> dict:
    import asyncio

    settings, keyspace = bench_settings(kind, shards=2, max_resident_profiles=cap)
    fleet = _fleet(settings)
    events = as_dicts(synthetic_events(users, users, seed=7))

    async def run() -> int:
        slots = asyncio.Semaphore(4)
        total = 0

        async def one(n: int, batch: list[dict]) -> None:
            nonlocal total
            async with slots:
                total += (await fleet.apply_async(f"cap-{n}", batch))["applied"]

        await asyncio.gather(
            *(
                one(n, events[at : at + 10_000])
                for n, at in enumerate(range(0, len(events), 10_000))
            )
        )
        return total

    start = time.perf_counter()
    applied = asyncio.run(run())
    seconds = time.perf_counter() - start
    stats = fleet.stats()
    fleet.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {
        "users": users,
        "cap_per_shard": cap,
        "events": applied,
        "seconds": seconds,
        "events_per_s": applied / seconds,
        "max_resident": max(s["resident"] for s in stats),
        "evicted": sum(s["evicted"] for s in stats),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--store", default="cassandra", choices=["cassandra", "sqlite"])
    args = parser.parse_args(argv)
    quick = args.quick
    result = {
        "bench": "elastic",
        "store": args.store,
        "move": move_one_partition(args.store, 2_000 if quick else 10_000),
        "scale_out": reads_during_scale_out(args.store, 5_000 if quick else 20_000),
        "cold_vs_resident": cold_vs_resident(args.store, 5_000 if quick else 20_000),
        "ingest_under_cap": ingest_under_cap(
            args.store, 100_000 if quick else 1_000_000, 10_000 if quick else 100_000
        ),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
