"""Shard benchmarks: in-memory apply, fleet ingest with the journal, checkpoint, recovery, memory.

    python -m bench.shard_bench apply      [--events 10000 --users 100000 --batches 50]
    python -m bench.shard_bench ingest     [--events 1000000 --store cassandra]
    python -m bench.shard_bench checkpoint [--profiles 1000000 --store cassandra]
    python -m bench.shard_bench recovery   [--users 100000 --store cassandra]
    python -m bench.shard_bench memory     [--users 1000000]

Each prints one JSON line of figures. Cassandra must be running for --store cassandra
(`persona cassandra start`); each run uses a fresh keyspace and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import sys
import time
from collections import defaultdict

import numpy as np

from actors.profile import ProfileRules
from actors.profile_table import ProfileTable
from actors.shard_state import CHECKPOINT_CHUNK, ShardState
from bench.common import (
    T0,
    as_dicts,
    bench_settings,
    drop,
    machine_cpu,
    start_local_ray,
    store_url,
    synthetic_events,
)
from persona.settings import load_settings
from storage import open_store

# --- in-memory apply -------------------------------------------------------------------


def naive_apply(state: dict, events: list[tuple]) -> None:
    """The peer baseline: a dict-of-dicts update per event, as a first version would."""
    for user, item, action, ts, topics, _w in events:
        profile = state.setdefault(user, {"counts": defaultdict(int), "topics": {}, "recent": []})
        profile["counts"][action] += 1
        for topic in topics:
            profile["topics"][topic] = profile["topics"].get(topic, 0.0) + 1.0
        profile["recent"].append((ts, item, action))
        if len(profile["recent"]) > 100:
            profile["recent"].pop(0)


def bench_apply(args) -> dict:
    """Steady state: every user already resident, batches of mostly distinct users."""
    settings = load_settings()
    state = ShardState("bench", open_store("sqlite:///:memory:"), settings, 256)
    batches = [synthetic_events(args.events, args.users, seed=n) for n in range(args.batches)]
    everyone = [(f"user-{n}", "item-0", "view", T0, (), 1.0) for n in range(args.users)]
    state.apply_in_memory(everyone, 1)
    for n, batch in enumerate(batches[:5]):
        state.apply_in_memory(batch, n + 2)
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        state.apply_in_memory(batch, 100 + n)
    apply_s = time.perf_counter() - start
    dict_batches = [as_dicts(b) for b in batches[:10]]
    start = time.perf_counter()
    for batch in dict_batches:
        state.validator.validate(batch)
    validate_s = (time.perf_counter() - start) / len(dict_batches) * len(batches)
    naive: dict = {}
    start = time.perf_counter()
    for batch in batches:
        naive_apply(naive, batch)
    naive_s = time.perf_counter() - start
    total = args.events * len(batches)
    lookups = id_lookups(batches)
    return {
        "bench": "apply",
        "events": total,
        "users": args.users,
        "apply_events_per_s": total / apply_s,
        "validate_events_per_s": total / validate_s,
        "validate_and_apply_events_per_s": total / (apply_s + validate_s),
        "naive_dict_events_per_s": total / naive_s,
        # The floor of any per-event work here: resolving the event's string ids
        # (user, item, each topic) to numbers, one dict lookup each.
        "id_lookups_per_event": lookups[0],
        "id_lookup_ns": lookups[1],
    }


def id_lookups(batches: list[list[tuple]]) -> tuple[float, float]:
    """(string ids per event, ns per dict lookup) over the batches, against dicts of
    every user, item and topic, as the shard holds them."""
    users, items, topics = {}, {}, {}
    for batch in batches:
        for user, item, _a, _ts, event_topics, _w in batch:
            users.setdefault(user, len(users))
            items.setdefault(item, len(items))
            for topic in event_topics:
                topics.setdefault(topic, len(topics))
    fresh = [[tuple(e) for e in _unpickled(b)] for b in batches]
    lookups = sum(2 + len(e[4]) for b in fresh for e in b)
    start = time.perf_counter()
    for batch in fresh:
        [users.get(e[0]) for e in batch]
        [items.get(e[1]) for e in batch]
        [topics.get(t) for e in batch for t in e[4]]
    seconds = time.perf_counter() - start
    return lookups / sum(map(len, fresh)), seconds / lookups * 1e9


def _unpickled(batch: list[tuple]) -> list[tuple]:
    """The batch as a shard receives it: new string objects (hashes not cached yet)."""
    import pickle

    return pickle.loads(pickle.dumps(batch))


# --- end-to-end ingest ---------------------------------------------------------------


def process_cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named group of processes, and by the local
    Cassandra node (a JVM) if one runs here; from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def seconds(pids) -> float:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return total / tick

    jvm = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"CassandraDaemon" in f.read():
                        jvm.append(int(entry))
            except OSError:
                pass
    return {**{name: seconds(pids) for name, pids in groups.items()}, "cassandra": seconds(jvm)}


def bench_ingest(args) -> dict:
    import ray

    from actors.fleet import Fleet

    settings, keyspace = bench_settings(
        args.store, shards=args.shards, checkpoint_dirty_threshold=10**9
    )
    start_local_ray(settings.namespace)
    fleet = Fleet.start(settings)
    batch_size = args.batch
    events = as_dicts(synthetic_events(args.events, args.users))
    batches = [events[at : at + batch_size] for at in range(0, len(events), batch_size)]

    async def run() -> dict:
        in_flight = asyncio.Semaphore(args.in_flight)
        totals = defaultdict(int)

        async def one(n: int, batch: list[dict]) -> None:
            async with in_flight:
                ack = await fleet.apply_async(f"bench-{n}", batch)
                for key in ("applied", "duplicate", "rejected"):
                    totals[key] += ack[key]

        await asyncio.gather(*(one(n, b) for n, b in enumerate(batches)))
        return dict(totals)

    shard_pids = [ray.get(h.pid.remote()) for h in fleet.shards.values()]
    groups = {"fleet (validation, routing)": [os.getpid()], "shards": shard_pids}
    busy_before, total_before = machine_cpu()
    cpu_before = process_cpu(groups)
    start = time.perf_counter()
    totals = asyncio.run(run())
    seconds = time.perf_counter() - start
    busy_after, total_after = machine_cpu()
    cpu_after = process_cpu(groups)
    busy = (busy_after - busy_before) / max(1, total_after - total_before)
    read_ms = []
    names = [f"user-{n}" for n in range(args.users)]
    rng = random.Random(3)
    deadline = time.monotonic() + args.read_seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        fleet.get_profiles([rng.choice(names)])
        read_ms.append((time.perf_counter() - began) * 1000)
    read_ms.sort()
    fleet.shutdown()
    ray.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {
        "bench": "ingest",
        "store": args.store,
        "shards": args.shards,
        "batch": batch_size,
        "events": len(events),
        "seconds": seconds,
        "events_per_s": totals["applied"] / seconds,
        # How busy the whole machine was (all cores): near 1.0 means the figure is
        # bounded by CPU, and busy * cores / events_per_s is the CPU cost per event.
        "machine_busy": busy,
        "cpu_us_per_event": busy * (os.cpu_count() or 1) * seconds / totals["applied"] * 1e6,
        "cpu_us_per_event_by_process": {
            name: (cpu_after[name] - cpu_before[name]) / totals["applied"] * 1e6
            for name in cpu_after
        },
        "read_p50_ms": read_ms[len(read_ms) // 2] if read_ms else None,
        "read_p99_ms": read_ms[int(len(read_ms) * 0.99)] if read_ms else None,
        **totals,
    }


# --- peer baseline: a naive dict-of-dicts actor --------------------------------------


class NaiveActor:
    """What a first version would write: dict-of-dicts updates, no journal, no decay."""

    def __init__(self) -> None:
        self.state: dict = {}

    def apply(self, events: list[tuple]) -> int:
        naive_apply(self.state, events)
        return len(events)


def bench_naive_ingest(args) -> dict:
    import ray

    start_local_ray()
    actors = [ray.remote(NaiveActor).remote() for _ in range(args.shards)]
    events = synthetic_events(args.events, args.users)
    batches = [events[at : at + args.batch] for at in range(0, len(events), args.batch)]
    start = time.perf_counter()
    pending = []
    for batch in batches:
        # Route by user like the fleet does, one call per actor per batch.
        parts: dict[int, list] = defaultdict(list)
        for event in batch:
            parts[hash(event[0]) % len(actors)].append(event)
        pending += [actors[i].apply.remote(part) for i, part in parts.items()]
        if len(pending) > 4 * len(actors):
            ray.get(pending[: len(actors)])
            pending = pending[len(actors) :]
    ray.get(pending)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {
        "bench": "naive_ingest",
        "shards": args.shards,
        "events": len(events),
        "events_per_s": len(events) / seconds,
    }


# --- checkpoint ----------------------------------------------------------------------


def populated_state(name: str, store, settings, users: int) -> ShardState:
    state = ShardState(name, store, settings, 256)
    events = synthetic_events(users * 5, users, seed=3)
    for at in range(0, len(events), 100_000):
        state.apply_in_memory(events[at : at + 100_000], 1 + at // 100_000)
    return state


def bench_checkpoint(args) -> dict:
    settings = load_settings()
    url, keyspace = store_url(args.store, settings)
    store = open_store(url, settings)
    state = populated_state("bench", store, settings, args.profiles)
    state.last_seq = 1
    # The shard's own checkpoint steps: encode chunks on this thread, write the
    # previous chunk meanwhile.
    start = time.perf_counter()
    seq, users, meta = state.begin_checkpoint()
    asyncio.run(state.write_profiles(users, CHECKPOINT_CHUNK))
    state.finish_checkpoint(seq, meta)
    seconds = time.perf_counter() - start
    started = time.perf_counter()
    for at in range(0, len(users), CHECKPOINT_CHUNK):
        state.encode_profiles(users[at : at + CHECKPOINT_CHUNK])
    encode_s = time.perf_counter() - started
    drop(store, keyspace)
    return {
        "bench": "checkpoint",
        "store": args.store,
        "profiles": len(users),
        "seconds": seconds,
        "encode_seconds": encode_s,
        "profiles_per_s": len(users) / seconds,
    }


# --- recovery ------------------------------------------------------------------------


def bench_recovery(args) -> dict:
    import signal

    import ray

    from actors.fleet import Fleet

    settings, keyspace = bench_settings(args.store, shards=1, checkpoint_dirty_threshold=10**9)
    start_local_ray(settings.namespace)
    fleet = Fleet.start(settings)
    events = as_dicts(synthetic_events(args.users * 3, args.users, seed=5))
    batches = [events[at : at + 10_000] for at in range(0, len(events), 10_000)]
    half = len(batches) // 2
    for n, batch in enumerate(batches[:half]):
        fleet.apply(f"b{n}", batch)
    fleet.checkpoint()
    for n, batch in enumerate(batches[half:], start=half):
        fleet.apply(f"b{n}", batch)
    sample = sorted({e["user_id"] for e in events})
    expected_events = sum(p["n"] for p in fleet.get_profiles(sample).values())
    shard = next(iter(fleet.shards.values()))
    os.kill(ray.get(shard.pid.remote()), signal.SIGKILL)
    start = time.perf_counter()
    probe = sample[:: max(1, len(sample) // 100)]
    while True:
        try:
            fleet.get_profiles(probe)
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    started_full = time.perf_counter()
    got = fleet.get_profiles(sample)
    full_read_s = time.perf_counter() - started_full
    stats = fleet.stats()[0]
    assert sum(p["n"] for p in got.values()) == expected_events, "recovered data differs"
    fleet.shutdown()
    ray.shutdown()
    drop(open_store(settings=settings), keyspace)
    return {
        "bench": "recovery",
        "store": args.store,
        "users": len(sample),
        "journal_rows_replayed": len(batches) - half,
        "actor_recovery_s": stats["recovery_s"],
        # Kill to the restarted shard answering reads (every user's data is there:
        # replayed in memory or loaded on demand); the full read-back is separate.
        "kill_to_answering_s": seconds,
        "read_back_all_users_s": full_read_s,
    }


# --- memory --------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def bench_memory(args) -> dict:
    """Resident bytes per profile of 20 topics and 50 recent actions: the profile
    table as shards hold it, and (for 100k users) one Profile object per user as the
    first version held them."""
    settings = load_settings()
    rules = ProfileRules.from_settings(settings)
    rng = np.random.default_rng(9)
    gc.collect()
    before = rss_bytes()
    table = ProfileTable(rules)
    for at in range(0, args.users, 100_000):
        _fill_rows(table, range(at, min(args.users, at + 100_000)), rng)
    gc.collect()
    after = rss_bytes()
    objects = min(args.users, 100_000)
    before_objects = rss_bytes()
    kept = [table.get(f"user-{n}") for n in range(objects)]
    gc.collect()
    object_bytes = (rss_bytes() - before_objects) / objects
    del kept
    return {
        "bench": "memory",
        "users": args.users,
        "topics_per_user": 20,
        "recent_per_user": 50,
        "bytes_per_profile": (after - before) / args.users,
        "dense_row_bytes": table.nbytes() / table.capacity,
        "object_model_bytes_per_profile": object_bytes,
    }


def _fill_rows(table: ProfileTable, numbers: range, rng) -> None:
    """Profiles of 20 topics (of 500) and 50 recent actions (of 100k items), written
    straight into the table's arrays: building them event by event takes minutes."""
    count = len(numbers)
    rows = table._rows_for([f"user-{n}" for n in numbers])
    if len(table.topics) < 500:
        table.topics.encode([f"topic-{t}" for t in range(500)])
        table.items.encode([f"item-{i}" for i in range(100_000)])
    table.events[rows] = table.counts[rows, 0] = 50
    table.version[rows] = 1
    table.t0[rows] = table.first_seen[rows] = T0
    table.last_seen[rows] = T0 + 50
    table.n_topics[rows] = 20
    table.topic_ids[rows, :20] = 1 + np.argpartition(rng.random((count, 500)), 20, axis=1)[:, :20]
    table.topic_scores[rows, :20] = rng.random((count, 20))
    table.n_recent[rows] = 50
    table.recent_ts[rows, :50] = T0 + np.arange(50)
    table.recent_item[rows, :50] = rng.integers(1, 100_001, (count, 50))
    table.recent_code[rows, :50] = 0
    table.dirty[rows] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "which", choices=["apply", "ingest", "naive_ingest", "checkpoint", "recovery", "memory"]
    )
    parser.add_argument("--read-seconds", type=float, default=5.0, help="ingest: read sampling")
    parser.add_argument("--events", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--store", default="cassandra", choices=["cassandra", "sqlite"])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    defaults = {
        "apply": (10_000, 100_000),
        "ingest": (1_000_000, 100_000),
        "naive_ingest": (1_000_000, 100_000),
        "recovery": (0, 100_000),
        "memory": (0, 1_000_000),
        "checkpoint": (0, 0),
    }[args.which]
    args.events = args.events or defaults[0]
    args.users = args.users or defaults[1]
    runner = globals()[f"bench_{args.which}"]
    result = runner(args)
    result.update(cpus=os.cpu_count(), python=sys.version.split()[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
