"""Bounded checkpoints on Cassandra (issue #11): one shard owning all 256 partitions,
100k items with a dense co-engagement graph, many dedup entries and dirty profiles.

    python -m bench.checkpoint_bench [--items 100000 --users 50000 --sources 200
                                      --file-lines 2000000 --checkpoints 3]

No Ray: a ShardState on a fresh keyspace of the local node (`persona cassandra
start`), dropped afterwards. The state is filled the way a shard fills it:

- ``--sources`` batches through the shard's own write path (check, load users and
  dedup entries, prepare, journal append, apply, record lines), each from its own
  file-like source, so each leaves one dedup entry per partition it touches;
- one big file of ``--file-lines`` lines recorded in the dedup index as its
  ingest would leave it (its lines spread over the partitions by user);
- item signals: trending for every item and 2*M co-engagement neighbours each
  (the most the graph holds before it trims an item to its strongest M).

Then ``--checkpoints`` checkpoints run as ProfileShard.checkpoint runs them (begin,
pending deletes, profiles a chunk at a time, finish), with more traffic in between.
Every store request is counted by kind, with the largest request, the largest
batch of several rows (profile and dedup rows are a partition each, so such a batch
is what batch_size_fail_threshold applies to; a journal trim's two rows share one)
and the largest row (one mutation: what max_mutation_size applies to), and the batch
sizes the node itself reports (its warnings past batch_size_warn_threshold). A new
ShardState then recovers from the store. Finally the checkpoint meta as it was
before item signals were chunked and before the dedup table (one blob: the item
signals and 2,000 remembered batch ids per partition) is encoded for the same state
and offered to the node.

``--signal-concurrency N`` writes the signal chunks N at a time instead of the
store's write_concurrency (64): as shipped, 64 chunks of ~512 KiB in flight exceed
the node's native_transport_max_request_data_in_flight_per_ip (heap/40), the node
stops reading and the driver fails the write (ConnectionBusy); see bench/RESULTS.md.

Prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import resource
import sys
import threading
import time
import uuid
from collections import defaultdict

from actors.shard_state import CHECKPOINT_CHUNK, Ack, ShardState
from bench.common import T0, drop, store_url, synthetic_events
from persona.errors import PersonaError
from persona.settings import load_settings
from storage import Checkpoint, codec, open_store

PARTITIONS = 256
KiB, MiB = 1024, 1024 * 1024

# --- counting every store request -----------------------------------------------------


class WriteLog:
    """Store writes by kind, counted at the driver: requests (a batch, or one
    statement), rows, bound bytes, the largest of each, and the batch sizes the node
    reports back (its warnings name the size it checks against the threshold).

    Kinds come from the store method that sent them (a thread-local set around each
    call, since profile chunks are written from a worker thread). A request is counted
    when it is handed to the driver, so a failed write counts what it tried to send."""

    KINDS = {
        "put_profiles": "profile batch",
        "put_dedup": "dedup batch",
        "put_signals": "signal chunk",
        "put_checkpoint": "checkpoint meta",
        "trim_journal": "journal trim",
        "append_journal": "journal append",
        "delete_profiles": "profile delete",
        "add_tombstones": "tombstone",
    }
    READS = ("SELECT",)

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.kinds: dict[str, dict] = {}
            self.node_batch_sizes: list[int] = []

    def _entry(self, kind: str) -> dict:
        return self.kinds.setdefault(
            kind,
            {
                "requests": 0,
                "rows": 0,
                "bytes": 0,
                "seconds": 0.0,
                "largest_request_bytes": 0,
                "largest_row_bytes": 0,
                "largest_multi_row_batch_bytes": 0,
                "largest_multi_row_batch_rows": 0,
            },
        )

    def record(self, rows: list[int], batch: bool) -> None:
        kind = getattr(self.local, "kind", None)
        if kind is None:
            return
        size = sum(rows)
        with self.lock:
            e = self._entry(kind)
            e["requests"] += 1
            e["rows"] += len(rows)
            e["bytes"] += size
            e["largest_request_bytes"] = max(e["largest_request_bytes"], size)
            e["largest_row_bytes"] = max(e["largest_row_bytes"], max(rows, default=0))
            if batch and len(rows) > 1 and size > e["largest_multi_row_batch_bytes"]:
                e["largest_multi_row_batch_bytes"] = size
                e["largest_multi_row_batch_rows"] = len(rows)

    def install(self, store) -> None:
        """Count the writes of this store (a CassandraStore) from now on."""
        from cassandra.cluster import ResponseFuture
        from cassandra.query import BatchStatement

        import storage.cassandra_store as cs

        log = self

        def batch_rows(batch) -> list[int]:
            return [
                sum(len(v) for v in values if v is not None)
                for _prepared, _stmt, values in batch._statements_and_parameters
            ]

        def is_write(statement) -> bool:
            text = getattr(statement, "query_string", None) or str(statement)
            return not text.lstrip().upper().startswith(log.READS)

        if not getattr(cs, "_bench_counted", False):
            real_concurrent, real_with_args = cs.execute_concurrent, cs.execute_concurrent_with_args

            def execute_concurrent(session, statements_and_params, *args, **kwargs):
                statements_and_params = list(statements_and_params)
                for statement, params in statements_and_params:
                    if isinstance(statement, BatchStatement):
                        log.record(batch_rows(statement), batch=True)
                    elif is_write(statement):
                        log.record([_params_bytes(params)], batch=False)
                return real_concurrent(session, statements_and_params, *args, **kwargs)

            def execute_concurrent_with_args(session, statement, parameters, *args, **kwargs):
                parameters = list(parameters)
                if is_write(statement):
                    for params in parameters:
                        log.record([_params_bytes(params)], batch=False)
                return real_with_args(session, statement, parameters, *args, **kwargs)

            cs.execute_concurrent = execute_concurrent
            cs.execute_concurrent_with_args = execute_concurrent_with_args
            real_set_result = ResponseFuture._set_result

            def set_result(future, host, connection, pool, response):
                for warning in getattr(response, "warnings", None) or ():
                    found = re.search(r"Batch for .* is of size (\d+)", warning)
                    if found:
                        with log.lock:
                            log.node_batch_sizes.append(int(found.group(1)))
                return real_set_result(future, host, connection, pool, response)

            ResponseFuture._set_result = set_result
            cs._bench_counted = True

        session = store._session
        real_execute = session.execute

        def execute(query, parameters=None, *args, **kwargs):
            if isinstance(query, BatchStatement):
                log.record(batch_rows(query), batch=True)
            elif is_write(query):
                log.record([_params_bytes(parameters)], batch=False)
            return real_execute(query, parameters, *args, **kwargs)

        session.execute = execute
        for method, kind in self.KINDS.items():
            setattr(store, method, self._tagged(getattr(store, method), kind))

    def _tagged(self, method, kind: str):
        log = self

        def call(*args, **kwargs):
            outer = getattr(log.local, "kind", None)
            log.local.kind = kind
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                log.local.kind = outer
                with log.lock:
                    log._entry(kind)["seconds"] += time.perf_counter() - started

        return call

    def summary(self) -> dict:
        with self.lock:
            kinds = {k: dict(v) for k, v in self.kinds.items()}
            sizes = list(self.node_batch_sizes)
        return {
            "by_kind": kinds,
            "requests": sum(v["requests"] for v in kinds.values()),
            "rows": sum(v["rows"] for v in kinds.values()),
            "bytes": sum(v["bytes"] for v in kinds.values()),
            "node_reported_batches_over_warn": len(sizes),
            "node_reported_largest_batch_bytes": max(sizes, default=0),
        }


def _params_bytes(params) -> int:
    if not params:
        return 0
    size = 0
    for value in params:
        if isinstance(value, bytes | bytearray | memoryview):
            size += len(value)
        elif isinstance(value, str):
            size += len(value.encode())
        elif value is not None:
            size += 8
    return size


def code_version() -> str:
    """The commit measured, '+changes' if the working tree differs from it (several
    people edit it at once): what a figure belongs to."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git(
        "status", "--porcelain", "--untracked-files=no", "--", "actors", "storage", "persona"
    )
    return commit + ("+changes" if changed else "")


def node_limits(store) -> dict:
    """The limits the node runs with, as it reports them (system_views, Cassandra 4+)."""
    wanted = {
        "batch_size_warn_threshold",
        "batch_size_fail_threshold",
        "max_mutation_size",
        "commitlog_segment_size",
        "native_transport_max_message_size",
        "native_transport_max_request_data_in_flight_per_ip",
    }
    try:
        rows = store._session.execute("SELECT name, value FROM system_views.settings")
        return {r.name: r.value for r in rows if r.name in wanted}
    except Exception as exc:  # an old node: report why, the defaults apply
        return {"error": f"{type(exc).__name__}: {exc}"}


def as_bytes(value: str | None, default: int) -> int:
    """'50KiB' / '16384KiB' / '16777216B' -> bytes."""
    if not value:
        return default
    found = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB)?", value.strip())
    if not found:
        return default
    unit = {"B": 1, None: 1, "KiB": KiB, "MiB": MiB, "GiB": 1024 * MiB}[found.group(2)]
    return int(found.group(1)) * unit


def bound_signal_writes(store, concurrency: int) -> None:
    """Send this store's signal chunks ``concurrency`` at a time (every other write as
    configured): what bounding the bytes a checkpoint has in flight would do."""
    real = store.put_signals

    def put_signals(*args, **kwargs):
        options = store.options
        store.options = dataclasses.replace(options, write_concurrency=concurrency)
        try:
            return real(*args, **kwargs)
        finally:
            store.options = options

    store.put_signals = put_signals


# --- filling a shard ----------------------------------------------------------------


def file_source(n: int, lines: int) -> str:
    """A file identity as `persona ingest` names it: name, size, hash of the first MiB."""
    return f"events-{n:05d}.jsonl:{lines * 160}:{uuid.uuid4().hex[:16]}"


# Store errors met outside checkpoints (traffic, recovery), each retried as a client
# or the shard's restart would retry it.
FAILURES: list[dict] = []


def retrying(what: str, call, attempts: int = 4):
    for attempt in range(attempts):
        try:
            return call()
        except PersonaError as exc:
            FAILURES.append({"what": what, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            if attempt + 1 == attempts:
                raise
            time.sleep(2.0**attempt)
    raise AssertionError("unreachable")


def progress(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def apply_batch(state: ShardState, source: str, events: list[tuple], lines: list[int]) -> Ack:
    """One batch through the shard's write path, in ProfileShard's order, synchronously;
    a batch the store fails is sent again, as ingest's retries send it."""
    return retrying("apply a batch", lambda: _apply_batch(state, source, events, lines))


def _apply_batch(state: ShardState, source: str, events: list[tuple], lines: list[int]) -> Ack:
    batch = state.check(events, lines, validated=True)
    state.load_missing(batch.users())
    keys = state.dedup_keys(source, batch.events)
    state.install_dedup(state.fetch_dedup(state.dedup.unknown(keys)), keys)
    prepared = state.prepare(source, batch)
    if isinstance(prepared, Ack):
        return prepared
    state.append(prepared)
    return state.commit(prepared)


def record_file(state: ShardState, source: str, first: int, count: int, users: int, seed: int):
    """What ingesting lines [first, first + count) of a file leaves in the dedup index
    (each line under its user's partition), recorded 10,000 lines at a time."""
    rng = random.Random(seed)
    for at in range(first, first + count, 10_000):
        lines = list(range(at, min(first + count, at + 10_000)))
        events = [(f"user-{rng.randrange(users)}",) for _ in lines]
        state.record_lines(source, events, lines)


def dense_graph(state: ShardState, items: int, seed: int = 7) -> int:
    """Trending for every item and 2*M neighbours per item: co-engaged items close by
    (as a catalog's related items are) and a few random ones."""
    stats = state.item_stats
    stats.flush()
    rng = random.Random(seed)
    width = 2 * stats.neighbours
    stats.t0 = stats.t0 if stats.t0 is not None else T0
    names = [f"item-{i}" for i in range(items)]
    for i, name in enumerate(names):
        stats.trending[name] = rng.uniform(0.1, 50.0)
        near = [names[(i + k) % items] for k in range(1, width - 3)]
        far = [names[rng.randrange(items)] for _ in range(4)]
        stats.graph[name] = {other: rng.uniform(0.01, 5.0) for other in near + far if other != name}
    stats._snapshot = None
    return sum(len(n) for n in stats.graph.values())


def checkpoint(state: ShardState, log: WriteLog, attempts: int = 3) -> dict:
    """ProfileShard.checkpoint's steps, timed, with every store write counted. A
    failed checkpoint is aborted and retried after 2, 4 s, as the shard's ticker
    does; failures are reported."""
    failures = []
    for attempt in range(attempts):
        log.reset()
        started = time.perf_counter()
        plan = state.begin_checkpoint()
        began = time.perf_counter()
        try:
            state.finish_deletes(plan.deletes)
            asyncio.run(state.write_profiles(plan.users, CHECKPOINT_CHUNK))
            profiles_done = time.perf_counter()
            state.finish_checkpoint(plan)
        except PersonaError as exc:
            state.abort_checkpoint(plan)
            failures.append(
                {
                    "after_s": time.perf_counter() - started,
                    "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                    "writes_before_failure": log.summary(),
                }
            )
            if attempt + 1 < attempts:
                time.sleep(2.0 ** (attempt + 1))
            continue
        done = time.perf_counter()
        break
    else:
        return {"failed": True, "failures": failures}
    return {
        "failures": failures,
        "seconds": done - started,
        "begin_s": began - started,  # encoding: signal chunks, meta, dedup entries
        "profiles_s": profiles_done - began,
        "finish_s": done - profiles_done,  # dedup, signals, meta, trim
        "profiles": len(plan.users),
        "dedup_entries": len(plan.dedup),
        "signal_chunks": len(plan.signals),
        "signal_bytes": sum(map(len, plan.signals)),
        "meta_bytes": len(plan.meta),
        "writes": log.summary(),
    }


def node_largest_sent(sent: list[dict]) -> int:
    return max((w["node_reported_largest_batch_bytes"] for w in sent), default=0)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MiB


def old_meta(state: ShardState, remembered: int = 2_000) -> dict:
    """The checkpoint meta as one blob, as written before this change: every
    partition's last ``remembered`` batch ids (32-hex ids, as the HTTP API made them)
    and ItemStats.state()."""
    batch_ids = {p: [uuid.uuid4().hex for _ in range(remembered)] for p in range(PARTITIONS)}
    item_stats = state.item_stats.state()
    blob = codec.encode({"batch_ids": batch_ids, "item_stats": item_stats, "at": time.time()})
    return {
        "blob": blob,
        "bytes": len(blob),
        "item_stats_bytes": len(codec.encode(item_stats)),
        "batch_ids_bytes": len(codec.encode(batch_ids)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--sources", type=int, default=200, help="batches, one source each")
    parser.add_argument("--source-events", type=int, default=2_560, help="events per source")
    parser.add_argument("--file-lines", type=int, default=2_000_000, help="the big file")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--more-sources", type=int, default=20, help="batches between")
    parser.add_argument("--file-step", type=int, default=200_000, help="file lines between")
    parser.add_argument(
        "--signal-concurrency",
        type=int,
        help="write item signal chunks this many at a time instead of the store's "
        "write_concurrency (to measure a bound on the bytes in flight; default: as shipped)",
    )
    args = parser.parse_args()

    base = load_settings()
    url, keyspace = store_url("cassandra", base)
    settings = load_settings(store_url=url, partitions=PARTITIONS, checkpoint_interval_s=3600)
    store = open_store(settings=settings)
    load_before = os.getloadavg()[0]
    try:
        result = run(args, settings, store)
    finally:
        drop_keyspace(store, settings, keyspace)
    result.update(
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        code=code_version(),
        # The machine may be shared: its 1-minute load average before and after.
        loadavg=[load_before, os.getloadavg()[0]],
    )
    print(json.dumps(result))


def drop_keyspace(store, settings, keyspace: str, attempts: int = 5) -> None:
    """Drop the benchmark's keyspace, on a new connection if the store's is unusable."""
    for attempt in range(attempts):
        try:
            drop(store, keyspace)
            return
        except Exception as exc:
            print(f"dropping {keyspace}: {type(exc).__name__}: {exc}", file=sys.stderr)
            time.sleep(2.0 * (attempt + 1))
            try:
                store = open_store(settings=settings)
            except Exception:
                continue
    print(f"keyspace {keyspace} is left behind: drop it by hand", file=sys.stderr)


def run(args, settings, store) -> dict:
    limits = node_limits(store)
    fail_at = as_bytes(limits.get("batch_size_fail_threshold"), 50 * KiB)
    mutation_max = as_bytes(limits.get("max_mutation_size"), 16 * MiB)
    store.claim_partitions("bench", {p: 0 for p in range(PARTITIONS)})
    state = ShardState("bench", store, settings, PARTITIONS)
    state.refresh_ownership()
    if args.signal_concurrency:
        bound_signal_writes(store, args.signal_concurrency)
    log = WriteLog()
    log.install(store)

    # Traffic: batches from many sources through the write path.
    progress(f"traffic: {args.sources} batches")
    started = time.perf_counter()
    names = iter(range(10**6))
    for s in range(args.sources):
        events = synthetic_events(args.source_events, args.users, args.items, seed=100 + s)
        apply_batch(
            state, file_source(next(names), len(events)), events, list(range(1, 1 + len(events)))
        )
    traffic_s = time.perf_counter() - started
    # The big file, and the dense graph.
    progress(f"a file of {args.file_lines:,} lines, the graph of {args.items:,} items")
    rss_before = rss_mib()
    big_file = file_source(next(names), args.file_lines)
    record_file(state, big_file, 1, args.file_lines, args.users, seed=11)
    file_rss_mib = rss_mib() - rss_before
    file_intervals = sum(
        len(state.dedup.entries[k].lows) for k in state.dedup.entries if k.endswith(big_file)
    )
    links = dense_graph(state, args.items)
    fill_s = time.perf_counter() - started

    checkpoints = []
    file_lines = args.file_lines
    for n in range(args.checkpoints):
        if n:  # traffic since the last checkpoint: new sources, the file goes on
            for s in range(args.more_sources):
                events = synthetic_events(
                    args.source_events, args.users, args.items, seed=9000 + 100 * n + s
                )
                apply_batch(
                    state,
                    file_source(next(names), len(events)),
                    events,
                    list(range(1, 1 + len(events))),
                )
            record_file(state, big_file, file_lines + 1, args.file_step, args.users, seed=n)
            file_lines += args.file_step
        progress(f"checkpoint {n + 1}")
        figures = checkpoint(state, log)
        figures["file_lines_so_far"] = file_lines
        checkpoints.append(figures)

    # A journal tail for recovery to replay: new sources and the file going on.
    progress("journal tail")
    tail_rows = 0
    for s in range(5):
        events = synthetic_events(args.source_events, args.users, args.items, seed=50_000 + s)
        apply_batch(
            state, file_source(next(names), len(events)), events, list(range(1, 1 + len(events)))
        )
        tail_rows += 1
    for s in range(2):
        events = synthetic_events(args.source_events, args.users, args.items, seed=60_000 + s)
        lines = list(range(file_lines + 1, file_lines + 1 + len(events)))
        apply_batch(state, big_file, events, lines)
        file_lines += len(events)
        tail_rows += 1
    state.item_stats.flush()

    # Recovery: a new ShardState on a new connection reads it all back.
    connect_started = time.perf_counter()
    fresh_store = open_store(settings=settings)
    connect_s = time.perf_counter() - connect_started
    reads = defaultdict(lambda: [0, 0])

    def counted(method, what):
        def call(*a, **k):
            out = method(*a, **k)
            values = out.values() if isinstance(out, dict) else out
            reads[what][0] += len(values)
            reads[what][1] += sum(len(v) for v in values)
            return out

        return call

    fresh_store.get_signals = counted(fresh_store.get_signals, "signal_chunks")
    fresh_store.get_dedup = counted(fresh_store.get_dedup, "dedup_entries")
    recovery_attempts = []

    def recover() -> tuple[ShardState, int]:
        state = ShardState("bench", fresh_store, settings, PARTITIONS)
        started = time.perf_counter()
        try:
            return state, state.recover()
        finally:
            recovery_attempts.append(time.perf_counter() - started)

    progress("recovering")
    recovered, replayed = retrying("recover", recover)
    recovery_s = recovery_attempts[-1]
    recovered.item_stats.flush()
    same = {
        "last_seq": recovered.last_seq == state.last_seq,
        "trending_items": len(recovered.item_stats.trending) == len(state.item_stats.trending),
        "graph_items": len(recovered.item_stats.graph) == len(state.item_stats.graph),
        "file_entries_read": sum(1 for k in recovered.dedup.entries if k.endswith(big_file)),
        "file_entries_equal": all(
            recovered.dedup.entries.get(k) == state.dedup.entries[k]
            for k in state.dedup.entries
            if k.endswith(big_file) and k in recovered.dedup.entries
        ),
    }
    fresh_store.close()

    # The single blob this bounds, offered to the node as a checkpoint row.
    # (On a connection of its own: the node may drop a connection sent a frame
    # over its message size.)
    old = old_meta(state)
    with open_store(settings=settings) as other:
        try:
            other.put_checkpoint("old-format", Checkpoint(seq=1, meta=old["blob"]))
            old_outcome = "accepted"
        except Exception as exc:
            old_outcome = f"refused: {type(exc).__name__}: {str(exc)[:300]}"

    # Every write sent, by successful checkpoints and by failed attempts alike.
    sent = [c["writes"] for c in checkpoints if "writes" in c]
    sent += [f["writes_before_failure"] for c in checkpoints for f in c["failures"]]
    largest = {}
    for writes in sent:
        for kind, e in writes["by_kind"].items():
            best = largest.setdefault(kind, {"request": 0, "row": 0, "multi_row_batch": 0})
            best["request"] = max(best["request"], e["largest_request_bytes"])
            best["row"] = max(best["row"], e["largest_row_bytes"])
            best["multi_row_batch"] = max(
                best["multi_row_batch"], e["largest_multi_row_batch_bytes"]
            )
    # Batches of rows that are a partition each: what the batch threshold applies to.
    one_partition_per_row = {"profile batch", "dedup batch", "profile delete", "tombstone"}
    over = [
        f"{kind}: {what} of {size:,} B"
        for kind, best in largest.items()
        for what, size, limit in (
            (
                "multi-partition batch",
                best["multi_row_batch"] if kind in one_partition_per_row else 0,
                fail_at,
            ),
            ("row (mutation)", best["row"], mutation_max),
        )
        if size > limit
    ]
    if node_largest_sent(sent) > fail_at:
        over.append(f"the node reported a batch of {node_largest_sent(sent):,} B")
    node_largest = node_largest_sent(sent)
    return {
        "bench": "checkpoint_bounds",
        "store": "cassandra",
        "partitions": PARTITIONS,
        "items": args.items,
        "graph_links": links,
        "neighbours_per_item": links / max(1, args.items),
        "users": args.users,
        "sources": args.sources,
        "source_events": args.source_events,
        "file_lines": args.file_lines,
        "signal_concurrency": args.signal_concurrency or store.options.write_concurrency,
        "signal_concurrency_as_shipped": not args.signal_concurrency,
        "file_dedup_intervals": file_intervals,
        "file_dedup_memory_mib": file_rss_mib,
        "fill_s": fill_s,
        "traffic_s": traffic_s,
        "limits": limits,
        "batch_fail_threshold_bytes": fail_at,
        "max_mutation_bytes": mutation_max,
        "checkpoints": checkpoints,
        "checkpoint_failures": sum(len(c["failures"]) for c in checkpoints),
        "checkpoints_failed": sum(1 for c in checkpoints if c.get("failed")),
        "largest_write_bytes": largest,
        "node_reported_largest_batch_bytes": node_largest,
        "over_limits": over,
        "recovery": {
            "seconds": recovery_s,
            "connect_s": connect_s,
            "journal_rows_replayed": replayed,
            "journal_tail_rows": tail_rows,
            "reads": {k: {"records": v[0], "bytes": v[1]} for k, v in reads.items()},
            "same_as_before": same,
            "attempts": len(recovery_attempts),
        },
        "store_failures_outside_checkpoints": FAILURES,
        "old_single_blob": {
            "bytes": old["bytes"],
            "item_stats_bytes": old["item_stats_bytes"],
            "batch_ids_bytes": old["batch_ids_bytes"],
            "over_max_mutation": old["bytes"] > mutation_max,
            "node": old_outcome,
        },
    }


if __name__ == "__main__":
    main()
