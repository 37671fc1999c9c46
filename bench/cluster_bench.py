"""Scaling on a multi-node Ray cluster simulated on this machine: fleet ingest and profile
reads with shards pinned to nodes, per-shard CPU, the router's CPU and the cross-node hop.

    python -m bench.cluster_bench [--events 300000] [--configs 1x1,2x1,2x2,4x1,4x2,4x4]

One `ray.cluster_utils.Cluster` (a head and worker raylets, each a "node" advertising
``node_<i>`` and ``persona_shard``) serves every configuration SHARDSxNODES: shard i is
pinned to node i % NODES by asking for ``node_<i>`` on top of ``settings.shard_resources``.
The driver, which runs the fleet (validation and routing), sits on node 0, the head.
Each configuration gets a fresh keyspace on the shared Cassandra node, runs the same
fleet ingest path as ``bench.shard_bench ingest`` (10,000-event batches, 4 in flight),
then single-profile reads through the fleet, then times actor calls from the driver to
shards on its own node and on the others. CPU is read from each process's /proc stat.
The last configuration also measures what the store holds per journaled event, per
checkpointed profile and per dedup entry. Prints one JSON line.

The nodes share the machine's cores, so the total cannot grow with nodes: the figures to
read are per shard (CPU per event, which projects to a node of its own) and the hop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import as_dicts, bench_settings, drop, machine_cpu, synthetic_events

# Ports of the simulated cluster (this benchmark's range): node i uses BASE_PORT + 10 i.
BASE_PORT = 25000
# Calls per side in the hop measurement (fewer for the large result: ~20 ms each).
HOP_CALLS = 300
HOP_BATCH_CALLS = 60
# Profiles in the "batch" hop: a batch lookup's share of one shard; its result is past
# Ray's 100 KiB inline limit, so it travels through the object store (between nodes,
# the object managers).
HOP_BATCH = 1000


def node_ports(index: int) -> dict:
    base = BASE_PORT + 10 * index
    return {
        "node_manager_port": base + 1,
        "object_manager_port": base + 2,
        "dashboard_agent_listen_port": base + 3,
        "runtime_env_agent_port": base + 4,
        "metrics_export_port": base + 5,
        "metrics_agent_port": base + 6,
    }


def start_cluster(nodes: int):
    """A head (node_0, where the driver runs) and nodes - 1 worker raylets."""
    import ray
    from ray.cluster_utils import Cluster

    def resources(index: int) -> dict:
        return {f"node_{index}": 64, "persona_shard": 64}

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": resources(0),
            "include_dashboard": False,
            "gcs_server_port": BASE_PORT,
            "ray_client_server_port": BASE_PORT + 7,
            **node_ports(0),
        },
    )
    for index in range(1, nodes):
        cluster.add_node(num_cpus=1, resources=resources(index), **node_ports(index))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="error")
    return cluster


def ray_pids(cluster) -> list[int]:
    """Ray's own processes (GCS, raylets, agents): they carry the cross-node traffic."""
    return [
        info.process.pid
        for node in cluster.list_all_nodes()
        for infos in node.all_processes.values()
        for info in infos
    ]


def node_ids(cluster) -> list[str]:
    """Node ids by index: node_0 is the head."""
    import ray

    by_resource = {}
    for node in ray.nodes():
        for key in node["Resources"]:
            if key.startswith("node_") and key[5:].isdigit():
                by_resource[int(key[5:])] = node["NodeID"]
    return [by_resource[i] for i in sorted(by_resource)]


def start_pinned_fleet(settings, nodes: int):
    """The fleet's shards, shard i created on node i % nodes; Fleet.start then finds them
    by name (shard_actor is get-if-exists), so the fleet itself is unchanged."""
    from actors.fleet import Fleet, ensure_assignment, stored_partition_count
    from actors.routing import shard_name
    from actors.shard import shard_actor
    from storage import open_store

    store = open_store(settings=settings)
    partitions = stored_partition_count(store, settings)
    ensure_assignment(store, partitions, settings.shards)
    placement = {shard_name(i): i % nodes for i in range(settings.shards)}
    for name, node in placement.items():
        pinned = {**settings.shard_resources, f"node_{node}": 1}
        shard_actor(dataclasses.replace(settings, shard_resources=pinned), name, partitions)
    return Fleet.start(settings, store), placement


def cpu_seconds(pids: list[int] | None) -> float:
    """CPU seconds of these processes so far; None: of every Cassandra node running here
    (when the benchmark's own node cannot be told apart)."""
    from bench.shard_bench import process_cpu

    if pids is None:
        return process_cpu({}, None)["cassandra"]
    return process_cpu({"p": pids}, [])["p"]


def run_config(args, cluster, shards: int, nodes: int, measure_store: bool) -> dict:
    import ray

    from actors.routing import partition_of
    from bench.shard_bench import ingest_batches, node_pids

    began = time.perf_counter()
    settings, keyspace = bench_settings(
        "cassandra", shards=shards, checkpoint_dirty_threshold=10**9
    )
    fleet, placement = start_pinned_fleet(settings, nodes)
    try:
        ids = node_ids(cluster)
        here = ray.get_runtime_context().get_node_id()
        shard_node = {n: ray.get(h.node_id.remote()) for n, h in fleet.shards.items()}
        wrong = {n: node for n, node in placement.items() if shard_node[n] != ids[node]}
        if wrong:
            raise RuntimeError(f"shards not on the nodes they were pinned to: {wrong}")
        pids = {n: ray.get(h.pid.remote()) for n, h in fleet.shards.items()}
        setup_s = time.perf_counter() - began
        jvm = node_pids(settings)
        groups = {
            **{n: [p] for n, p in pids.items()},
            "fleet": [os.getpid()],
            "ray": ray_pids(cluster),
            "cassandra": jvm,
        }
        raw = synthetic_events(args.events, args.users)
        owner_events = Counter(fleet.owners[partition_of(e[0], fleet.partitions)] for e in raw)
        batches = ingest_batches("batch", as_dicts(raw), args.batch)
        ingest = measured(groups, lambda: asyncio.run(ingest_all(fleet, batches, args.in_flight)))
        applied = ingest.pop("result")
        if applied != len(raw):
            raise RuntimeError(f"{applied} of {len(raw)} events applied")
        users = sorted({e[0] for e in raw})
        reads = measured(
            groups, lambda: asyncio.run(read_loop(fleet, users, args.read_seconds, args.readers))
        )
        latencies = reads.pop("result")
        owner_reads = Counter(fleet.owners[partition_of(u, fleet.partitions)] for u, _ in latencies)
        hops = hop_costs(fleet, users, shard_node, here)
        result = {
            "shards": shards,
            "nodes": nodes,
            "placement": placement,
            "ingest": figures(ingest, applied, owner_events, pids, "event"),
            "read": {
                **figures(reads, len(latencies), owner_reads, pids, "read"),
                **percentiles([ms for _, ms in latencies]),
                "readers": args.readers,
            },
            "hop": hops,
        }
        if measure_store:
            try:
                result["store_bytes"] = store_bytes(fleet, applied)
            except Exception as exc:  # the store overloaded: keep the run's figures
                result["store_bytes_error"] = f"{type(exc).__name__}: {exc}"[:400]
        result["setup_s"] = setup_s
        result["wall_s"] = time.perf_counter() - began
        return result
    finally:
        fleet.shutdown()
        try:
            drop(fleet.store, keyspace)
        except Exception as exc:  # a timeout must not hide the figures: say what is left
            print(f"keyspace {keyspace} not dropped: {exc}", file=sys.stderr)


def measured(groups: dict[str, list[int] | None], work) -> dict:
    """Run ``work`` and return its wall time, each group's CPU seconds and the machine's."""
    busy_before, total_before = machine_cpu()
    before = {g: cpu_seconds(p) for g, p in groups.items()}
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    after = {g: cpu_seconds(p) for g, p in groups.items()}
    busy_after, total_after = machine_cpu()
    return {
        "result": result,
        "seconds": seconds,
        "cpu_s": {g: after[g] - before[g] for g in groups},
        "machine_busy": (busy_after - busy_before) / max(1, total_after - total_before),
    }


def figures(run: dict, count: int, by_shard: Counter, pids: dict, unit: str) -> dict:
    """Rates in all and per shard, and CPU per event (or read) by process: each shard's
    CPU over what it handled, the router's (the fleet in the driver) over everything."""
    seconds, cpu = run["seconds"], run["cpu_s"]
    per_shard = {
        name: {
            f"{unit}s": by_shard[name],
            f"{unit}s_per_s": by_shard[name] / seconds,
            "cpu_s": cpu[name],
            f"cpu_us_per_{unit}": cpu[name] / max(1, by_shard[name]) * 1e6,
            # Share of one core the shard used: below 1 means it waited (on the store,
            # the router or the other processes sharing the machine's cores).
            "core_share": cpu[name] / seconds,
        }
        for name in pids
    }
    shard_cpu = sum(cpu[name] for name in pids)
    return {
        f"{unit}s": count,
        "seconds": seconds,
        f"{unit}s_per_s": count / seconds,
        "machine_busy": run["machine_busy"],
        "per_shard": per_shard,
        f"cpu_us_per_{unit}": {
            "shards": shard_cpu / count * 1e6,
            "router (fleet in the driver)": cpu["fleet"] / count * 1e6,
            "ray (raylets, GCS, agents)": cpu["ray"] / count * 1e6,
            "cassandra": cpu["cassandra"] / count * 1e6,
        },
    }


async def ingest_all(fleet, batches: list[tuple], in_flight: int) -> int:
    """The fleet ingest path of bench.shard_bench ingest: apply_async, N in flight."""
    gate = asyncio.Semaphore(in_flight)

    async def one(source, batch, lines) -> int:
        async with gate:
            ack = await fleet.apply_async(source, batch, lines=lines)
            return ack["applied"]

    return sum(await asyncio.gather(*(one(*b) for b in batches)))


async def read_loop(fleet, users: list[str], seconds: float, readers: int) -> list:
    """``readers`` concurrent clients reading one random profile at a time through the
    fleet for ``seconds``; (user, ms) per read."""
    done: list[tuple[str, float]] = []
    deadline = time.monotonic() + seconds

    async def reader(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            user = rng.choice(users)
            began = time.perf_counter()
            await fleet.get_profiles_async([user])
            done.append((user, (time.perf_counter() - began) * 1000))

    await asyncio.gather(*(reader(n) for n in range(readers)))
    return done


def percentiles(ms: list[float]) -> dict:
    ms = sorted(ms)
    if not ms:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))]}


def hop_costs(fleet, users: list[str], shard_node: dict, here: str) -> dict:
    """Latency of one actor call from the driver (the router) to a shard on the driver's
    node and to one on another node: a no-op (ping), one profile, and HOP_BATCH
    profiles (a result past Ray's inline limit travels through the object store, and
    between nodes through the object managers). Calls alternate between the two
    shards, so drift in the machine's load hits both sides alike. Empty when every
    shard is on one side."""
    import ray

    from actors.routing import group_users

    sides = {}
    for name in fleet.shards:
        sides.setdefault("same" if shard_node[name] == here else "cross", name)
    if len(sides) < 2:
        return {}
    owned = group_users(users, fleet.owners, fleet.partitions)
    kinds = {
        "noop": (HOP_CALLS, lambda h, mine: h.ping.remote()),
        "one_profile": (HOP_CALLS, lambda h, mine: h.get_profiles.remote(mine[:1])),
        f"{HOP_BATCH}_profiles": (
            HOP_BATCH_CALLS,
            lambda h, mine: h.get_profiles.remote(mine[:HOP_BATCH]),
        ),
    }
    result = {}
    for kind, (calls, call) in kinds.items():
        samples: dict[str, list[float]] = {side: [] for side in sides}
        for n in range(calls + 10):
            for side, name in sides.items():
                began = time.perf_counter()
                answer = ray.get(call(fleet.shards[name], owned[name]))
                if n >= 10:  # the first calls warm up
                    samples[side].append((time.perf_counter() - began) * 1000)
        result[kind] = {
            **{side: percentiles(ms) for side, ms in samples.items()},
            "calls": calls,
            "result_bytes": len(ray.cloudpickle.dumps(answer)),
        }
    return result


def store_bytes(fleet, events: int) -> dict:
    """What Cassandra holds, read back from it: journal bytes per event of this run
    (before the checkpoint trims them), then, after a checkpoint, bytes per dedup entry
    and per stored profile (key + blob) at this run's few events per user; then the same
    for a data set of `persona generate` (the generator's mix of light and heavy users,
    the mix the memory benchmark models) ingested through the fleet and checkpointed."""
    from actors.dedup import dedup_key

    session = fleet.store._session

    def journal_bytes() -> int:
        return sum(len(r.blob or b"") for r in session.execute("SELECT blob FROM journal"))

    journal = journal_bytes()
    fleet.checkpoint()
    profiles = [
        len(r.user_id) + len(r.blob) for r in session.execute("SELECT user_id, blob FROM profiles")
    ]
    dedup = [(len(r.key), len(r.blob)) for r in session.execute("SELECT key, blob FROM dedup")]
    entries = max(1, len(dedup))
    generated = generated_mix(fleet, journal_bytes, session)
    return {
        "journal_bytes_per_event": journal / max(1, events),
        "profiles": len(profiles),
        "events_per_profile": events / max(1, len(profiles)),
        "profile_bytes": sum(profiles) / max(1, len(profiles)),
        "dedup_entries": len(dedup),
        "dedup_bytes_per_entry": sum(k + b for k, b in dedup) / entries,
        # This run's sources are short ("bench-N"); an HTTP client's entry has the same
        # blob under a key naming the client and its Idempotency-Key.
        "dedup_bytes_per_request_entry": sum(b for _, b in dedup) / entries
        + len(dedup_key(255, f"client-{'0' * 16}:{'0' * 32}")),
        **generated,
        **exposure_bytes(),
    }


# The generated data set: `persona generate` at the demo's 50 events a user.
GENERATED = {"users": 1_000, "items": 10_000, "events": 50_000}


def generated_mix(fleet, journal_bytes, session) -> dict:
    """Ingest a generated data set through the fleet, then checkpoint: its journal
    bytes per event and its stored bytes per profile."""
    import tempfile

    from jobs.generate import generate

    with tempfile.TemporaryDirectory() as out:
        generate(Path(out), **GENERATED, seed=11)
        with open(Path(out) / "events.jsonl") as f:
            events = [json.loads(line) for line in f]
    before = journal_bytes()
    for n, at in enumerate(range(0, len(events), 10_000)):
        fleet.apply(f"generated-{n}", events[at : at + 10_000])
    journal = journal_bytes() - before
    fleet.checkpoint()
    users = {e["user_id"] for e in events}
    stored = [
        len(r.user_id) + len(r.blob)
        for r in session.execute("SELECT user_id, blob FROM profiles")
        if r.user_id in users
    ]
    return {
        "generated": {**GENERATED, "users_stored": len(stored)},
        "generated_journal_bytes_per_event": journal / len(events),
        "generated_profile_bytes": sum(stored) / max(1, len(stored)),
    }


def exposure_bytes(k: int = 20) -> dict:
    """Bytes of one exposure row (what a recommendations response of k items logs):
    the partition key (hour, slot), rec_id, time and the encoded exposure."""
    import uuid

    from actors.attribution import Exposure

    exposure = Exposure(
        uuid.uuid4().hex,
        "user-00123456",
        time.time(),
        "control-vs-sequence",
        "control",
        tuple(f"item-{n:06d}" for n in range(k)),
    )
    return {"exposure_row_bytes": 8 + 4 + len(exposure.rec_id) + 8 + len(exposure.encode())}


def _runs(result) -> list[dict]:
    """The runs of a result of this benchmark that measured something; none for an
    error or an older format."""
    runs = result.get("runs", []) if isinstance(result, dict) else []
    return [r for r in runs if "ingest" in r]


def _failures(result) -> list[str]:
    runs = result.get("runs", []) if isinstance(result, dict) else []
    return [f"{r['shards']} x {r['nodes']}: {r['error']}" for r in runs if "error" in r] + [
        f"{r['shards']} x {r['nodes']}, store bytes: {r['store_bytes_error']}"
        for r in runs
        if "store_bytes_error" in r
    ]


def section(result) -> list[str]:
    """The scaling section of bench/RESULTS.md from this benchmark's JSON."""
    lines = ["", "## Scaling on a simulated cluster", ""]
    runs, failed = _runs(result), _failures(result)
    if not runs:
        error = result.get("error") if isinstance(result, dict) else "an older format"
        return [
            *lines,
            f"Not measured in this run ({'; '.join(failed) or error}): "
            "`python -m bench.run_all --only scaling`.",
        ]
    configs = ",".join(f"{r['shards']}x{r['nodes']}" for r in runs)
    lines += [
        f"`bench.cluster_bench` ({result['date']}, {result.get('wall_s', '?')}"
        f" s): one Ray cluster of {max(r['nodes'] for r in runs)} raylets on this machine "
        "(`ray.cluster_utils.Cluster`; a configuration of fewer nodes leaves the others "
        "idle), shards pinned to nodes by resource (shard i on node i % nodes), the fleet "
        "(validation and routing) in the driver on node 0, the journal on the shared "
        f"Cassandra node (a fresh keyspace per configuration). {result['events']:,} events "
        f"of {result['users']:,} users in {result['batch']:,}-event batches, "
        f"{result['in_flight']} in flight (the path of `bench.shard_bench ingest`), then "
        f"{runs[0]['read']['readers']} concurrent single-profile reads through the fleet. "
        f"Configurations SHARDSxNODES: {configs}.",
        "",
        *([f"Failed in this run: {'; '.join(failed)}.", ""] if failed else []),
        "**Every node shares the same 2 cores, so the total cannot grow with shards or "
        "nodes**: the figures that carry over to real nodes are the CPU per event of each "
        "process and the hop below.",
        "",
        "![scaling](scaling.png)",
        "",
        "| shards x nodes | ingest events/s | per shard events/s | shard CPU us/event "
        "| router CPU us/event | Cassandra CPU us/event | Ray CPU us/event | machine busy "
        "| reads/s | read p50 / p99 ms | shard CPU us/read | router CPU us/read |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        i, rd = r["ingest"], r["read"]
        per_shard = " / ".join(f"{s['events_per_s']:,.0f}" for s in i["per_shard"].values())
        shard_cpu = " / ".join(f"{s['cpu_us_per_event']:.1f}" for s in i["per_shard"].values())
        cpu, rcpu = i["cpu_us_per_event"], rd["cpu_us_per_read"]
        lines.append(
            f"| {r['shards']} x {r['nodes']} | {i['events_per_s']:,.0f} | {per_shard} "
            f"| {shard_cpu} | {cpu['router (fleet in the driver)']:.1f} "
            f"| {cpu['cassandra']:.1f} | {cpu['ray (raylets, GCS, agents)']:.1f} "
            f"| {i['machine_busy']:.2f} | {rd['reads_per_s']:,.0f} "
            f"| {rd['p50_ms']:.1f} / {rd['p99_ms']:.1f} | {rcpu['shards']:.0f} "
            f"| {rcpu['router (fleet in the driver)']:.0f} |"
        )
    lines += [
        "",
        "Hop cost: one actor call from the driver (the router) to a shard on its own node "
        "and to one on another node, the calls alternating between the two, in every "
        "configuration with shards on both sides (ms):",
        "",
        "| shards x nodes | call | calls per side | result bytes | same node p50 / p99 "
        "| other node p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    if not any(r["hop"] for r in runs):
        lines.append("| (no configuration had shards on two nodes) | | | | | |")
    for r in runs:
        for kind, hop in r["hop"].items():
            same, cross = hop["same"], hop["cross"]
            lines.append(
                f"| {r['shards']} x {r['nodes']} | {kind.replace('_', ' ')} | {hop['calls']} "
                f"| {hop['result_bytes']:,} | {same['p50_ms']:.2f} / {same['p99_ms']:.2f} "
                f"| {cross['p50_ms']:.2f} / {cross['p99_ms']:.2f} |"
            )
    one = runs[0]["ingest"]
    shard_us = one["cpu_us_per_event"]["shards"]
    router_us = one["cpu_us_per_event"]["router (fleet in the driver)"]
    cassandra_us = one["cpu_us_per_event"]["cassandra"]
    lines += [
        "",
        f"Projection to real nodes ({runs[0]['shards']} x {runs[0]['nodes']} run): a shard "
        f"costs {shard_us:.1f} us of CPU per event, so a shard with a core of its own "
        f"applies about {1e6 / shard_us:,.0f} events/s; the router costs {router_us:.1f} "
        f"us per event (about {1e6 / router_us:,.0f} events/s per routing core) and "
        f"Cassandra {cassandra_us:.1f} us per event at replication 1. Shard CPU per event "
        f"by shard count (median of the runs): {by_shards(runs)}: each shard's part of a "
        f"{result['batch']:,}-event batch shrinks as shards are added, so what a call costs "
        "whatever its size weighs more, and more processes share the two cores (not "
        "profiled further). bench/CAPACITY.md turns these into nodes.",
        "",
        "On one machine a call to another node is a gRPC call between two worker "
        "processes over loopback, exactly as to the same node: Ray sends actor calls and "
        "small results worker to worker, not through the raylets, so for those the two "
        "sides measure the same thing and their gap is noise. A result past Ray's 100 KiB "
        "inline limit goes through the object store, and between nodes through both "
        "nodes' object managers. Measured here, "
        + hop_gap(runs)
        + " On real nodes, add the network's round trip to every cross-node call (and its "
        "bandwidth to large results); the call's own cost is the same-node figure.",
    ]
    return lines


def by_shards(runs: list[dict]) -> str:
    """Median shard CPU per event for each shard count, e.g. '1 shard 9.2 us, 4: 12.1'."""
    counts: dict[int, list[float]] = {}
    for r in runs:
        counts.setdefault(r["shards"], []).append(r["ingest"]["cpu_us_per_event"]["shards"])
    return ", ".join(
        f"{n} shard{'s' if n > 1 else ''} {sorted(v)[len(v) // 2]:.1f} us"
        for n, v in sorted(counts.items())
    )


def hop_gap(runs: list[dict]) -> str:
    """The other node's p50 and p99 over the same node's, per call kind, across runs."""
    parts = []
    for kind in next((r["hop"] for r in runs if r["hop"]), {}):
        pairs = [r["hop"][kind] for r in runs if kind in r["hop"]]
        p50 = [h["cross"]["p50_ms"] / h["same"]["p50_ms"] for h in pairs]
        p99 = [h["cross"]["p99_ms"] / h["same"]["p99_ms"] for h in pairs]
        parts.append(
            f"{kind.replace('_', ' ')} {min(p50):.2f}-{max(p50):.2f}x at p50, "
            f"{min(p99):.2f}-{max(p99):.2f}x at p99"
        )
    return "other node over same node: " + "; ".join(parts) + "." if parts else ""


def plot_axes(result, cpu_axes, hop_axes) -> None:
    """CPU per event by process and configuration, and the hop same vs other node."""
    runs = _runs(result)
    if not runs:
        return
    labels = [f"{r['shards']}x{r['nodes']}" for r in runs]
    bottom = [0.0] * len(runs)
    for part in (
        "shards",
        "router (fleet in the driver)",
        "cassandra",
        "ray (raylets, GCS, agents)",
    ):
        values = [r["ingest"]["cpu_us_per_event"][part] for r in runs]
        cpu_axes.bar(labels, values, bottom=bottom, label=part.split(" (")[0])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    cpu_axes.set(title="ingest CPU per event by process", xlabel="shards x nodes", ylabel="us")
    cpu_axes.legend(fontsize=7)
    kinds = list(next((r["hop"] for r in runs if r["hop"]), {}))
    for offset, side in ((-0.2, "same"), (0.2, "cross")):
        values = [
            max((r["hop"][k][side]["p50_ms"] for r in runs if k in r["hop"]), default=0)
            for k in kinds
        ]
        hop_axes.bar([n + offset for n in range(len(kinds))], values, width=0.4, label=side)
    hop_axes.set_xticks(range(len(kinds)), [k.replace("_", " ") for k in kinds])
    hop_axes.set(title="actor call p50, same vs other node (highest run)", ylabel="ms")
    hop_axes.legend(fontsize=7)


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for part in text.split(","):
        shards, _, nodes = part.partition("x")
        if not (shards.isdigit() and nodes.isdigit()) or int(nodes) > int(shards):
            raise SystemExit(f"--configs: {part!r} is not SHARDSxNODES with NODES <= SHARDS")
        configs.append((int(shards), int(nodes)))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--read-seconds", type=float, default=4.0)
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument(
        "--configs", default="1x1,2x1,2x2,4x1,4x2,4x4", help="SHARDSxNODES, comma-separated"
    )
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs)
    # A cluster of this benchmark's own: its address file and sessions in a temp dir of
    # its own (Cluster writes <temp>/ray/ray_current_cluster, which `ray.init()` without
    # an address would follow), and loopback-only, so no auth token to hand around.
    os.environ["RAY_TMPDIR"] = f"/tmp/persona-cluster-bench-{os.getpid()}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
    import ray

    from bench.checkpoint_bench import code_version

    started = time.perf_counter()
    cluster = start_cluster(max(nodes for _, nodes in configs))
    try:
        runs = []
        for n, (shards, nodes) in enumerate(configs):
            try:
                runs.append(
                    run_config(args, cluster, shards, nodes, measure_store=n == len(configs) - 1)
                )
            except Exception as exc:  # one configuration failing keeps the others
                error = f"{type(exc).__name__}: {exc}"[:400]
                runs.append({"shards": shards, "nodes": nodes, "error": error})
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "cluster",
                "store": "cassandra",
                "events": args.events,
                "users": args.users,
                "batch": args.batch,
                "in_flight": args.in_flight,
                "runs": runs,
                "cluster_s": time.perf_counter() - started,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "code": code_version(),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
