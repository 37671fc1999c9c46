"""Run every benchmark, write bench/results.json and regenerate bench/RESULTS.md (and
bench/scaling.png): each figure next to its target, with the peer baselines measured
in the same run and the machine it ran on.

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
            "durability_appends": 1_000,
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
        "durability_appends": 3_000,
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


# Benchmarks that can also run alone (--only NAME), merged into the last results.json.
SEPARATE = {"durability": run_durability}


def collect(quick: bool) -> dict:
    size = sizes(quick)
    r: dict = {"quick": quick}
    r["store"] = run_module("bench.store_bench", "--profiles", str(size["store"]))
    r["durability"] = run_durability(size)
    r["apply"] = run_module("bench.shard_bench", "apply", "--batches", str(size["apply_batches"]))
    r["ingest"] = run_module("bench.shard_bench", "ingest", "--events", str(size["ingest"]))
    r["naive_ingest"] = run_module(
        "bench.shard_bench", "naive_ingest", "--events", str(size["ingest"])
    )
    r["checkpoint"] = run_module(
        "bench.shard_bench", "checkpoint", "--profiles", str(size["checkpoint"])
    )
    r["recovery"] = run_module("bench.shard_bench", "recovery", "--users", str(size["recovery"]))
    r["memory"] = [
        run_module("bench.shard_bench", "memory", "--users", str(n)) for n in size["memory"]
    ]
    r["http"] = run_module(
        "bench.http_bench",
        "--seconds",
        str(size["http_s"]),
        "--users",
        str(size["http_users"]),
        "--items",
        str(size["http_items"]),
    )
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
    r["scaling"] = [
        run_module(
            "bench.shard_bench",
            "ingest",
            "--events",
            str(size["scaling_events"]),
            "--shards",
            str(shards),
            "--read-seconds",
            "3",
        )
        for shards in (1, 2, 4)
    ]
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
            f"resident bytes per profile ({_get(memory, -1, 'users', default=0):,} users)",
            "<= 1,024",
            _get(memory, -1, "bytes_per_profile"),
            lambda v: v <= 1024,
        ),
        row(
            "GET profile req/s (32 conns)",
            ">= 2,000",
            _get(http, "profile", "req_per_s"),
            lambda v: v >= 2000,
        ),
        row(
            "GET profile p99 ms",
            "<= 25",
            _get(http, "profile", "p99_ms"),
            lambda v: v <= 25,
            "{:.1f}",
        ),
        row(
            "GET recommendations req/s",
            ">= 1,000",
            _get(http, "recommendations", "req_per_s"),
            lambda v: v >= 1000,
        ),
        row(
            "GET recommendations p99 ms",
            "<= 50",
            _get(http, "recommendations", "p99_ms"),
            lambda v: v <= 50,
            "{:.1f}",
        ),
        row(
            "POST /v1/events, events/s (1,000-event batches)",
            ">= 100,000",
            _get(http, "events_1000", "events_per_s"),
            lambda v: v >= 100_000,
        ),
        row(
            "Recall@10 / popularity baseline (generated data)",
            ">= 1.5x",
            _get(r, "quality", "recall_lift"),
            lambda v: v >= 1.5,
            "{:.2f}x",
        ),
    ]
    return rows


def peers(r: dict) -> list[tuple[str, str, str]]:
    http = r.get("http", {})
    return [
        (
            "reads: plain uvicorn + FastAPI dict lookup (req/s, p99 ms)",
            f"{_get(http, 'uvicorn_ceiling', 'req_per_s', default=0):,.0f}, {_get(http, 'uvicorn_ceiling', 'p99_ms', default=0):.1f}",
            f"Persona GET profile is {_get(http, 'profile_to_ceiling', default=0):.2f}x of it",
        ),
        (
            "ingest: naive dict-of-dicts actors, no journal (events/s)",
            f"{_get(r, 'naive_ingest', 'events_per_s', default=0):,.0f}",
            f"Persona with the Cassandra journal: {_get(r, 'ingest', 'events_per_s', default=0) / max(_get(r, 'naive_ingest', 'events_per_s', default=1), 1):.2f}x",
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
    memory = [m for m in r.get("memory", []) if "dense_row_bytes" in m]
    if memory:
        m = memory[-1]
        out.append(
            f"**Memory per profile**: a profile's row (64 topic slots, 100 recent actions with "
            f"exact float64 times) is {m['dense_row_bytes']:,.0f} B of arrays, allocated whole; the "
            f"rest is the user-id index. One Profile object per user (the first version) takes "
            f"{m['object_model_bytes_per_profile']:,.0f} B for the same content."
        )
    http = r.get("http", {})
    ceiling = http.get("uvicorn_ceiling", {}).get("cpu_ms_per_request", 0)
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
                f"request, against {ceiling:.2f} ms for plain uvicorn + FastAPI. The difference "
                f"is Serve's request path (HTTP server, middlewares, metrics), the shard hop{extra}."
            )
    return out


def plot(r: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scaling = [s for s in r.get("scaling", []) if "events_per_s" in s]
    memory = [m for m in r.get("memory", []) if "bytes_per_profile" in m]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if scaling:
        shards = [s["shards"] for s in scaling]
        axes[0].plot(shards, [s["events_per_s"] for s in scaling], marker="o")
        axes[0].set(
            title="ingest throughput (Cassandra journal)", xlabel="shards", ylabel="events/s"
        )
        axes[1].plot(shards, [s["read_p99_ms"] for s in scaling], marker="o", color="tab:orange")
        axes[1].set(title="profile read p99 (fleet)", xlabel="shards", ylabel="ms")
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
    lines += durability_section(_get(r, "durability", "durability_bench", default={}))
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
        lines += [
            "",
            "## Scaling",
            "",
            "![scaling](scaling.png)",
            "",
            "| shards | ingest events/s | read p99 ms |",
            "|---|---|---|",
        ]
        for s in r["scaling"]:
            if "events_per_s" in s:
                lines.append(
                    f"| {s['shards']} | {s['events_per_s']:,.0f} | {s['read_p99_ms']:.1f} |"
                )
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
        results = json.loads((HERE / "results.json").read_text())
        results[args.only] = SEPARATE[args.only](sizes(args.quick))
        (HERE / "results.json").write_text(json.dumps(results, indent=2))
        args.render = True
    if args.render:
        results = json.loads((HERE / "results.json").read_text())
        plot(results, HERE / "scaling.png")
        (HERE / "RESULTS.md").write_text(render(results, results["machine"]))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
