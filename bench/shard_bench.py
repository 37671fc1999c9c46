"""Shard benchmarks: in-memory apply, fleet ingest with the journal, checkpoint, recovery, memory.

    python -m bench.shard_bench apply      [--events 10000 --users 100000 --batches 50]
    python -m bench.shard_bench ingest     [--events 1000000 --store cassandra]
    python -m bench.shard_bench dedup      [--events 1000000 --sources file|request --batch 10000]
    python -m bench.shard_bench checkpoint [--profiles 1000000 --store cassandra]
    python -m bench.shard_bench recovery   [--users 100000 --store cassandra]
    python -m bench.shard_bench memory     [--users 1000000]

`dedup` is `ingest` with the shards' dedup work timed inside them (nothing is
turned off), followed by the same dedup work in isolation on the same batches.

Each prints one JSON line of figures. Cassandra must be running for --store cassandra
(`persona cassandra start`); each run uses a fresh keyspace and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import random
import resource
import sys
import time
import uuid
from collections import defaultdict

import numpy as np

from actors.dedup import dedup_key
from actors.freshness import Freshness
from actors.profile import HIDE, STORED_SCALARS, ProfileRules
from actors.profile_table import ProfileTable
from actors.shard_state import CHECKPOINT_CHUNK, CheckedBatch, ShardState
from bench.checkpoint_bench import code_version
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
    # Freshness on the same batches: what ShardState.commit adds per applied batch.
    freshness = Freshness()
    start = time.perf_counter()
    for batch in batches:
        freshness.record(batch, time.time() - 0.01, time.time(), time.monotonic())
    freshness_s = time.perf_counter() - start
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
        "freshness_record_ns_per_event": freshness_s / total * 1e9,
        "freshness_share_of_apply": freshness_s / apply_s,
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


def process_cpu(groups: dict[str, list[int]], jvm: list[int] | None = None) -> dict[str, float]:
    """CPU seconds used so far by each named group of processes, and by the local
    Cassandra node (a JVM) if one runs here: ``jvm`` if given (the node serving the
    benchmark's store), else every CassandraDaemon; from /proc."""
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

    if jvm is not None:
        return {**{name: seconds(pids) for name, pids in groups.items()}, "cassandra": seconds(jvm)}
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


def ingest_batches(kind: str, events: list, batch_size: int) -> list[tuple]:
    """(source, events, lines) per batch, as each kind of client sends them:

    batch    the benchmark's own id per batch, lines = indexes (the recorded runs);
    file     `persona ingest` of one file: the file's identity, its line numbers;
    request  the HTTP API: a fresh client-scoped Idempotency-Key per batch, indexes."""
    batches = []
    identity = f"events.jsonl:{len(events) * 160}:{uuid.uuid4().hex[:16]}"
    client = "client-" + uuid.uuid4().hex[:16]
    for n, at in enumerate(range(0, len(events), batch_size)):
        part = events[at : at + batch_size]
        if kind == "file":
            batches.append((identity, part, list(range(at + 1, at + 1 + len(part)))))
        elif kind == "request":
            batches.append((f"{client}:{uuid.uuid4().hex}", part, None))
        else:
            batches.append((f"bench-{n}", part, None))
    return batches


def node_pids(settings) -> list[int] | None:
    """The pid of the local Cassandra node serving the benchmark's store, if it runs here
    (other nodes on the machine, another benchmark's, are not charged to this one)."""
    if not settings.store_url.startswith("cassandra"):
        return []
    from storage.cassandra_local import LocalNode

    pid = LocalNode.from_settings(settings).running_pid()
    return [pid] if pid else None


def bench_ingest(args, dedup_share: bool = False) -> dict:
    import ray

    from actors.fleet import Fleet

    settings, keyspace = bench_settings(
        args.store, shards=args.shards, checkpoint_dirty_threshold=10**9
    )
    start_local_ray(settings.namespace)
    try:
        fleet = Fleet.start(settings)
        return _ingest(args, settings, fleet, dedup_share)
    finally:
        ray.shutdown()
        drop(open_store(settings=settings), keyspace)


def _ingest(args, settings, fleet, dedup_share: bool) -> dict:
    import ray

    batch_size = args.batch
    raw = synthetic_events(args.events, args.users)
    events = as_dicts(raw)
    batches = ingest_batches(args.sources, events, batch_size)
    failures: list[str] = []

    async def run() -> dict:
        in_flight = asyncio.Semaphore(args.in_flight)
        totals = defaultdict(int)

        async def one(source: str, batch: list[dict], lines: list[int] | None) -> None:
            async with in_flight:
                try:
                    ack = await fleet.apply_async(source, batch, lines=lines)
                except Exception as exc:  # counted and named: the others go on
                    failures.append(f"{type(exc).__name__}: {exc}"[:400])
                    return
                for key in ("applied", "duplicate", "rejected"):
                    totals[key] += ack[key]

        await asyncio.gather(*(one(*b) for b in batches))
        return dict(totals)

    if dedup_share:
        ray.get([h.__ray_call__.remote(_time_dedup) for h in fleet.shards.values()])
    shard_pids = [ray.get(h.pid.remote()) for h in fleet.shards.values()]
    groups = {"fleet (validation, routing)": [os.getpid()], "shards": shard_pids}
    jvm = node_pids(settings)
    load_before = os.getloadavg()[0]
    busy_before, total_before = machine_cpu()
    cpu_before = process_cpu(groups, jvm)
    start = time.perf_counter()
    totals = asyncio.run(run())
    seconds = time.perf_counter() - start
    busy_after, total_after = machine_cpu()
    cpu_after = process_cpu(groups, jvm)
    busy = (busy_after - busy_before) / max(1, total_after - total_before)
    timers = (
        [ray.get(h.__ray_call__.remote(_read_timers)) for h in fleet.shards.values()]
        if dedup_share
        else []
    )
    read_ms = []
    names = [f"user-{n}" for n in range(args.users)]
    rng = random.Random(3)
    deadline = time.monotonic() + args.read_seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        fleet.get_profiles([rng.choice(names)])
        read_ms.append((time.perf_counter() - began) * 1000)
    read_ms.sort()
    # Each shard's freshness over the run: arrival at the fleet -> applied is the
    # write path's delay under this load (the synthetic events' own times are old).
    freshness = {s["name"]: s["freshness"] for s in fleet.stats()}
    fleet.shutdown()
    ray.shutdown()
    if failures and not dedup_share:
        raise RuntimeError(f"{len(failures)} batches failed; the first: {failures[0]}")
    applied = max(1, totals.get("applied", 0))
    by_process = {name: (cpu_after[name] - cpu_before[name]) / applied * 1e6 for name in cpu_after}
    result = {
        "bench": "dedup" if dedup_share else "ingest",
        "store": args.store,
        "shards": args.shards,
        "batch": batch_size,
        "sources": args.sources,
        "events": len(events),
        "seconds": seconds,
        "events_per_s": totals["applied"] / seconds,
        # How busy the whole machine was (all cores): near 1.0 means the figure is
        # bounded by CPU, and busy * cores / events_per_s is the CPU cost per event.
        "machine_busy": busy,
        "cpu_us_per_event": busy * (os.cpu_count() or 1) * seconds / applied * 1e6,
        "cpu_us_per_event_by_process": by_process,
        # The processes of this benchmark only (the machine may be shared).
        "own_cpu_us_per_event": sum(by_process.values()),
        "read_p50_ms": read_ms[len(read_ms) // 2] if read_ms else None,
        "read_p99_ms": read_ms[int(len(read_ms) * 0.99)] if read_ms else None,
        # The machine may be shared: its 1-minute load average before and after.
        "loadavg": [load_before, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "failed_batches": len(failures),
        "first_error": failures[0] if failures else None,
        "freshness": freshness,
        **totals,
    }
    if dedup_share:
        with open_store(settings=settings) as store:
            result.update(dedup_figures(timers, applied, by_process))
            isolated = dedup_isolated(
                load_settings(store_url=settings.store_url),
                store,
                ingest_batches_as_tuples(batches, raw),
                args.shards,
                jvm,
                result["events_per_s"],
            )
            result["isolated"] = isolated
            own = result["own_cpu_us_per_event"]
            result["isolated_share_of_own_cpu"] = isolated["dedup_cpu_us_per_event"] / own
            result["isolated_with_cassandra_share_of_own_cpu"] = (
                isolated["dedup_cpu_us_per_event"] + isolated["cassandra_cpu_us_per_event"]
            ) / own
    return result


def bench_dedup(args) -> dict:
    return bench_ingest(args, dedup_share=True)


# --- what dedup costs on the write path ---------------------------------------------

# The dedup work of a shard's write path, by the name it is timed under inside the
# shards; "prepare" and "commit" contain "dedup.seen" and "dedup.record" and are kept
# for scale.
DEDUP_WORK = (
    "dedup_keys",
    "dedup.unknown",
    "fetch_dedup",
    "install_dedup",
    "dedup.seen",
    "dedup.record",
)


def _time_dedup(shard) -> int:
    """Run inside a shard (``__ray_call__``): time its dedup work per call, as CPU of
    the calling thread and wall time, without changing what it does."""
    import time as clock

    state = shard.state
    timers: dict[str, list] = {}
    state._bench_timers = timers

    def wrap(owner, name: str, label: str, count) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            cpu, wall = clock.thread_time(), clock.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                t = timers.setdefault(label, [0, 0, 0.0, 0.0])
                t[0] += 1
                t[1] += count(args)
                t[2] += clock.thread_time() - cpu
                t[3] += clock.perf_counter() - wall

        setattr(owner, name, timed)

    # dedup_keys takes a CheckedBatch from the shard (its events elsewhere).
    wrap(state, "dedup_keys", "dedup_keys", lambda a: len(getattr(a[1], "events", a[1])))
    wrap(state, "fetch_dedup", "fetch_dedup", lambda a: len(a[0]))
    wrap(state, "install_dedup", "install_dedup", lambda a: len(a[0][0]))
    wrap(state, "prepare", "prepare", lambda a: len(a[1].events))
    wrap(state, "commit", "commit", lambda a: len(a[0].events))
    wrap(state.dedup, "unknown", "dedup.unknown", lambda a: 0)
    wrap(state.dedup, "seen", "dedup.seen", lambda a: len(a[1]))
    wrap(state.dedup, "record", "dedup.record", lambda a: len(a[2]))
    real_load = state.load_dedup

    async def load_dedup(keys):
        wall = clock.perf_counter()
        try:
            return await real_load(keys)
        finally:
            t = timers.setdefault("load_dedup", [0, 0, 0.0, 0.0])
            t[0] += 1
            t[3] += clock.perf_counter() - wall

    state.load_dedup = load_dedup
    return os.getpid()


def _read_timers(shard) -> dict:
    return {
        "timers": dict(shard.state._bench_timers),
        "entries": len(shard.state.dedup),
        "dirty_entries": len(shard.state.dedup.dirty),
        "intervals": sum(len(e.lows) for e in shard.state.dedup.entries.values()),
    }


def dedup_figures(shards: list[dict], applied: int, by_process: dict) -> dict:
    """The dedup work timed inside the shards: per call kind, and its share of the
    shards' CPU per event. ``fetch_dedup`` counts the CPU of the thread that calls the
    driver (not the driver's I/O thread): the isolated figures below cover that."""
    merged: dict[str, list] = {}
    for shard in shards:
        for label, (calls, items, cpu, wall) in shard["timers"].items():
            m = merged.setdefault(label, [0, 0, 0.0, 0.0])
            m[0] += calls
            m[1] += items
            m[2] += cpu
            m[3] += wall
    timed = {
        label: {
            "calls": calls,
            "items": items,
            "cpu_us_per_event": cpu / applied * 1e6,
            "wall_s": wall,
        }
        for label, (calls, items, cpu, wall) in sorted(merged.items())
    }
    dedup_us = sum(timed[k]["cpu_us_per_event"] for k in DEDUP_WORK if k in timed)
    shards_us = by_process.get("shards", 0.0)
    return {
        "in_shards": timed,
        "in_shards_dedup_cpu_us_per_event": dedup_us,
        "in_shards_dedup_share_of_shards_cpu": dedup_us / shards_us if shards_us else None,
        "dedup_entries_resident": sum(s["entries"] for s in shards),
        "dedup_entries_dirty": sum(s["dirty_entries"] for s in shards),
        "dedup_intervals_resident": sum(s["intervals"] for s in shards),
    }


def ingest_batches_as_tuples(batches: list[tuple], raw: list[tuple]) -> list[tuple]:
    """The same batches with each event as the fleet hands it to a shard (validated)."""
    out, at = [], 0
    for source, part, lines in batches:
        events = raw[at : at + len(part)]
        out.append((source, events, lines if lines is not None else list(range(len(part)))))
        at += len(part)
    return out


def _grouping(state: ShardState, source: str, events: list, lines: list[int], by_user) -> None:
    """The per-event dedup bookkeeping of ShardState.prepare (its lines grouped by
    (partition, source) before ``seen``, and again for the new lines after), copied
    from it so that its cost can be timed apart from the rest of prepare."""
    grouped: dict[str, list[int]] = {}
    for n, event in enumerate(events):
        grouped.setdefault(dedup_key(by_user[event[0]], source), []).append(n)
    for _key, indexes in grouped.items():
        [lines[n] for n in indexes]
    keys: dict[str, tuple[int, list[int]]] = {}
    for event, line in zip(events, lines, strict=True):
        partition = by_user[event[0]]
        keys.setdefault(dedup_key(partition, source), (partition, []))[1].append(line)


def dedup_isolated(
    settings, store, batches: list[tuple], shards: int, jvm, events_per_s: float
) -> dict:
    """The shards' dedup work for these batches, alone in this process, split by owner
    as the fleet splits them: per batch part the keys (twice: the prefetch, then under
    the write lock), the store read of entries not in memory, ``seen``, the grouping
    in prepare and ``record``; and at every checkpoint a shard would take with the
    default settings (its dirty profiles past the threshold, or the interval gone by
    at ``events_per_s``; the ingest run itself takes none), the changed entries
    encoded and written. CPU is this process's (driver threads
    included); the node's CPU is measured too, but other clients may share it."""
    from actors.routing import initial_assignment, split_by_owner

    threshold = settings.checkpoint_dirty_threshold
    every = max(1, int(settings.checkpoint_interval_s * events_per_s / shards))
    owners = initial_assignment(settings.partitions, shards)
    states = {}
    for name in sorted(set(owners.values())):
        state = ShardState(f"isolated-{name}", store, settings, settings.partitions)
        state.owned = {p: 1 for p, owner in owners.items() if owner == name}
        states[name] = state
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    node_cpu: dict[str, float] = defaultdict(float)
    dirty: dict[str, set] = defaultdict(set)
    since: dict[str, int] = defaultdict(int)
    reads = {"requests": 0, "keys": 0}
    writes = {"checkpoints": 0, "rows": 0, "bytes": 0, "largest_row_bytes": 0}

    def node_seconds() -> float:
        return process_cpu({}, jvm)["cassandra"] if jvm is not None else 0.0

    def checkpoint(state: ShardState) -> None:
        c, w = time.process_time(), time.perf_counter()
        taken = state.dedup.take_dirty()
        cpu["checkpoint: encode entries"] += time.process_time() - c
        wall["checkpoint: encode entries"] += time.perf_counter() - w
        node_before = node_seconds()
        c, w = time.process_time(), time.perf_counter()
        store.put_dedup(taken, settings.dedup_retention_s)
        cpu["checkpoint: write entries"] += time.process_time() - c
        wall["checkpoint: write entries"] += time.perf_counter() - w
        node_cpu["checkpoint: write entries"] += node_seconds() - node_before
        writes["checkpoints"] += 1
        writes["rows"] += len(taken)
        writes["bytes"] += sum(map(len, taken.values()))
        writes["largest_row_bytes"] = max(
            writes["largest_row_bytes"], max(map(len, taken.values()), default=0)
        )

    events_total = 0
    for fleet_source, events, lines in batches:
        # Under a source of its own: the fleet's shards have stored their entries for
        # these batches by now (a checkpoint when their index fills), and replaying the
        # same source would find every line applied and do none of the work timed here.
        source = f"isolated-{fleet_source}"
        events_total += len(events)
        for name, (part, part_lines) in split_by_owner(
            events, lines, owners, settings.partitions
        ).items():
            state = states[name]
            by_user = {u: state.partition(u) for u in dict.fromkeys(e[0] for e in part)}
            c, w = time.process_time(), time.perf_counter()
            for _ in range(2):  # the prefetch, then again under the write lock
                keys = state.dedup_keys(source, part)
                unknown = state.dedup.unknown(k for k, p in keys.items() if p in state.owned)
                if unknown:
                    node_before = node_seconds()
                    c_read, w_read = time.process_time(), time.perf_counter()
                    state.install_dedup(state.fetch_dedup(unknown), keys)
                    cpu["store read of unknown entries"] += time.process_time() - c_read
                    wall["store read of unknown entries"] += time.perf_counter() - w_read
                    node_cpu["store read of unknown entries"] += node_seconds() - node_before
                    reads["requests"] += 1
                    reads["keys"] += len(unknown)
            cpu["keys and lookups"] += time.process_time() - c
            wall["keys and lookups"] += time.perf_counter() - w
            c = time.process_time()
            prepared = state.prepare(source, CheckedBatch(list(part), list(part_lines), []))
            cpu["prepare (all of it, for scale)"] += time.process_time() - c
            c = time.process_time()
            _grouping(state, source, part, part_lines, by_user)
            cpu["grouping in prepare"] += time.process_time() - c
            c = time.process_time()
            for key, (_partition, key_lines) in prepared.keys.items():
                state.dedup.seen(key, key_lines)
            cpu["seen"] += time.process_time() - c
            c = time.process_time()
            for key, (partition, key_lines) in prepared.keys.items():
                state.dedup.record(key, partition, key_lines)
            cpu["record"] += time.process_time() - c
            state.last_seq = prepared.seq
            dirty[name].update(by_user)
            since[name] += len(part)
            if len(dirty[name]) >= threshold or since[name] >= every:
                checkpoint(state)
                dirty[name].clear()
                since[name] = 0
    for state in states.values():
        checkpoint(state)
    cpu["keys and lookups"] -= cpu["store read of unknown entries"]
    dedup_parts = [k for k in cpu if not k.startswith("prepare")]
    per_event = {k: v / events_total * 1e6 for k, v in cpu.items()}
    entries = [e for s in states.values() for e in s.dedup.entries.values()]
    return {
        "events": events_total,
        "checkpoint_dirty_threshold": threshold,
        "checkpoint_every_events_per_shard": every,
        "cpu_us_per_event": per_event,
        "dedup_cpu_us_per_event": sum(per_event[k] for k in dedup_parts),
        "wall_s": dict(wall),
        "cassandra_cpu_us_per_event": sum(node_cpu.values()) / events_total * 1e6,
        "cassandra_cpu_s": dict(node_cpu),
        "store_reads": reads,
        "checkpoint_writes": writes,
        "entries": len(entries),
        "intervals": sum(len(e.lows) for e in entries),
        "largest_entry_intervals": max((len(e.lows) for e in entries), default=0),
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
    plan = state.begin_checkpoint()
    users = plan.users
    asyncio.run(state.write_profiles(users, CHECKPOINT_CHUNK))
    state.finish_checkpoint(plan)
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
    expected_events = sum(p.events for p in fleet.get_profiles(sample).values())
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
    assert sum(p.events for p in got.values()) == expected_events, "recovered data differs"
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


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc), so RSS counts what is held."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bench_memory(args) -> dict:
    """Resident bytes per profile of the profile table as shards hold it, filled with
    the generator's mix of users (jobs/generate.py: activity ~ pareto(1.5) + 1, most
    users light, some heavy) and, for comparison up to UNIFORM_UP_TO users, with every
    user at 20 topics and 50 recent actions; plus (100k users at most) one Profile
    object per user of the uniform mix, as the first version held them."""
    settings = load_settings()
    rules = ProfileRules.from_settings(settings)
    result = {"bench": "memory", "users": args.users, "mix": MIX}
    fills = [("generator_mix", _mix_records), ("uniform", _uniform_records)]
    for name, fill in fills[: 2 if args.users <= UNIFORM_UP_TO else 1]:
        rng = np.random.default_rng(9)
        gc.collect()
        _trim_heap()
        before = rss_bytes()
        table = ProfileTable(rules)
        shape = {"recent": 0, "topics": 0, "hidden": 0, "filters": 0}
        # Small chunks: the records are Python objects, and the heap they leave behind
        # when freed would otherwise be counted as the table's.
        for at in range(0, args.users, 10_000):
            records = fill(rules, range(at, min(args.users, at + 10_000)), rng)
            for record in records:
                shape["recent"] += len(record["ri"])
                shape["topics"] += len(record["tn"])
                shape["hidden"] += len(record.get("h") or ())
                shape["filters"] += "sb" in record
            table.put_records(records)
            del records
        gc.collect()
        _trim_heap()
        after = rss_bytes()
        result[name] = {
            "bytes_per_profile": (after - before) / args.users,
            "array_bytes_per_profile": {
                part: n / args.users for part, n in table.layout_bytes().items()
            },
            "per_profile": {part: n / args.users for part, n in shape.items()},
        }
        if name == "uniform":
            objects = min(args.users, 100_000)
            before_objects = rss_bytes()
            kept = [table.get(f"user-{n}") for n in range(objects)]
            gc.collect()
            result["object_model_bytes_per_profile"] = (rss_bytes() - before_objects) / objects
            del kept
        del table
    result["bytes_per_profile"] = result["generator_mix"]["bytes_per_profile"]
    return result


# The uniform mix (the figure of earlier runs) is measured up to this many users.
UNIFORM_UP_TO = 1_000_000
# The generator's mix (jobs/generate.py at its defaults: 100,000 events for 2,000 users,
# 24 topics, 30 days), drawn per user instead of event by event.
MIX = (
    "jobs/generate.py's users: events ~ multinomial over activity pareto(1.5)+1, "
    "mean 50 a user; 2-4 interest topics (+1 after a drift) of 24, 8% of events "
    "off-interest (half of them hides); 70/18/6/4/2% view/click/save/like/share; "
    "100k items; 30 days of millisecond times"
)
MIX_EVENTS_PER_USER = 50
MIX_TOPICS = 24
MIX_ITEMS = 100_000
MIX_ACTIONS = (("view", 0.70), ("click", 0.18), ("save", 0.06), ("like", 0.04), ("share", 0.02))


def _mix_records(rules: ProfileRules, numbers: range, rng) -> list[dict]:
    """Stored records (the columnar form shards write) of users drawn as
    jobs/generate.py draws them, built from arrays: generating the events themselves
    and applying them takes minutes per million users."""
    users = len(numbers)
    activity = rng.pareto(1.5, size=users) + 1
    events = rng.multinomial(MIX_EVENTS_PER_USER * users, activity / activity.sum())
    events = np.maximum(events, 1)
    total = int(events.sum())
    owner = np.repeat(np.arange(users), events)
    # Per event: off interest (8%; half of those are hides), its topic and item.
    interests = rng.integers(0, MIX_TOPICS, size=(users, 5))  # 2-4 of them, +1 drift
    n_interests = rng.integers(2, 5, size=users) + (rng.random(users) < 0.5)
    off = rng.random(total) < 0.08
    pick = (rng.random(total) * n_interests[owner]).astype(np.int64)
    topic = np.where(off, rng.integers(0, MIX_TOPICS, size=total), interests[owner, pick])
    hide = off & (rng.random(total) < 0.5)
    actions = list(rules.actions)
    kinds = [rules.codes[a] for a, _ in MIX_ACTIONS]
    code = rng.choice(kinds, size=total, p=[p for _, p in MIX_ACTIONS])
    code = np.where(hide, rules.codes[HIDE], code)
    item = rng.zipf(1.3, size=total) % MIX_ITEMS
    ts = np.round(T0 + rng.uniform(0, 30 * 86_400, size=total), 3)
    order = np.lexsort((ts, owner))
    owner, topic, code, item, ts = owner[order], topic[order], code[order], item[order], ts[order]
    ends = np.cumsum(events)
    starts = ends - events
    counts = np.zeros((users, len(actions)), dtype="<i4")
    np.add.at(counts, (owner, code), 1)
    item_names = _mix_items()
    topic_names = [f"topic-{t:02d}" for t in range(MIX_TOPICS)]
    rate = rules.rate
    records = []
    for u, number in enumerate(numbers):
        a, b = int(starts[u]), int(ends[u])
        t0 = float(ts[a])
        weight = np.exp(rate * (ts[a:b] - t0)) * np.asarray(rules.weights)[code[a:b]]
        scores = np.bincount(topic[a:b], weights=weight, minlength=MIX_TOPICS)
        held = np.flatnonzero(np.bincount(topic[a:b], minlength=MIX_TOPICS))[: rules.top_k]
        r = max(a, b - rules.recent_n)
        scalars = np.array(
            [(t0, float(ts[b - 1]), t0, b - a, b - a, 1)], dtype=STORED_SCALARS
        ).tobytes()
        record = {
            "s": 2,
            "u": f"user-{number}",
            "x": scalars,
            "an": actions,
            "c": counts[u].tobytes(),
            "tn": [topic_names[t] for t in held.tolist()],
            "tv": scores[held].tobytes(),
            "rt": ts[r:b].tobytes(),
            "ri": item_names[item[r:b]].tolist(),
            "ra": code[r:b].astype(np.uint8).tobytes(),
            "j": "bench",
        }
        hidden = np.flatnonzero(code[a:b] == rules.codes[HIDE])
        if len(hidden):
            names = item_names[item[a:b][hidden]].tolist()
            record["h"] = dict(zip(names, ts[a:b][hidden].tolist(), strict=True))
            if len(record["h"]) > rules.hidden_n:
                record["h"] = dict(list(record["h"].items())[-rules.hidden_n :])
        if b - a > rules.recent_n and rules.seen_bytes:
            record["sb"] = rng.integers(0, 256, rules.seen_bytes, dtype=np.uint8).tobytes()
        records.append(record)
    return records


@functools.cache
def _uniform_items() -> np.ndarray:
    return np.array([f"item-{i}" for i in range(100_000)], dtype=object)


@functools.cache
def _mix_items() -> np.ndarray:
    return np.array([f"item-{i:06d}" for i in range(MIX_ITEMS)], dtype=object)


def _uniform_records(rules: ProfileRules, numbers: range, rng) -> list[dict]:
    """Records of 20 topics (of 500) and 50 recent actions (of 100k items) per user,
    all views: the figure earlier runs reported."""
    names = _uniform_items()
    actions = list(rules.actions)
    scalars = np.array([(T0, T0 + 50, T0, 50, 1, 1)], dtype=STORED_SCALARS).tobytes()
    counts = np.zeros(len(actions), dtype="<i4")
    counts[0] = 50
    ts = (T0 + np.arange(50.0)).tobytes()
    codes = bytes(50)
    records = []
    for number in numbers:
        topics = 1 + np.argpartition(rng.random(500), 20)[:20]
        records.append(
            {
                "s": 2,
                "u": f"user-{number}",
                "x": scalars,
                "an": actions,
                "c": counts.tobytes(),
                "tn": [f"topic-{t}" for t in topics.tolist()],
                "tv": rng.random(20).tobytes(),
                "rt": ts,
                "ri": names[rng.integers(0, 100_000, 50)].tolist(),
                "ra": codes,
                "j": "bench",
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "which",
        choices=["apply", "ingest", "dedup", "naive_ingest", "checkpoint", "recovery", "memory"],
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
    parser.add_argument(
        "--sources",
        default="batch",
        choices=["batch", "file", "request"],
        help="ingest/dedup: one id per batch (default), one file, one Idempotency-Key per batch",
    )
    args = parser.parse_args()
    defaults = {
        "apply": (10_000, 100_000),
        "ingest": (1_000_000, 100_000),
        "dedup": (1_000_000, 100_000),
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
