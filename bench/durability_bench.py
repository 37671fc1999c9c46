"""What strict durability costs: journal appends/s and append latency, one writer, per
store and durability mode (SQLite synchronous NORMAL vs FULL, Cassandra commitlog
periodic vs batch), all in one run.

    python -m bench.durability_bench [--appends 3000 --blob-bytes 2048 --stores sqlite,cassandra]

Each mode appends the same ~2 KB blobs to a fresh journal with store.append_journal,
one call at a time, timing each; the two modes of a store take turns in blocks of 50,
so load from elsewhere on the machine falls on both alike. SQLite files live under
the data dir (the disk whose fsync is measured). Cassandra runs on two nodes of this
benchmark's own (free ports, a temporary directory under the data dir), each started
with the cassandra.yaml `persona cassandra start` writes for its mode, and stopped
afterwards; a node on the usual port is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine_cpu
from persona.settings import load_settings
from storage import open_store
from storage.cassandra_local import LocalNode

MODES = ("normal", "strict")
# JIT and connection warm-up of a fresh JVM; not timed.
WARMUP_APPENDS = 300
# Appends per turn when the modes take turns.
BLOCK = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def filesystem(path: Path) -> str:
    """The device and filesystem type holding path (from /proc/mounts)."""
    best = ("", "?", "?")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount, kind = line.split()[:3]
            if str(path).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, device, kind)
    return f"{best[2]} on {best[1]}"


def time_appends(stores: dict, count: int, blob: bytes) -> dict[str, dict]:
    """Append count rows to each store, one call at a time, in alternating blocks, so
    that whatever else the machine does at the time is shared by the modes compared."""
    for mode, store in stores.items():
        for seq in range(1, WARMUP_APPENDS + 1):
            store.append_journal(f"warmup-{mode}", seq, blob)
    latencies: dict[str, list[float]] = {mode: [] for mode in stores}
    elapsed = dict.fromkeys(stores, 0.0)
    busy_before, total_before = machine_cpu()
    for round_, first in enumerate(range(1, count + 1, BLOCK)):
        order = list(stores) if round_ % 2 == 0 else list(reversed(stores))
        for mode in order:
            started = time.perf_counter()
            for seq in range(first, min(first + BLOCK, count + 1)):
                t0 = time.perf_counter()
                stores[mode].append_journal(f"bench-{mode}", seq, blob)
                latencies[mode].append(time.perf_counter() - t0)
            elapsed[mode] += time.perf_counter() - started
    busy_after, total_after = machine_cpu()
    busy = (busy_after - busy_before) / max(1, total_after - total_before)
    results = {}
    for mode, times in latencies.items():
        cuts = statistics.quantiles(times, n=100)
        results[mode] = {
            "appends": count,
            "appends_per_s": count / elapsed[mode],
            "p50_ms": cuts[49] * 1000,
            "p99_ms": cuts[98] * 1000,
            "max_ms": max(times) * 1000,
            "machine_busy": busy,
        }
    return results


def bench_sqlite(workdir: Path, count: int, blob: bytes) -> dict:
    stores = {
        mode: open_store(f"sqlite:///{workdir}/sqlite-{mode}.db", load_settings(durability=mode))
        for mode in MODES
    }
    try:
        results = time_appends(stores, count, blob)
        for mode, store in stores.items():
            results[mode]["synchronous"] = store._db.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        for store in stores.values():
            store.close()
    return results


def bench_cassandra(workdir: Path, count: int, blob: bytes) -> dict:
    """Two nodes of this benchmark's own, one per commitlog mode, running side by side
    (a write goes to one of them at a time)."""
    nodes, stores = {}, {}
    try:
        for mode in MODES:
            settings = load_settings(
                data_dir=str(workdir),
                durability=mode,
                cassandra_port=free_port(),
                cassandra_storage_port=free_port(),
            )
            nodes[mode] = LocalNode.from_settings(settings)
            print(nodes[mode].start(), f"({mode})", flush=True)
            stores[mode] = open_store(
                f"cassandra://127.0.0.1:{settings.cassandra_port}/durability_bench"
                "?replication=1&consistency=LOCAL_QUORUM",
                settings,
            )
        results = time_appends(stores, count, blob)
        for mode, store in stores.items():
            # What the node really runs, not what was asked for.
            results[mode]["commitlog_sync"] = store.commitlog_sync()
    finally:
        for store in stores.values():
            store.close()
        for node in nodes.values():
            print(node.stop(), flush=True)
    return results


def run(count: int, blob_bytes: int, stores: list[str]) -> dict:
    data_dir = Path(load_settings().data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(blob_bytes)
    results: dict = {
        "appends": count,
        "blob_bytes": blob_bytes,
        "filesystem": filesystem(data_dir.resolve()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(dir=data_dir, prefix="durability-bench-") as tmp:
        if "sqlite" in stores:
            results["sqlite"] = bench_sqlite(Path(tmp), count, blob)
        if "cassandra" in stores:
            results["cassandra"] = bench_cassandra(Path(tmp), count, blob)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=3_000)
    parser.add_argument("--blob-bytes", type=int, default=2_048)
    parser.add_argument("--stores", default="sqlite,cassandra")
    args = parser.parse_args()
    results = run(args.appends, args.blob_bytes, args.stores.split(","))
    for store in ("sqlite", "cassandra"):
        for mode, f in results.get(store, {}).items():
            print(
                f"{store:9s} {mode:6s} {f['appends_per_s']:>8,.0f} appends/s  "
                f"p50 {f['p50_ms']:6.2f} ms  p99 {f['p99_ms']:6.2f} ms  "
                f"(machine {f['machine_busy']:.0%} busy)"
            )
    print(json.dumps({"durability_bench": results, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
