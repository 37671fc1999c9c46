"""Run every benchmark, write bench/results.json and regenerate bench/RESULTS.md (and
bench/scaling.png): each figure next to its target, with the peer baselines measured
in the same run and the machine it ran on; then bench/CAPACITY.md from them (bench.capacity).

    python -m bench.run_all [--quick]      (make bench / make bench-quick, persona bench)
    python -m bench.run_all --only durability   (rerun one; the rest of results.json stays)

Starts the local Cassandra node if none answers (and stops it again afterwards).
Each benchmark runs in its own process, so each gets a fresh Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_cpu
from persona.settings import load_settings

HERE = Path(__file__).resolve().parent


def sizes(quick: bool) -> dict:
    if quick:
        return {
            "store": 20_000,
            "apply_batches": 10,
            "ingest": 200_000,
            "checkpoint": 100_000,
            "recovery": 20_000,
            "memory": [100_000],
            "http_s": 5,
            "http_users": 20_000,
            "http_items": 20_000,
            "scaling_events": 60_000,
            "scaling_configs": "1x1,2x2,4x4",
            "scaling_read_s": 2,
            "durability_appends": 1_000,
            "checkpoint_bounds": ["--users", "20000", "--sources", "100", "--checkpoints", "2"],
            "dedup_events": 200_000,
            "exposure_s": 5,
            "exposure_rounds": 2,
        }
    return {
        "store": 100_000,
        "apply_batches": 50,
        "ingest": 1_000_000,
        "checkpoint": 1_000_000,
        "recovery": 100_000,
        "memory": [100_000, 1_000_000, 3_000_000],
        "http_s": 15,
        "http_users": 100_000,
        "http_items": 100_000,
        "scaling_events": 300_000,
        "scaling_configs": "1x1,2x1,2x2,4x1,4x2,4x4",
        "scaling_read_s": 4,
        "durability_appends": 3_000,
        "checkpoint_bounds": [],  # bench.checkpoint_bench's defaults: issue #11's sizes
        "dedup_events": 1_000_000,
        "exposure_s": 15,
        "exposure_rounds": 2,
    }


def wait_for_quiet(busy_below: float = 0.25, longest: float = 90.0) -> float:
    """Wait until the machine is mostly idle (the Cassandra node flushing or
    compacting after the last benchmark, Ray processes exiting), so that one
    benchmark's aftermath is not charged to the next. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < longest:
        busy_before, total_before = machine_cpu()
        time.sleep(2.0)
        busy_after, total_after = machine_cpu()
        if (busy_after - busy_before) / max(1, total_after - total_before) < busy_below:
            break
    return time.monotonic() - started


def run_module(module: str, *args: str, timeout: float = 1800) -> dict:
    command = [sys.executable, "-m", module, *args]
    settled = wait_for_quiet()
    print(f"$ {' '.join(['python', '-m', module, *args])}  (settled {settled:.0f} s)", flush=True)
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent
    )
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-4000:], file=sys.stderr)
        return {"error": f"exit {result.returncode}", "command": " ".join(command[1:])}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    figures = json.loads(lines[-1])
    figures["command"] = "python -m " + " ".join([module, *args])
    figures["wall_s"] = round(time.monotonic() - started, 1)
    return figures


def machine() -> dict:
    import ray

    with open("/proc/meminfo") as meminfo:
        total = next(line for line in meminfo if line.startswith("MemTotal"))
    memory_kb = int(total.split()[1])
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "cassandra": _cassandra_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cassandra_version() -> str:
    from storage.cassandra_local import LocalNode

    return LocalNode.from_settings(load_settings()).release_version() or "unknown"


def run_durability(size: dict) -> dict:
    return run_module("bench.durability_bench", "--appends", str(size["durability_appends"]))


def run_checkpoint_bounds(size: dict) -> list[dict]:
    """Checkpoints of 100k items, a dense graph and 256 partitions on Cassandra: as
    shipped, then with the signal chunks sent 8 at a time (what bounding the bytes a
    checkpoint has in flight does)."""
    args = size["checkpoint_bounds"]
    return [
        run_module("bench.checkpoint_bench", *args),
        run_module("bench.checkpoint_bench", *args, "--signal-concurrency", "8"),
    ]


def run_dedup(size: dict, peers: bool = True) -> list[dict]:
    """Ingest with the shards' dedup work timed, per kind of source; with ``peers``,
    the in-memory apply and the naive actors again, to tell the machine's state at
    the time from the change (a full run has them already)."""
    events = str(size["dedup_events"])
    runs = [
        run_module(
            "bench.shard_bench", "dedup", "--events", events, "--sources", kind, "--batch", batch
        )
        for kind, batch in (("file", "10000"), ("request", "10000"), ("request", "1000"))
    ]
    if peers:
        runs.append(
            run_module("bench.shard_bench", "apply", "--batches", str(size["apply_batches"]))
        )
        runs.append(run_module("bench.shard_bench", "naive_ingest", "--events", events))
    return runs


def run_exposures(size: dict) -> dict:
    """GET recommendations with exposure logging on and off, alternating (issue #14)."""
    return run_module(
        "bench.exposure_bench",
        "--seconds",
        str(size["exposure_s"]),
        "--rounds",
        str(size["exposure_rounds"]),
        "--users",
        str(size["http_users"]),
        "--items",
        str(size["http_items"]),
    )


def _http_sizes(size: dict) -> list[str]:
    """The seconds, users and items every HTTP-facing benchmark of a run shares."""
    return [
        "--seconds",
        str(size["http_s"]),
        "--users",
        str(size["http_users"]),
        "--items",
        str(size["http_items"]),
    ]


def run_http(size: dict) -> dict:
    """GET profile, recommendations, batch lookups and POST events with wrk, beside the
    same no-op route under plain uvicorn and under Ray Serve (issue #16)."""
    return run_module("bench.http_bench", *_http_sizes(size))


def run_grpc(size: dict) -> dict:
    """GetProfile and BatchGetProfiles over gRPC beside the same reads over HTTP, on one
    app, by the same kind of client, alternating (issue #16)."""
    return run_module("bench.grpc_bench", *_http_sizes(size))


def run_movielens(size: dict) -> dict:
    """`persona evaluate` on MovieLens-100k with tuning and the HTTP path (same sizes
    quick or not: the data set is what it is)."""
    return run_module(
        "jobs.evaluate", "--dataset", "movielens-100k", "--tune", "--http", timeout=3600
    )


def run_scaling(size: dict) -> dict:
    """Ingest and reads on a simulated multi-node cluster (issue #16): SHARDSxNODES."""
    return run_module(
        "bench.cluster_bench",
        "--events",
        str(size["scaling_events"]),
        "--configs",
        size["scaling_configs"],
        "--read-seconds",
        str(size["scaling_read_s"]),
    )


def run_ingest(size: dict) -> dict:
    """Fleet ingest with the Cassandra journal, then the naive actors (the peer) right
    after it on the same events: the ratio of the two is the figure (issue #16)."""
    events = str(size["ingest"])
    ingest = run_module("bench.shard_bench", "ingest", "--events", events)
    naive = run_module("bench.shard_bench", "naive_ingest", "--events", events)
    if ingest.get("events_per_s") and naive.get("events_per_s"):
        ingest["naive"] = naive
        ingest["to_naive"] = ingest["events_per_s"] / naive["events_per_s"]
    return ingest


def run_memory(size: dict) -> list[dict]:
    """Resident bytes per profile, the generator's mix, at each size (issue #16)."""
    return [run_module("bench.shard_bench", "memory", "--users", str(n)) for n in size["memory"]]


# Benchmarks that can also run alone (--only NAME), merged into the last results.json.
SEPARATE = {
    "ingest": run_ingest,
    "memory": run_memory,
    "scaling": run_scaling,
    "durability": run_durability,
    "checkpoint_bounds": run_checkpoint_bounds,
    "dedup": run_dedup,
    "exposures": run_exposures,
    "movielens": run_movielens,
    "grpc": run_grpc,
    "http": run_http,
}


def collect(quick: bool) -> dict:
    size = sizes(quick)
    r: dict = {"quick": quick}
    r["store"] = run_module("bench.store_bench", "--profiles", str(size["store"]))
    r["durability"] = run_durability(size)
    r["apply"] = run_module("bench.shard_bench", "apply", "--batches", str(size["apply_batches"]))
    r["ingest"] = run_ingest(size)
    r["naive_ingest"] = r["ingest"].get("naive", {})
    r["dedup"] = run_dedup(size, peers=False)
    r["checkpoint"] = run_module(
        "bench.shard_bench", "checkpoint", "--profiles", str(size["checkpoint"])
    )
    r["checkpoint_bounds"] = run_checkpoint_bounds(size)
    r["recovery"] = run_module("bench.shard_bench", "recovery", "--users", str(size["recovery"]))
    r["memory"] = run_memory(size)
    r["http"] = run_http(size)
    r["exposures"] = run_exposures(size)
    r["grpc"] = run_grpc(size)
    r["elastic"] = run_module("bench.elastic_bench", *(["--quick"] if quick else []))
    data = HERE / "out" / "eval"
    run_module(
        "jobs.generate",
        "--users",
        "2000",
        "--items",
        "1000",
        "--events",
        "100000",
        "--out",
        str(data),
    )
    r["quality"] = run_module("jobs.evaluate", str(data / "events.jsonl"), "--k", "10")
    r["movielens"] = run_movielens(size)
    r["scaling"] = run_scaling(size)
    return r


def _get(data, *path, default=None):
    for key in path:
        if (isinstance(data, dict) and key in data) or (
            isinstance(data, list) and isinstance(key, int) and len(data) > key
        ):
            data = data[key]
        else:
            return default
    return data


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(figure, target, measured, met) rows."""

    def row(name, target, value, ok, fmt="{:,.0f}"):
        if value is None:
            return (name, target, "not measured", None)
        return (name, target, fmt.format(value) if not isinstance(value, str) else value, ok(value))

    http = r.get("http", {})
    memory = r.get("memory") or [{}]
    rows = [
        row(
            "Cassandra profile writes/s",
            ">= 20,000",
            _get(r, "store", "store_bench", "cassandra", "write_per_s"),
            lambda v: v >= 20_000,
        ),
        row(
            "Cassandra profile reads/s",
            ">= 20,000",
            _get(r, "store", "store_bench", "cassandra", "read_per_s"),
            lambda v: v >= 20_000,
        ),
        row(
            "in-memory apply, events/s per shard process",
            ">= 1,000,000",
            _get(r, "apply", "apply_events_per_s"),
            lambda v: v >= 1_000_000,
        ),
        row(
            "end-to-end ingest with Cassandra journal, events/s",
            ">= 300,000",
            _get(r, "ingest", "events_per_s"),
            lambda v: v >= 300_000,
        ),
        row(
            "ingest with the Cassandra journal / naive actors without one (same run)",
            ">= 0.50x",
            _get(r, "ingest", "to_naive"),
            lambda v: v >= 0.5,
            "{:.2f}x",
        ),
        row(
            f"checkpoint of {_get(r, 'checkpoint', 'profiles', default=0):,} profiles, s",
            "<= 30 s (1M)",
            _get(r, "checkpoint", "seconds"),
            lambda v: v <= 30 * _get(r, "checkpoint", "profiles", default=1) / 1_000_000,
            "{:.1f}",
        ),
        row(
            f"recovery of {_get(r, 'recovery', 'users', default=0):,} users after SIGKILL, s",
            "<= 5 s (100k)",
            _get(r, "recovery", "kill_to_answering_s"),
            lambda v: v <= 5,
            "{:.1f}",
        ),
        row(
            f"resident bytes per profile ({_get(memory, -1, 'users', default=0):,} users, "
            "the generator's mix)",
            "<= 1,024 (3M users)",
            _get(memory, -1, "bytes_per_profile"),
            # The goal's size: a smaller run (--quick) carries the vocabulary's share.
            lambda v: v <= 1024 if _get(memory, -1, "users", default=0) >= 3_000_000 else None,
        ),
        row(
            "GET profile req/s / Serve no-op route (32 conns, same run)",
            ">= 0.90x",
            _get(http, "profile_to_serve_noop"),
            lambda v: v >= 0.9,
            "{:.2f}x",
        ),
        row(
            "GET profile p99 ms",
            "<= 25",
            _get(http, "profile", "p99_ms"),
            lambda v: v <= 25,
            "{:.1f}",
        ),
        row(
            f"GET recommendations req/s / Serve no-op route ({_get(http, 'items', default=0):,} items)",
            ">= 0.60x",
            _get(http, "recommendations_to_serve_noop"),
            lambda v: v >= 0.6,
            "{:.2f}x",
        ),
        row(
            "GET recommendations p99 ms",
            "<= 50",
            _get(http, "recommendations", "p99_ms"),
            lambda v: v <= 50,
            "{:.1f}",
        ),
        lookup_target(http),
        row(
            "POST /v1/events, events/s (1,000-event batches)",
            ">= 100,000",
            _get(http, "events_1000", "events_per_s"),
            lambda v: v >= 100_000,
        ),
        row(
            "Recall@10 / popularity baseline (generated data)",
            ">= 1.5x",
            recall_lift(r.get("quality") or {}),
            lambda v: v >= 1.5,
            "{:.2f}x",
        ),
        row(
            "GET recommendations req/s, exposure logging on / off (same run)",
            ">= 0.95x",
            _get(r, "exposures", "on_to_off"),
            lambda v: v >= 0.95,
            "{:.2f}x",
        ),
        checkpoint_bounds_target(r.get("checkpoint_bounds") or []),
    ]
    return rows


def recall_lift(quality: dict) -> float | None:
    """Persona's Recall@10 over popularity's, both from the one `persona evaluate` run
    (its output names each recommender's metrics, not their ratio)."""
    persona = _get(quality, "persona", "recall")
    popular = _get(quality, "popularity", "recall")
    return persona / popular if persona is not None and popular else None


def lookup_target(http: dict) -> tuple[str, str, str, bool | None]:
    """Issue #16: POST /v1/profiles:batchGet, its best batch size of the run."""
    name, target = "batch profile lookup, profiles/s (POST /v1/profiles:batchGet)", ">= 20,000"
    runs = [(k, v) for k, v in http.items() if k.startswith("lookup_") and "profiles_per_s" in v]
    if not runs:
        return (name, target, "not measured", None)
    key, best = max(runs, key=lambda kv: kv[1]["profiles_per_s"])
    ids = int(key.removeprefix("lookup_"))
    measured = (
        f"{best['profiles_per_s']:,.0f} ({ids:,} ids a request, p99 {best['p99_ms']:.0f} ms; "
        + ", ".join(
            f"{int(k.removeprefix('lookup_')):,} ids {v['profiles_per_s']:,.0f}" for k, v in runs
        )
        + ")"
    )
    return (name, target, measured, best["profiles_per_s"] >= 20_000)


def checkpoint_bounds_target(runs: list) -> tuple[str, str, str, bool | None]:
    """Issue #11: checkpoints keep working on Cassandra with 100k items, a dense graph
    and 256 partitions (the run as shipped)."""
    name = "checkpoints on Cassandra, 100k items, dense graph, 256 partitions"
    target = "every one succeeds, no write over a limit"
    shipped = next((c for c in runs if c.get("signal_concurrency_as_shipped")), None)
    if shipped is None:
        return (name, target, "not measured", None)
    done = [c for c in shipped["checkpoints"] if not c.get("failed")]
    measured = f"{len(done)} of {len(shipped['checkpoints'])} succeeded"
    if shipped["over_limits"]:
        measured += "; over a limit: " + "; ".join(shipped["over_limits"])
    if shipped["items"] < 100_000:
        measured += f" ({shipped['items']:,} items)"
    ok = len(done) == len(shipped["checkpoints"]) and not shipped["over_limits"]
    return (name, target, measured, ok)


def peers(r: dict) -> list[tuple[str, str, str]]:
    http = r.get("http", {})
    # The naive actors' run made right after the ingest (run_ingest), else an older key.
    naive_ingest = _get(r, "ingest", "naive", "events_per_s") or _get(
        r, "naive_ingest", "events_per_s", default=0
    )
    return [
        (
            "reads: plain uvicorn + FastAPI dict lookup (req/s, p99 ms)",
            f"{_get(http, 'uvicorn_ceiling', 'req_per_s', default=0):,.0f}, {_get(http, 'uvicorn_ceiling', 'p99_ms', default=0):.1f}",
            f"Persona GET profile is {_get(http, 'profile_to_ceiling', default=0):.2f}x of it",
        ),
        (
            f"reads: the same route under Ray Serve ({http.get('proxy', '?')} proxy, "
            f"{http.get('ingress_replicas', '?')} replicas like Persona's ingress; req/s, p99 ms)",
            f"{_get(http, 'serve_noop', 'req_per_s', default=0):,.0f}, {_get(http, 'serve_noop', 'p99_ms', default=0):.1f}",
            f"GET profile {_get(http, 'profile_to_serve_noop', default=0):.2f}x, recommendations "
            f"{_get(http, 'recommendations_to_serve_noop', default=0):.2f}x of it",
        ),
        (
            "ingest: naive dict-of-dicts actors, no journal (events/s)",
            f"{naive_ingest:,.0f}",
            f"Persona with the Cassandra journal: {_get(r, 'ingest', 'events_per_s', default=0) / max(naive_ingest, 1):.2f}x",
        ),
        (
            "in-memory apply: naive dict-of-dicts loop (events/s)",
            f"{_get(r, 'apply', 'naive_dict_events_per_s', default=0):,.0f}",
            f"Persona's model: {_get(r, 'apply', 'apply_events_per_s', default=0) / max(_get(r, 'apply', 'naive_dict_events_per_s', default=1), 1):.2f}x",
        ),
        (
            "checkpoint writes: one row per feature, Feast style (profiles/s)",
            f"{_get(r, 'store', 'store_bench', 'feast_style_cassandra', 'profiles_per_s', default=0):,.0f}",
            f"Persona, one blob per profile: {_get(r, 'store', 'store_bench', 'cassandra', 'write_per_s', default=0) / max(_get(r, 'store', 'store_bench', 'feast_style_cassandra', 'profiles_per_s', default=1), 1):.1f}x",
        ),
    ]


def measured_bounds(r: dict) -> list[str]:
    """One line per unmet target: the measurement of this run that bounds it."""
    cores = os.cpu_count() or 1
    out = []
    apply = r.get("apply", {})
    if "id_lookup_ns" in apply:
        floor_us = apply["id_lookups_per_event"] * apply["id_lookup_ns"] / 1000
        out.append(
            f"**In-memory apply**: an event names {apply['id_lookups_per_event']:.0f} string ids "
            f"(user, item, topics); one dict lookup costs {apply['id_lookup_ns']:.0f} ns here, so "
            f"resolving them alone takes {floor_us:.2f} us/event, at most "
            f"{1e6 / floor_us:,.0f} events/s with nothing else done. Measured "
            f"{apply['apply_events_per_s']:,.0f} events/s."
            + (
                f" Recording freshness (the event and arrival delays' buckets) adds "
                f"{apply['freshness_record_ns_per_event']:.0f} ns/event, "
                f"{apply['freshness_share_of_apply']:.1%} of the apply."
                if "freshness_record_ns_per_event" in apply
                else ""
            )
        )
    ingest = r.get("ingest", {})
    if "cpu_us_per_event" in ingest:
        parts = ", ".join(
            f"{name} {us:.1f}" for name, us in ingest.get("cpu_us_per_event_by_process", {}).items()
        )
        out.append(
            f"**End-to-end ingest**: the machine was {ingest['machine_busy']:.0%} busy; every event "
            f"cost {ingest['cpu_us_per_event']:.1f} us of CPU in all ({parts}). "
            f"300,000 events/s on {cores} cores would need at most {cores * 1e6 / 300_000:.1f} us."
            + (
                f" The naive actors of the same run (no journal, no validation, dict-of-dicts) "
                f"took {ingest['naive']['events_per_s']:,.0f} events/s: "
                f"{ingest['to_naive']:.2f}x (target 0.50x, twice the 0.25x of the full run "
                f"before issue #16); Persona's own processes spent "
                f"{sum(ingest.get('cpu_us_per_event_by_process', {}).values()):.1f} us an "
                f"event ({parts})."
                if "to_naive" in ingest
                else ""
            )
            + _ingest_freshness(ingest)
        )
    checkpoint = r.get("checkpoint", {})
    store_writes = _get(r, "store", "store_bench", "cassandra", "write_per_s", default=0)
    if "encode_seconds" in checkpoint and store_writes:
        out.append(
            f"**Checkpoint**: writing {checkpoint['profiles']:,} profiles at the store's "
            f"rate in this run ({store_writes:,.0f}/s, the JVM on the same cores) takes "
            f"{checkpoint['profiles'] / store_writes:.1f} s by itself; encoding them takes "
            f"{checkpoint['encode_seconds']:.1f} s of the same CPU, overlapped with the writes. "
            f"Measured {checkpoint['seconds']:.1f} s."
        )
    memory = [m for m in r.get("memory", []) if "generator_mix" in m]
    if memory:
        out.append(_memory_bound(memory))
    http = r.get("http", {})
    ceiling = http.get("uvicorn_ceiling", {}).get("cpu_ms_per_request", 0)
    noop = http.get("serve_noop", {}).get("cpu_ms_per_request", 0)
    for route, name, extra in (
        ("profile", "GET profile", ""),
        ("recommendations", "GET recommendations", ", and the ranking (~0.5 ms)"),
        ("events_1000", "POST /v1/events", ", validation and the journal (see ingest)"),
    ):
        run = http.get(route, {})
        if "cpu_ms_per_request" in run:
            out.append(
                f"**{name}**: the machine was {run['machine_busy']:.0%} busy (wrk included) at "
                f"{run['req_per_s']:,.0f} req/s: {run['cpu_ms_per_request']:.2f} ms of CPU per "
                f"request, against {noop:.2f} ms for the no-op route under Serve and "
                f"{ceiling:.2f} ms under plain uvicorn + FastAPI. The difference to the first "
                f"is the shard hop and Persona's own work{extra}; to the second, Serve's "
                "request path (proxy, replica, metrics)."
            )
    return out


def _memory_bound(memory: list[dict]) -> str:
    """What a resident profile is made of, in the largest memory run."""
    m = memory[-1]
    uniform = [x for x in memory if "uniform" in x][-1:] or [m]
    mix, parts = m["generator_mix"], m["generator_mix"]["array_bytes_per_profile"]
    shape = mix["per_profile"]
    arrays = sum(parts.values())
    by_size = ", ".join(
        f"{x['users']:,} users {x['generator_mix']['bytes_per_profile']:,.0f} B" for x in memory
    )
    return (
        f"**Memory per profile** ({by_size}): the mix is {m['mix']}; a profile holds "
        f"{shape['recent']:.1f} recent actions, {shape['topics']:.1f} topics and "
        f"{shape['hidden']:.1f} hidden items on average, and {shape['filters']:.1%} of them a "
        f"filter of earlier items. At {m['users']:,} users the arrays are {arrays:,.0f} B a "
        f"profile (" + ", ".join(f"{k} {v:,.0f}" for k, v in parts.items()) + "; recent "
        f"actions 13 B each with exact float64 times, lists sized by class, allocated room "
        f"counted); the rest ({mix['bytes_per_profile'] - arrays:,.0f} B) is the user-id "
        f"index (a dict of str -> row) and the item vocabulary. The old uniform mix (20 "
        f"topics, 50 recent actions each) takes "
        f"{uniform[0].get('uniform', {}).get('bytes_per_profile', 0):,.0f} B at "
        f"{uniform[0]['users']:,} users; one Profile object per user (the first version) "
        f"{uniform[0].get('object_model_bytes_per_profile', 0):,.0f} B for that content."
    )


def _ingest_freshness(ingest: dict) -> str:
    """The shards' arrival -> applied delay during the ingest run (issue #14)."""
    shards = {
        name: f["arrival"]
        for name, f in ingest.get("freshness", {}).items()
        if f["arrival"].get("p50_s") is not None
    }
    if not shards:
        return ""
    return (
        " Arrival at the fleet -> applied in the shard (p50 / p99, the batches in flight "
        "queueing included): "
        + ", ".join(
            f"{name} {a['p50_s'] * 1000:,.0f} / {a['p99_s'] * 1000:,.0f} ms"
            for name, a in sorted(shards.items())
        )
        + "."
    )


def plot(r: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from bench.cluster_bench import plot_axes

    memory = [m for m in r.get("memory", []) if "bytes_per_profile" in m]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    plot_axes(r.get("scaling") or {}, axes[0], axes[1])
    if memory:
        users = [m["users"] for m in memory]
        axes[2].plot(
            users,
            [m["bytes_per_profile"] * m["users"] / 2**30 for m in memory],
            marker="o",
            color="tab:green",
        )
        axes[2].set(title="resident memory", xlabel="users", ylabel="GiB", xscale="log")
    fig.suptitle(f"Persona on {os.cpu_count()} cores ({'quick' if r.get('quick') else 'full'} run)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return True


# The configuration each durability mode runs with (README, "What an acknowledgement means").
MODE_CONFIG = {
    ("sqlite", "normal"): "WAL, synchronous=NORMAL",
    ("sqlite", "strict"): "WAL, synchronous=FULL",
    ("cassandra", "normal"): "commitlog_sync: periodic (10 s)",
    ("cassandra", "strict"): "commitlog_sync: batch",
}


def durability_section(d: dict) -> list[str]:
    if "sqlite" not in d and "cassandra" not in d:
        return []
    lines = [
        "",
        "## What strict durability costs (journal appends, one writer)",
        "",
        f"`store.append_journal` of {d['appends']:,} blobs of {d['blob_bytes']:,} B, one call "
        "at a time, each mode on a fresh journal, the two modes of a store taking turns in "
        f"blocks of 50 ({d['filesystem']}, {d['date']}; Cassandra: two nodes of the "
        "benchmark's own, one per commitlog mode, replication 1, LOCAL_QUORUM; appends are "
        'lightweight transactions). See README, "What an acknowledgement means".',
        "",
        "| store | durability | configuration | appends/s | p50 ms | p99 ms | cost of strict "
        "| machine busy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for store in ("sqlite", "cassandra"):
        modes = d.get(store, {})
        normal = modes.get("normal")
        for mode, f in modes.items():
            cost = (
                f"{normal['appends_per_s'] / f['appends_per_s']:.1f}x fewer appends/s, "
                f"p50 {f['p50_ms'] / normal['p50_ms']:.1f}x"
                if mode == "strict" and normal
                else ""
            )
            lines.append(
                f"| {store} | {mode} | {MODE_CONFIG.get((store, mode), '')} | "
                f"{f['appends_per_s']:,.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {cost} | "
                f"{f['machine_busy']:.0%} |"
            )
    return lines


def _short_error(text: str) -> str:
    """A store error in a few words: what could not be done and the driver's cause."""
    found = re.search(r"could not ([^:]+): (\w+)", text)
    if found:
        cause = found.group(2)
        if "ConnectionBusy" in text:
            cause += " (ConnectionBusy: the node stopped reading)"
        return f"could not {found.group(1)}: {cause}"
    found = re.search(r'message="([^"]+)"', text)
    return found.group(1) if found else text[:300]


def _errors(texts: list[str]) -> str:
    """Distinct short errors with how many times each happened."""
    counts: dict[str, int] = {}
    for text in texts:
        counts[_short_error(text)] = counts.get(_short_error(text), 0) + 1
    return "; ".join(f"{e}" + (f" (x{n})" if n > 1 else "") for e, n in counts.items())


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _concurrency_label(run: dict) -> str:
    """Signal chunks in flight: the setting's default, or the value the run forced."""
    if run["signal_concurrency_as_shipped"]:
        return f"default ({run['signal_concurrency']})"
    return f"{run['signal_concurrency']}"


def checkpoint_bounds_section(runs: list) -> list[str]:
    runs = [c for c in runs if "checkpoints" in c]
    if not runs:
        return []
    first = runs[0]
    limits = first.get("limits", {})
    lines = [
        "",
        "## Bounded checkpoints (issue #11)",
        "",
        f"`bench.checkpoint_bench` ({first['date']}): one ShardState owning all "
        f"{first['partitions']} partitions on Cassandra, no Ray. {first['items']:,} items, "
        f"each with trending and {first['neighbours_per_item']:.0f} co-engagement "
        f"neighbours (2*M, the most before a trim; {first['graph_links']:,} links); "
        f"{first['users']:,} users through the write path ({first['sources']} sources of "
        f"{first['source_events']:,} events, each leaving a dedup entry per partition it "
        f"touches); one file of {first['file_lines']:,} lines recorded in the dedup index "
        "as its ingest leaves it. Checkpoints as ProfileShard.checkpoint takes them (a "
        "failed one aborted and retried twice, as its ticker does), with traffic in "
        "between; then a new ShardState recovers. Limits as the node reports them: "
        f"batch_size_fail_threshold {limits.get('batch_size_fail_threshold', '?')}, "
        f"max_mutation_size {limits.get('max_mutation_size', '?')}, "
        f"native_transport_max_message_size {limits.get('native_transport_max_message_size', '?')}. "
        "The machine was shared with other engineers' tests (1-minute load average "
        + ", ".join(f"{c['loadavg'][0]:.0f}-{c['loadavg'][1]:.0f}" for c in runs)
        + f" on {first['cpus']} cores): seconds are noisy.",
        "",
        "| signal chunks in flight | checkpoint | s (encode / profiles / rest) | profiles "
        "| dedup entries | signal chunks, MiB | store requests | MiB written | outcome |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        label = _concurrency_label(run)
        for n, c in enumerate(run["checkpoints"], 1):
            if c.get("failed"):
                error = _errors([f["error"] for f in c["failures"]])
                lines.append(
                    f"| {label} | {n} | — | | | | | | **failed {len(c['failures'])} times**: "
                    f"{error} |"
                )
                continue
            w = c["writes"]
            retried = f" after {len(c['failures'])} failures" if c["failures"] else ""
            lines.append(
                f"| {label} | {n} | {c['seconds']:.1f} ({c['begin_s']:.1f} / "
                f"{c['profiles_s']:.1f} / {c['finish_s']:.1f}) | {c['profiles']:,} | "
                f"{c['dedup_entries']:,} | {c['signal_chunks']}, {_mib(c['signal_bytes'])} | "
                f"{w['requests']:,} | {_mib(w['bytes'])} | ok{retried} |"
            )
    lines += [
        "",
        "Largest single write of each kind (bytes bound into the statement; all runs, "
        "failed attempts included), against the limit that applies to it:",
        "",
        "| write | largest request | largest batch of several rows | largest row | limit |",
        "|---|---|---|---|---|",
    ]
    limit_of = {
        "profile batch": "batch of rows (a partition each) <= 50 KiB; row <= 16 MiB",
        "dedup batch": "batch of rows (a partition each) <= 50 KiB; row <= 16 MiB "
        "(a one-row batch is exempt from the batch threshold)",
        "signal chunk": "one statement: mutation <= 16 MiB, message <= 16 MiB",
        "checkpoint meta": "one statement: mutation <= 16 MiB",
        "journal trim": "one partition per batch: exempt from the batch threshold",
    }
    largest: dict[str, dict] = {}
    for run in runs:
        for kind, best in run["largest_write_bytes"].items():
            mine = largest.setdefault(kind, {k: 0 for k in best})
            for k, v in best.items():
                mine[k] = max(mine[k], v)
    for kind, best in largest.items():
        lines.append(
            f"| {kind} | {best['request']:,} | {best['multi_row_batch']:,} | "
            f"{best['row']:,} | {limit_of.get(kind, '')} |"
        )
    node = max(run["node_reported_largest_batch_bytes"] for run in runs)
    over = sorted({o for run in runs for o in run["over_limits"]})
    lines += [
        "",
        f"- Largest batch as the node itself counts it (its warnings past "
        f"batch_size_warn_threshold): {node:,} B, {node / first['batch_fail_threshold_bytes']:.0%} "
        "of batch_size_fail_threshold. "
        + ("Writes over a limit: " + "; ".join(over) + "." if over else "No write over a limit."),
        "- Traffic between checkpoints trims items it pushes past 2*M neighbours back to "
        "M, so later checkpoints carry fewer signal chunks; every checkpoint writes all of "
        "them, changed or not.",
        "- The bench fills the dedup index with a file's lines one by one, as ingest left "
        "it before bca482d (shards now record each batch's whole span: one interval per "
        f"partition). Filled that way, the file of {first['file_lines']:,} lines is "
        f"{first['file_dedup_intervals']:,} intervals in the dedup index "
        f"({first['file_dedup_memory_mib']:,.0f} MiB resident): its lines reach each "
        "partition's entry spread out, one interval per line, so a file's entries grow "
        "with the file and every checkpoint during its ingest rewrites them whole.",
    ]
    for run in runs:
        rec = run["recovery"]
        reads = ", ".join(
            f"{v['records']:,} {k.replace('_', ' ')} ({_mib(v['bytes'])} MiB)"
            for k, v in rec["reads"].items()
        )
        same = rec["same_as_before"]
        equal = all(v for k, v in same.items() if k != "file_entries_read")
        lines.append(
            f"- Recovery, {_concurrency_label(run)} chunks at a time: a new "
            f"ShardState.recover() took {rec['seconds']:.1f} s (connect {rec['connect_s']:.1f} s): "
            f"{rec['journal_rows_replayed']} journal rows replayed, read {reads or 'no signals'}; "
            + (
                "state equal to the shard's."
                if equal
                else "state NOT equal: "
                + ", ".join(k for k, v in same.items() if v is False)
                + " (signals never checkpointed: the journal replay rebuilds only what its "
                "rows hold)."
            )
        )
    old = first["old_single_blob"]
    lines.append(
        f"- The single blob this replaces (ItemStats.state() and 2,000 remembered batch ids "
        f"for each of {first['partitions']} partitions, in the checkpoint row) would be "
        f"{_mib(old['bytes'])} MiB ({_mib(old['item_stats_bytes'])} MiB of signals, "
        f"{_mib(old['batch_ids_bytes'])} MiB of batch ids) for the same state; offered to "
        f"the node: {_short_error(old['node'])}."
    )
    busy = any(
        "ConnectionBusy" in f["error"]
        for run in runs
        for c in run["checkpoints"]
        for f in c["failures"]
    )
    if busy:
        per_ip = limits.get("native_transport_max_request_data_in_flight_per_ip", "25.6 MiB")
        lines.append(
            "- Why the signal writes fail: `CassandraStore.put_signals` sends the chunks "
            "`write_concurrency` (64) at a time, ~32 MiB of ~512 KiB statements in flight on "
            "one connection. Past native_transport_max_request_data_in_flight_per_ip "
            f"({per_ip}: heap/40, and this node runs a 1 GiB heap) the node stops reading "
            "from the client, the socket fills, and the driver fails each request it cannot "
            "write at once (ConnectionBusy -> NoHostAvailable -> StoreUnavailable) instead of "
            "waiting. A retry sends the same burst: every checkpoint fails, the journal is never "
            "trimmed, and requests sent while the failed burst drains fail too. Sent 8 at a time "
            "(4 MiB in flight) the same checkpoints succeed."
        )
    failures = [f for run in runs for f in run.get("store_failures_outside_checkpoints", [])]
    if failures:
        lines.append(
            f"- {len(failures)} store calls failed outside checkpoints, right after a failed "
            f"one (retried): {_errors([f['error'] for f in failures])}."
        )
    return lines


def dedup_section(runs: list, r: dict) -> list[str]:
    dedup = [d for d in runs if d.get("bench") == "dedup"]
    if not dedup:
        return []
    by_bench = {d.get("bench"): d for d in runs}
    apply = by_bench.get("apply") or r.get("apply", {})
    naive = by_bench.get("naive_ingest") or r.get("naive_ingest", {})
    recorded = r.get("ingest", {})
    recorded_date = recorded.get("date") or _get(r, "machine", "date", default="?")

    def own(d: dict) -> float:
        return d.get("own_cpu_us_per_event") or sum(
            d.get("cpu_us_per_event_by_process", {}).values()
        )

    def processes(d: dict) -> str:
        return " / ".join(f"{v:.1f}" for v in d.get("cpu_us_per_event_by_process", {}).values())

    lines = [
        "",
        "## What dedup records cost on the write path (issue #11)",
        "",
        "`shard_bench dedup` is `shard_bench ingest` (2 shards, Cassandra, 4 batches in "
        "flight, no checkpoint during the run) with the shards' dedup work timed inside "
        "them, nothing turned off: keys per batch (`dedup_keys`, twice: prefetch and under "
        "the lock), reads of entries not in memory (`fetch_dedup`, `install_dedup`), "
        "`seen`, `record`. Then the same dedup work alone, in one process, on the same "
        "batches split as the fleet splits them, including the grouping of lines inside "
        "`prepare` and the checkpoints a shard would take with default settings "
        "(threshold, or every 30 s at the measured rate), which encode and write every "
        "changed entry. Sources: *file* is one `persona ingest` file (lines are line "
        "numbers); *request* is a fresh Idempotency-Key per batch (HTTP). CPU is per "
        "applied event, of this benchmark's processes only (the machine was shared: "
        "1-minute load average "
        + ", ".join(f"{d['loadavg'][0]:.0f}-{d['loadavg'][1]:.0f}" for d in dedup if "loadavg" in d)
        + f" on {dedup[0].get('cpus', '?')} cores; {dedup[0].get('date', '')}).",
        "",
        "| source, batch | events/s | CPU us/event: own (fleet / shards / Cassandra) "
        "| dedup in shards, us/event (share of shards) | dedup alone, us/event (share of own) "
        "| Cassandra for dedup, us/event | dedup reads: requests, keys "
        "| checkpoint dedup writes: rows, MiB (largest row) | entries, intervals | failed batches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in dedup:
        iso = d.get("isolated", {})
        writes = iso.get("checkpoint_writes", {})
        reads = iso.get("store_reads", {})
        failed = d.get("failed_batches", 0)
        batches = -(-d["events"] // d["batch"])
        failed_text = (
            f"**{failed} of {batches:,}**: {_short_error(d['first_error'])}" if failed else "0"
        )
        lines.append(
            f"| {d['sources']}, {d['batch']:,} | {d['events_per_s']:,.0f} | "
            f"{own(d):.1f} ({processes(d)}) | "
            f"{d.get('in_shards_dedup_cpu_us_per_event', 0):.2f} "
            f"({d.get('in_shards_dedup_share_of_shards_cpu') or 0:.0%}) | "
            f"{iso.get('dedup_cpu_us_per_event', 0):.2f} ({d.get('isolated_share_of_own_cpu', 0):.0%}) | "
            f"{iso.get('cassandra_cpu_us_per_event', 0):.2f} | "
            f"{reads.get('requests', 0):,}, {reads.get('keys', 0):,} | "
            f"{writes.get('rows', 0):,}, {_mib(writes.get('bytes', 0))} "
            f"({writes.get('largest_row_bytes', 0):,} B) | "
            f"{iso.get('entries', 0):,}, {iso.get('intervals', 0):,} | {failed_text} |"
        )
    if "events_per_s" in recorded:
        lines.append(
            f"| `ingest` in results.json ({recorded_date}; one id per 10,000-event batch) "
            f"| {recorded['events_per_s']:,.0f} | {own(recorded):.1f} ({processes(recorded)}) "
            "| | | | | | | |"
        )
    parts: dict[str, list[str]] = {}
    for d in dedup:
        for k, v in d.get("isolated", {}).get("cpu_us_per_event", {}).items():
            parts.setdefault(k, []).append(f"{v:.2f}")
    lines += [
        "",
        "- *dedup in shards* is what the shards' timers saw (CPU of the calling thread; "
        "the driver's I/O thread is not in it) and leaves out the grouping inside "
        "`prepare`; *dedup alone* has every part, checkpoints included, by part: "
        + "; ".join(f"{k} {' / '.join(v)}" for k, v in parts.items())
        + " us/event ("
        + ", ".join(f"{d['sources']}/{d['batch']:,}" for d in dedup)
        + "; *prepare* is all of prepare, for scale: it contains *seen* and the grouping).",
        "- A file's lines reach each partition's entry spread out (the file is not "
        "sorted by partition), so its entries hold about one interval per line, not "
        "one per file; a request's entry is small but each request makes one per "
        "partition it touches, a store read for each and a row at the next checkpoint.",
    ]
    capacity = load_settings().dedup_memory_entries
    for d in dedup:
        shards = d.get("shards", 1)
        timed = d.get("in_shards", {})
        if d.get("dedup_entries_dirty", 0) > capacity * shards:
            lines.append(
                f"- {d['sources']}/{d['batch']:,}: the shards held "
                f"{d['dedup_entries_resident']:,} entries, {d['dedup_entries_dirty']:,} of them "
                "changed since the last checkpoint (none is taken during the run), above "
                f"dedup_memory_entries ({capacity:,} per shard). Past it, every install and "
                "every record scans the whole index for a clean entry to drop "
                f"(`install_dedup` {_get(timed, 'install_dedup', 'cpu_us_per_event', default=0):.1f} "
                f"us/event, `record` {_get(timed, 'dedup.record', 'cpu_us_per_event', default=0):.1f} "
                "us/event in the shards), and the only clean entries are those just read for "
                "batches still in flight: those batches fail "
                f"({d.get('failed_batches', 0)} here). A shard gets there whenever more keys "
                "than that change between two of its checkpoints (30 s by default)."
            )
    if apply.get("apply_events_per_s") and naive.get("events_per_s"):
        then_apply = _get(r, "apply", "apply_events_per_s", default=0)
        then_naive = _get(r, "naive_ingest", "events_per_s", default=0)
        if by_bench.get("apply") and then_apply and then_naive:
            lines.append(
                "- Peers measured right after these runs, to tell the machine's state from "
                f"the change: in-memory apply {apply['apply_events_per_s']:,.0f} events/s "
                f"({apply['apply_events_per_s'] / then_apply:.2f}x the run of "
                f"{recorded_date}), naive actors {naive['events_per_s']:,.0f} events/s "
                f"({naive['events_per_s'] / then_naive:.2f}x)."
            )
        else:
            lines.append(
                f"- Same-run peers: in-memory apply {apply['apply_events_per_s']:,.0f} "
                f"events/s, naive actors {naive['events_per_s']:,.0f} events/s."
            )
    return lines


def exposures_section(e: dict) -> list[str]:
    lines = ["", "## Exposure logging: recommendations on and off (issue #14)", ""]
    if "on" not in e:
        return [*lines, f"Not measured: {e.get('error', 'no run')}."]
    lines += [
        f"`bench.exposure_bench` ({e['date']}): the same app deployed with exposure logging "
        "on and with `PERSONA_EXPOSURE_LOGGING=0`, on one fleet of "
        f"{e['users']:,} users and {e['items']:,} items (SQLite store, "
        f"{e['ingress_replicas']} ingress replicas, Serve's own proxy), alternating "
        f"on/off then off/on over {e['rounds']} rounds; each deployment warmed up, then "
        f"`GET /v1/users/{{u}}/recommendations?k=20` for {e['seconds']} s with wrk "
        f"({e['connections']} connections). Medians of the rounds; the machine is shared, "
        "so the ratio is the figure, not the absolute rates.",
        "",
        "| exposure logging | req/s | p50 ms | p99 ms | CPU ms/request (machine) | non-2xx |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("on", "off"):
        f = e[mode]
        lines.append(
            f"| {mode} | {f['req_per_s']:,.0f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} | "
            f"{f['cpu_ms_per_request']:.2f} | {f['non_2xx']} |"
        )
    per_round = "; ".join(
        f"round {run['round'] + 1} {mode} {run['req_per_s']:,.0f}"
        for mode in ("on", "off")
        for run in e["runs"][mode]
    )
    lines += [
        "",
        f"With exposure logging on, recommendations run at **{e['on_to_off']:.2f}x** the "
        f"throughput without it (req/s per run: {per_round}).",
    ]
    return lines


def grpc_section(g: dict) -> list[str]:
    lines = ["", "## gRPC reads beside HTTP (issue #16)", ""]
    if "profile" not in g:
        return [*lines, f"Not measured: {g.get('error', 'no run')}."]
    lines += [
        f"`bench.grpc_bench` ({g['date']}): one app serving both protocols ({g['users']:,} "
        f"users, {g['ingress_replicas']} ingress replicas, {g['proxy']} in front of HTTP and "
        "gRPC), both driven by the same kind of client: a Python asyncio process (grpc.aio "
        f"over {g['channels']} channels; aiohttp, a connection per request in flight), "
        f"{g['connections']} requests in flight ({g['batch_connections']} for lookups of "
        f"{g['batch']} ids), {g['seconds']:.0f} s per run, modes alternating over "
        f"{g['rounds']} rounds, medians. The client shares the cores: its CPU is shown. Server "
        "CPU is that of the benchmark's own Ray processes per request (replicas + shards + "
        "HAProxy or Serve's proxy + the rest of Ray), so other load on the machine does not "
        "move it.",
        "",
        "| read | protocol | req/s | profiles/s | p50 ms | p99 ms | server CPU ms/request (replicas + shards + proxy) | client CPU ms/request | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reads = [("GetProfile / GET profile", "profile", 1)]
    if "batch_lookup" in g:
        reads.append(
            (f"BatchGetProfiles / POST batchGet ({g['batch']} ids)", "batch_lookup", g["batch"])
        )
    for name, key, ids in reads:
        for mode, label in (("grpc", "gRPC"), ("http", "HTTP")):
            f = g[key][mode]
            server = (
                f"{f['server_cpu_ms_per_request']:.2f} ({f['server_cpu_ms_replicas']:.2f} + "
                f"{f['server_cpu_ms_shards']:.2f} + {f['server_cpu_ms_proxy']:.2f})"
            )
            lines.append(
                f"| {name} | {label} | {f['req_per_s']:,.0f} | {f['req_per_s'] * ids:,.0f} | "
                f"{f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {server} | "
                f"{f['client_cpu_ms_per_request']:.2f} | {f['errors']} |"
            )
    wrk = g.get("profile_wrk")
    if wrk:
        lines.append(
            f"| GET profile, wrk instead of the Python client | HTTP | {wrk['req_per_s']:,.0f} | "
            f"{wrk['req_per_s']:,.0f} | {wrk['p50_ms']:.1f} | {wrk['p99_ms']:.1f} | "
            f"— | — | {wrk['non_2xx']} non-2xx |"
        )
    lines += [
        "",
        f"gRPC answers profile reads at **{g['grpc_to_http']:.2f}x** the HTTP rate"
        + (
            f" and batch lookups at **{g['batch_grpc_to_http']:.2f}x**"
            if "batch_grpc_to_http" in g
            else ""
        )
        + " in the same run (404s and NOT_FOUNDs of users without events count as answers); "
        "the server spends "
        + " and ".join(
            f"{g[key]['grpc']['server_cpu_ms_per_request'] / g[key]['http']['server_cpu_ms_per_request']:.2f}x"
            f" the CPU per {what}"
            for key, what in (("profile", "profile read"), ("batch_lookup", "lookup"))
            if key in g and "server_cpu_ms_per_request" in g[key]["http"]
        )
        + " over gRPC.",
    ]
    return lines


def movielens_section(m: dict) -> list[str]:
    """Issue #13's evaluation on real data, from `persona evaluate`'s JSON, followed by
    the hand-kept protocol and choices (bench/MOVIELENS.md)."""
    from jobs.evaluate import markdown

    lines = [
        "",
        "## Recommendations on MovieLens-100k",
        "",
        "```",
        "persona evaluate --dataset movielens-100k --tune --http",
        "```",
        "",
    ]
    if "test" not in m:
        lines.append(f"Not measured in this run: {m.get('error', 'no run')}.")
    else:
        chosen = m.get("chosen", {})
        variants = "; ".join(f"`{name}` {blend}" for name, blend in m["variants"].items())
        lines += [
            f"Regenerated by `persona bench` (`python -m bench.run_all --only movielens` for "
            f"this section alone): {m['machine']}, {m['date']}, {m.get('wall_s', 0) / 60:.0f} "
            f"min, baselines in the same run. {m['events']:,} events, {m['catalog']:,} films, "
            f"{m['holdout']} ratings held out per user. Variants: {variants}. `--tune` chose "
            f"{chosen.get('blend')} on validation (ALS: {chosen.get('als_factors')} factors); "
            f"the training job published and switched to `{m['model']['version']}`.",
        ]
        if "validation" in m:
            lines += [
                "",
                f"Validation ({m['validation_users']} users):",
                "",
                markdown(m["validation"]),
            ]
        lines += [
            "",
            f"Test ({m['users_evaluated']} users; scored once, after everything was chosen):",
            "",
            markdown(m["test"]),
        ]
        test = m["test"]
        http = test.get("persona-http") or test["persona"]
        before = test.get("persona-before")
        recall = "recall@10"

        def times(row: dict, base: str) -> str:
            return f"{row[recall] / max(test[base][recall], 1e-12):.2f}x"

        summary = (
            f"Through HTTP, after the training job, Persona's Recall@10 is "
            f"**{http[recall]:.4f}**: {times(http, 'popularity')} popularity and "
            f"**{times(http, 'item-knn')} item-kNN** ({test['item-knn'][recall]:.4f}) in the "
            "same run"
        )
        if before:
            summary += f" (before training {before[recall]:.4f} = {times(before, 'item-knn')})"
        lines += ["", summary + "."]
    notes = HERE / "MOVIELENS.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return lines


def render(r: dict, facts: dict) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Regenerated by `make bench` (`make bench-quick` for the short run); the raw figures "
        "are in `bench/results.json`. Do not edit by hand: notes live in `bench/NOTES.md`.",
        "",
        f"Run: **{'quick' if r['quick'] else 'full'}**, {facts['date']}. Machine: {facts['cpus']} cores, "
        f"{facts['memory_gb']} GB RAM, Python {facts['python']}, Ray {facts['ray']}, Cassandra "
        f"{facts['cassandra']} (single local node on the same cores), {facts['platform']}.",
        "",
        "## Targets",
        "",
        "| figure | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, target, measured, ok in targets(r):
        verdict = "yes" if ok else ("**no**" if ok is False else "—")
        lines.append(f"| {name} | {target} | {measured} | {verdict} |")
    lines += [
        "",
        "## Peer baselines (same run)",
        "",
        "| baseline | measured | Persona |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in peers(r)]
    bounds = measured_bounds(r)
    if bounds:
        lines += ["", "## What stops the unmet targets (measured in this run)", ""]
        lines += [f"- {b}" for b in bounds]
    quality = r.get("quality", {})
    if "persona" in quality:
        lines += [
            "",
            "## Recommendation quality",
            "",
            f"`persona evaluate` on a generated data set (2,000 users, 1,000 items, 100,000 events; "
            f"chronological split per user, last 20% held out, {quality['users_evaluated']} users):",
            "",
            "| recommender | Recall@10 | NDCG@10 |",
            "|---|---|---|",
            f"| Persona | {quality['persona']['recall']:.4f} | {quality['persona']['ndcg']:.4f} |",
            f"| global popularity (same split) | {quality['popularity']['recall']:.4f} | {quality['popularity']['ndcg']:.4f} |",
        ]
    lines += movielens_section(r.get("movielens") or {})
    lines += exposures_section(r.get("exposures") or {})
    lines += grpc_section(r.get("grpc") or {})
    lines += durability_section(_get(r, "durability", "durability_bench", default={}))
    lines += checkpoint_bounds_section(r.get("checkpoint_bounds") or [])
    lines += dedup_section(r.get("dedup") or [], r)
    elastic = r.get("elastic", {})
    if "move" in elastic:
        lines += [
            "",
            "## Elasticity",
            "",
            f"- Moving one partition holding {elastic['move']['users_in_partition']:,} users "
            f"(dirty, so it includes their checkpoint): {elastic['move']['move_seconds']:.2f} s.",
            f"- Profile reads during a 2 -> 4 scale-out ({elastic['scale_out']['scale_2_to_4_s']:.1f} s): "
            f"p50 {elastic['scale_out']['during_p50_ms']:.1f} ms, p99 {elastic['scale_out']['during_p99_ms']:.1f} ms, "
            f"max {elastic['scale_out']['during_max_ms']:.0f} ms (steady: p99 {elastic['scale_out']['steady_p99_ms']:.1f} ms).",
            f"- Reads of users loaded from the store (cold) p50 {elastic['cold_vs_resident']['cold']['p50_ms']:.1f} ms / "
            f"p99 {elastic['cold_vs_resident']['cold']['p99_ms']:.1f} ms; resident p50 "
            f"{elastic['cold_vs_resident']['resident']['p50_ms']:.1f} ms / p99 {elastic['cold_vs_resident']['resident']['p99_ms']:.1f} ms.",
            f"- Ingest of {elastic['ingest_under_cap']['users']:,} users under a cap of "
            f"{elastic['ingest_under_cap']['cap_per_shard']:,} per shard: "
            f"{elastic['ingest_under_cap']['events_per_s']:,.0f} events/s; max resident "
            f"{elastic['ingest_under_cap']['max_resident']:,}, evicted {elastic['ingest_under_cap']['evicted']:,}.",
        ]
    if r.get("scaling"):
        from bench.cluster_bench import section

        lines += section(r["scaling"])
        lines.append("")
        lines.append(
            "Memory: "
            + ", ".join(
                f"{m['users']:,} users -> {m['bytes_per_profile'] * m['users'] / 2**30:.2f} GiB"
                for m in r.get("memory", [])
                if "bytes_per_profile" in m
            )
            + "."
        )
    lines += ["", "## Commands", ""]
    for value in r.values():
        for entry in value if isinstance(value, list) else [value]:
            if isinstance(entry, dict) and "command" in entry:
                lines.append(f"- `{entry['command']}` ({entry.get('wall_s', '?')} s)")
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 5 minutes)")
    parser.add_argument(
        "--render", action="store_true", help="only regenerate RESULTS.md and the plot"
    )
    parser.add_argument(
        "--only",
        choices=sorted(SEPARATE),
        help="run one benchmark, merge its figures into results.json and regenerate RESULTS.md",
    )
    args = parser.parse_args(argv)
    if args.only:
        figures = SEPARATE[args.only](sizes(args.quick))
        # Read after the run: another --only may have written meanwhile.
        results = json.loads((HERE / "results.json").read_text())
        results[args.only] = figures
        (HERE / "results.json").write_text(json.dumps(results, indent=2))
        args.render = True
    if args.render:
        results = json.loads((HERE / "results.json").read_text())
        plot(results, HERE / "scaling.png")
        (HERE / "RESULTS.md").write_text(render(results, results["machine"]))
        write_capacity(results)
        return 0
    from storage.cassandra_local import LocalNode

    node = LocalNode.from_settings(load_settings())
    started_node = False
    if not node.cql_ready():
        print(node.start(), flush=True)
        started_node = True
    try:
        results = collect(args.quick)
        facts = machine()
    finally:
        if started_node:
            print(node.stop())
    results["machine"] = facts
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, HERE / "scaling.png")
    (HERE / "RESULTS.md").write_text(render(results, facts))
    print(f"wrote {HERE / 'results.json'}, {HERE / 'RESULTS.md'}, {HERE / 'scaling.png'}")
    write_capacity(results)
    return 0


def write_capacity(results: dict) -> None:
    """bench/CAPACITY.md from these results; figures missing are named (and the last
    CAPACITY.md kept), not fatal."""
    from bench import capacity

    try:
        capacity.write_capacity(results, HERE / "CAPACITY.md")
        print(f"wrote {HERE / 'CAPACITY.md'}")
    except capacity.MissingFigures as exc:
        print(f"{HERE / 'CAPACITY.md'} not regenerated: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
