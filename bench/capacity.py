"""Capacity model: nodes, memory, Cassandra load and disk for 1M, 10M and 100M daily users,
computed from the measured costs in bench/results.json and the assumptions below.

    python -m bench.capacity [--results bench/results.json] [--out bench/CAPACITY.md]

`make bench` runs it last (bench/run_all.py). Every figure in CAPACITY.md is a measured
cost (``measured_costs``: which benchmark, which run) combined with an assumption
(``ASSUMPTIONS``) by a formula written next to it in ``plan``; the formulas are printed
beside the figures. A figure missing from results.json is named with the command that
measures it, and nothing is computed from a guess in its place.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from persona.settings import Settings

HERE = Path(__file__).resolve().parent
SIZES = (1_000_000, 10_000_000, 100_000_000)
DAY_S = 86_400.0
GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    why: str


_DEFAULTS = Settings()

# What the model assumes about traffic and hardware; change them here (or with --set).
ASSUMPTIONS: dict[str, Assumption] = {
    "events_per_user_day": Assumption(50, "events", "engagement events per daily user per day"),
    "peak_to_average": Assumption(3, "x", "busiest hour's rate over the day's average"),
    "profile_reads_per_user_day": Assumption(20, "requests", "GET profile per daily user per day"),
    "recommendations_per_user_day": Assumption(
        10, "requests", "GET recommendations per daily user per day (each logs an exposure)"
    ),
    "active_minutes_per_user_day": Assumption(
        30, "min", "minutes a daily user is active: their profile is dirty in those intervals"
    ),
    "events_per_request": Assumption(
        100, "events", "events per ingest batch (POST body or job batch): one source each"
    ),
    "resident_per_daily_user": Assumption(
        1.0, "x", "profiles held in memory per daily user (all of the day's users resident)"
    ),
    "stored_per_daily_user": Assumption(
        3.0, "x", "profiles kept in Cassandra per daily user (monthly actives)"
    ),
    "node_cores": Assumption(16, "cores", "cores of a Persona node (shards, ingress replicas)"),
    "node_memory_gb": Assumption(64, "GB", "memory of a Persona node"),
    "node_overhead_gb": Assumption(
        4, "GB", "memory of a node not for profiles: OS, Ray's processes, replicas"
    ),
    "cpu_target": Assumption(0.6, "x", "share of a node's cores planned busy at peak"),
    "memory_target": Assumption(0.7, "x", "share of a node's memory planned in use"),
    "cassandra_node_cores": Assumption(16, "cores", "cores of a Cassandra node"),
    "cassandra_disk_tb": Assumption(2, "TB", "data disk of a Cassandra node"),
    "disk_fill_target": Assumption(
        0.5, "x", "share of a Cassandra disk planned full (size-tiered compaction needs ~2x)"
    ),
    "replication_factor": Assumption(3, "copies", "Cassandra replication factor"),
    "read_replicas": Assumption(2, "replicas", "replicas a LOCAL_QUORUM read touches at RF 3"),
    "journal_disk_hours": Assumption(
        24,
        "h",
        "journal rows trimmed at a checkpoint stay on disk until compaction merges them with "
        "their range deletes",
    ),
    "checkpoint_interval_s": Assumption(
        _DEFAULTS.checkpoint_interval_s, "s", "PERSONA_CHECKPOINT_INTERVAL_S (default)"
    ),
    "partitions": Assumption(_DEFAULTS.partitions, "", "PERSONA_PARTITIONS (default)"),
    "dedup_retention_days": Assumption(
        _DEFAULTS.dedup_retention_s / DAY_S, "days", "PERSONA_DEDUP_RETENTION_S (default)"
    ),
    "exposure_retention_days": Assumption(
        _DEFAULTS.exposure_retention_s / DAY_S, "days", "PERSONA_EXPOSURE_RETENTION_S (default)"
    ),
}


@dataclass(frozen=True)
class Costs:
    """The measured costs the model uses (see ``measured_costs`` for where each is from)."""

    shard_us_per_event: float
    router_us_per_event: float
    cassandra_us_per_event: float
    profile_request_ms: float
    recommendation_request_ms: float
    resident_bytes_per_profile: float
    encode_us_per_profile: float
    cassandra_core_us_per_write: float
    cassandra_core_us_per_read: float
    journal_bytes_per_event: float
    stored_bytes_per_profile: float
    dedup_bytes_per_entry: float
    exposure_row_bytes: float


@dataclass
class Source:
    figure: str
    value: float
    unit: str
    bench: str
    date: str


class MissingFigures(Exception):
    """results.json lacks figures the model needs; the message names each and its command."""


def _get(data, *path):
    """data[path[0]][path[1]]..., or None where the path leads nowhere."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def measured_costs(results: dict) -> tuple[Costs, list[Source]]:
    """The costs from results.json with where each came from; MissingFigures names every
    figure that is absent (with the command that measures it), not just the first."""
    run_date = _get(results, "machine", "date") or "unknown date"
    sources: list[Source] = []
    missing: list[str] = []

    def take(name, figure, unit, section, path, rerun, derive=lambda v: v) -> float:
        entry = results.get(section)
        value = _get(results, section, *path)
        if not isinstance(value, int | float) or isinstance(value, bool):
            why = _get(entry, "error") or (section == "scaling" and store_error) or "absent"
            missing.append(
                f"{figure}: results.json {section}.{'.'.join(map(str, path))} ({why}); {rerun}"
            )
            return math.nan
        value = derive(value)
        # A list section's figure is from the entry the path names (memory[-1]).
        first = _get(entry, path[0]) if isinstance(entry, list) else entry
        command = _get(first, "command") or section
        date = _get(first, "date") or _get(first, "runs", 0, "date") or f"run of {run_date}"
        sources.append(Source(figure, value, unit, f"`{command}`", str(date)))
        return value

    make_bench = "rerun `make bench`"
    scaling = "rerun `python -m bench.run_all --only scaling`"
    runs = _get(results, "scaling", "runs") or []
    # Shard CPU per event at the most shards measured: each shard's part of a batch is
    # smallest there, as in a deployment of many shards.
    most = max((r["shards"] for r in runs if _get(r, "ingest")), default=0)
    shard_us = [
        r["ingest"]["cpu_us_per_event"]["shards"]
        for r in runs
        if _get(r, "ingest") and r["shards"] == most
    ]
    # The store's bytes are measured in one configuration (the last that got there).
    store_run = max((n for n, r in enumerate(runs) if "store_bytes" in r), default=-1)
    store_error = next((r["store_bytes_error"] for r in runs if "store_bytes_error" in r), None)
    cpus = _get(results, "machine", "cpus") or _get(results, "store", "cpus")
    store_cpus = float(cpus) if cpus else math.nan
    costs = Costs(
        shard_us_per_event=_median_source(shard_us, results, sources, missing, scaling),
        router_us_per_event=take(
            "router",
            "router CPU per event (validation and routing, the fleet)",
            "us",
            "ingest",
            ["cpu_us_per_event_by_process", "fleet (validation, routing)"],
            make_bench,
        ),
        cassandra_us_per_event=take(
            "cassandra",
            "Cassandra CPU per journaled event (replication 1, one node)",
            "us",
            "ingest",
            ["cpu_us_per_event_by_process", "cassandra"],
            make_bench,
        ),
        profile_request_ms=take(
            "profile",
            "machine CPU per GET profile (load generator included)",
            "ms",
            "http",
            ["profile", "cpu_ms_per_request"],
            make_bench,
        ),
        recommendation_request_ms=take(
            "recs",
            "machine CPU per GET recommendations (load generator included)",
            "ms",
            "http",
            ["recommendations", "cpu_ms_per_request"],
            make_bench,
        ),
        resident_bytes_per_profile=take(
            "memory",
            "resident bytes per profile (largest memory run)",
            "B",
            "memory",
            [-1, "bytes_per_profile"],
            make_bench,
        ),
        encode_us_per_profile=take(
            "encode",
            "checkpoint encoding CPU per profile",
            "us",
            "checkpoint",
            ["encode_seconds"],
            make_bench,
            lambda s: s / max(1, _get(results, "checkpoint", "profiles") or 1) * 1e6,
        ),
        cassandra_core_us_per_write=take(
            "write",
            "core-us per profile write (cores / writes/s; client on the same cores)",
            "us",
            "store",
            ["store_bench", "cassandra", "write_per_s"],
            make_bench,
            lambda per_s: store_cpus / per_s * 1e6,
        ),
        cassandra_core_us_per_read=take(
            "read",
            "core-us per profile read (cores / reads/s; client on the same cores)",
            "us",
            "store",
            ["store_bench", "cassandra", "read_per_s"],
            make_bench,
            lambda per_s: store_cpus / per_s * 1e6,
        ),
        journal_bytes_per_event=take(
            "journal",
            "journal bytes per event (blobs in Cassandra before the checkpoint)",
            "B",
            "scaling",
            ["runs", store_run, "store_bytes", "journal_bytes_per_event"],
            scaling,
        ),
        stored_bytes_per_profile=take(
            "stored",
            "stored bytes per profile (key + blob; `persona generate`'s mix, 50 events a user)",
            "B",
            "scaling",
            ["runs", store_run, "store_bytes", "generated_profile_bytes"],
            scaling,
        ),
        dedup_bytes_per_entry=take(
            "dedup",
            "bytes per dedup entry (blob + key of an HTTP client's Idempotency-Key)",
            "B",
            "scaling",
            ["runs", store_run, "store_bytes", "dedup_bytes_per_request_entry"],
            scaling,
        ),
        exposure_row_bytes=take(
            "exposure",
            "bytes per exposure row (20 items)",
            "B",
            "scaling",
            ["runs", store_run, "store_bytes", "exposure_row_bytes"],
            scaling,
        ),
    )
    if missing:
        raise MissingFigures(
            "bench/results.json lacks figures the capacity model needs:\n- " + "\n- ".join(missing)
        )
    return costs, sources


def _median_source(values, results, sources, missing, rerun) -> float:
    if not values:
        error = _get(results, "scaling", "error") or "absent or an older format"
        missing.append(f"shard CPU per event: results.json scaling.runs ({error}); {rerun}")
        return math.nan
    values = sorted(values)
    median = values[len(values) // 2]
    sources.append(
        Source(
            f"shard CPU per event (median of the {len(values)} cluster configurations "
            "with the most shards)",
            median,
            "us",
            f"`{_get(results, 'scaling', 'command') or 'bench.cluster_bench'}`",
            str(_get(results, "scaling", "date")),
        )
    )
    return median


@dataclass
class Plan:
    """One size's figures: (name, value, unit, formula) in the order computed."""

    daily_users: int
    rows: list[tuple[str, float, str, str]] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)

    def q(self, name: str, value: float, unit: str, formula: str) -> float:
        self.rows.append((name, value, unit, formula))
        self.values[name] = value
        return value


def expected_distinct(bins: float, draws: float) -> float:
    """How many of ``bins`` equally likely bins ``draws`` random draws hit, on average."""
    return bins * (1 - (1 - 1 / bins) ** draws)


def plan(daily_users: int, c: Costs, a: dict[str, float]) -> Plan:
    """The capacity arithmetic for one size. Rates are at peak unless named per day."""
    p = Plan(daily_users)
    d = daily_users
    peak = a["peak_to_average"]
    # --- load ---
    events = p.q(
        "events/s at peak",
        d * a["events_per_user_day"] / DAY_S * peak,
        "/s",
        "daily users x events_per_user_day / 86,400 x peak_to_average",
    )
    reads = p.q(
        "GET profile/s at peak",
        d * a["profile_reads_per_user_day"] / DAY_S * peak,
        "/s",
        "daily users x profile_reads_per_user_day / 86,400 x peak_to_average",
    )
    recs = p.q(
        "GET recommendations/s at peak",
        d * a["recommendations_per_user_day"] / DAY_S * peak,
        "/s",
        "daily users x recommendations_per_user_day / 86,400 x peak_to_average",
    )
    active = p.q(
        "users active at once at peak",
        d * a["active_minutes_per_user_day"] * 60 / DAY_S * peak,
        "",
        "daily users x active_minutes_per_user_day x 60 / 86,400 x peak_to_average",
    )
    profile_writes = p.q(
        "checkpointed profiles/s",
        active / a["checkpoint_interval_s"],
        "/s",
        "users active at once / checkpoint_interval_s (each dirty once per interval)",
    )
    batches = p.q(
        "ingest batches/s",
        events / a["events_per_request"],
        "/s",
        "events/s / events_per_request",
    )
    dedup_rows = p.q(
        "dedup entries/s",
        batches * expected_distinct(a["partitions"], a["events_per_request"]),
        "/s",
        "batches/s x partitions x (1 - (1 - 1/partitions)^events_per_request): one entry "
        "per (source, partition) a batch touches",
    )
    # --- Persona nodes ---
    shard_cores = p.q(
        "shard cores",
        (events * c.shard_us_per_event + profile_writes * c.encode_us_per_profile) / 1e6,
        "cores",
        "(events/s x shard us/event + checkpointed profiles/s x encode us/profile) / 1e6",
    )
    router_cores = p.q(
        "router cores",
        events * c.router_us_per_event / 1e6,
        "cores",
        "events/s x router us/event / 1e6",
    )
    serving_cores = p.q(
        "serving cores",
        (reads * c.profile_request_ms + recs * c.recommendation_request_ms) / 1e3,
        "cores",
        "(GET profile/s x ms/request + GET recommendations/s x ms/request) / 1e3",
    )
    cores = p.q(
        "Persona cores",
        shard_cores + router_cores + serving_cores,
        "cores",
        "shard + router + serving cores",
    )
    nodes_cpu = p.q(
        "Persona nodes for CPU",
        math.ceil(cores / (a["node_cores"] * a["cpu_target"])),
        "nodes",
        "ceil(Persona cores / (node_cores x cpu_target))",
    )
    shards = p.q(
        "shards (one core each)",
        max(1, math.ceil(shard_cores / a["cpu_target"])),
        "",
        "ceil(shard cores / cpu_target): a shard is one Python process, one core at most",
    )
    resident = p.q(
        "resident profile memory",
        d * a["resident_per_daily_user"] * c.resident_bytes_per_profile / GB,
        "GB",
        "daily users x resident_per_daily_user x resident bytes/profile",
    )
    nodes_memory = p.q(
        "Persona nodes for memory",
        math.ceil(resident / (a["node_memory_gb"] * a["memory_target"] - a["node_overhead_gb"])),
        "nodes",
        "ceil(resident GB / (node_memory_gb x memory_target - node_overhead_gb))",
    )
    # --- Cassandra ---
    rf = a["replication_factor"]
    p.q(
        "Cassandra writes/s (rows, before replication)",
        batches * expected_distinct(shards, a["events_per_request"])
        + profile_writes
        + dedup_rows
        + recs,
        "/s",
        "journal appends (batches/s x shards a batch touches) + checkpointed profiles/s + "
        "dedup entries/s + exposures (one per recommendation)",
    )
    store_reads = p.q(
        "Cassandra reads/s (rows)",
        d / DAY_S * peak + dedup_rows,
        "/s",
        "daily users / 86,400 x peak (each user loaded once a day) + dedup entries/s (a "
        "new source's entries are looked up in the store before it is applied)",
    )
    cassandra_cores = p.q(
        "Cassandra cores",
        (
            events * c.cassandra_us_per_event * rf
            + (profile_writes + dedup_rows + recs) * c.cassandra_core_us_per_write * rf
            + store_reads * c.cassandra_core_us_per_read * a["read_replicas"]
        )
        / 1e6,
        "cores",
        "(events/s x Cassandra us/event x RF + (profiles + dedup entries + exposures)/s x "
        "core-us/write x RF + reads/s x core-us/read x read_replicas) / 1e6",
    )
    cassandra_cpu_nodes = p.q(
        "Cassandra nodes for CPU",
        math.ceil(cassandra_cores / (a["cassandra_node_cores"] * a["cpu_target"])),
        "nodes",
        "ceil(Cassandra cores / (cassandra_node_cores x cpu_target))",
    )
    profiles_disk = p.q(
        "disk: profiles",
        d * a["stored_per_daily_user"] * c.stored_bytes_per_profile * rf / TB,
        "TB",
        "daily users x stored_per_daily_user x stored bytes/profile x RF",
    )
    journal_disk = p.q(
        "disk: journal",
        d
        * a["events_per_user_day"]
        * a["journal_disk_hours"]
        / 24
        * c.journal_bytes_per_event
        * rf
        / TB,
        "TB",
        "events per day x journal_disk_hours / 24 x journal bytes/event x RF",
    )
    dedup_disk = p.q(
        "disk: dedup entries",
        dedup_rows / peak * DAY_S * a["dedup_retention_days"] * c.dedup_bytes_per_entry * rf / TB,
        "TB",
        "dedup entries/s / peak x 86,400 x dedup_retention_days x bytes/entry x RF",
    )
    exposure_disk = p.q(
        "disk: exposures",
        d
        * a["recommendations_per_user_day"]
        * a["exposure_retention_days"]
        * c.exposure_row_bytes
        * rf
        / TB,
        "TB",
        "daily users x recommendations_per_user_day x exposure_retention_days x bytes/row x RF",
    )
    disk = p.q(
        "disk: total",
        profiles_disk + journal_disk + dedup_disk + exposure_disk,
        "TB",
        "profiles + journal + dedup entries + exposures",
    )
    disk_nodes = p.q(
        "Cassandra nodes for disk",
        math.ceil(disk / (a["cassandra_disk_tb"] * a["disk_fill_target"])),
        "nodes",
        "ceil(disk TB / (cassandra_disk_tb x disk_fill_target))",
    )
    p.q(
        "Cassandra nodes",
        max(rf, cassandra_cpu_nodes, disk_nodes),
        "nodes",
        "max(RF, nodes for CPU, nodes for disk)",
    )
    p.q("Persona nodes", max(nodes_cpu, nodes_memory), "nodes", "max(for CPU, for memory)")
    return p


# The four limits a size can hit first: the demand, and one node's share of it.
LIMITS = {
    "Persona CPU": ("Persona cores", lambda a: a["node_cores"] * a["cpu_target"]),
    "Persona memory": (
        "resident profile memory",
        lambda a: a["node_memory_gb"] * a["memory_target"] - a["node_overhead_gb"],
    ),
    "Cassandra CPU": ("Cassandra cores", lambda a: a["cassandra_node_cores"] * a["cpu_target"]),
    "Cassandra disk": ("disk: total", lambda a: a["cassandra_disk_tb"] * a["disk_fill_target"]),
}


def node_needs(p: Plan, a: dict[str, float]) -> dict[str, float]:
    """Nodes each limit asks for, before rounding up (what tells the limits apart when
    everything fits on one node)."""
    return {name: p.values[demand] / per_node(a) for name, (demand, per_node) in LIMITS.items()}


def first_bottleneck(p: Plan, a: dict[str, float]) -> tuple[str, str]:
    """The limit that asks for the most nodes (what a deployment of this size runs out
    of first as it grows), and what drives it."""
    needs = node_needs(p, a)
    name = max(needs, key=needs.get)
    v = p.values

    def largest(parts: dict[str, float]) -> str:
        return max(parts, key=parts.get)

    drivers = {
        "Persona CPU": largest(
            {
                "serving (HTTP)": v["serving cores"],
                "shards": v["shard cores"],
                "routing": v["router cores"],
            }
        ),
        "Persona memory": "resident profiles",
        "Cassandra CPU": "writes and reads",
        "Cassandra disk": largest(
            {
                "exposures": v["disk: exposures"],
                "profiles": v["disk: profiles"],
                "journal": v["disk: journal"],
                "dedup entries": v["disk: dedup entries"],
            }
        ),
    }
    return name, drivers[name]


def _fmt(value: float, unit: str) -> str:
    if (unit in ("TB", "GB") and value < 10) or 0 < value < 1:
        return f"{value:,.2f}"
    if value < 10 and value != int(value):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def render(
    plans: list[Plan],
    sources: list[Source],
    a: dict[str, float],
    results: dict,
    label: str = "`bench/results.json`",
) -> str:
    machine = results.get("machine", {})
    headline = [
        "| daily users | Persona nodes | Cassandra nodes | shards | resident memory GB "
        "| Cassandra writes/s | Cassandra reads/s | disk TB (with RF) | first bottleneck |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        v = p.values
        limit, driver = first_bottleneck(p, a)
        need = node_needs(p, a)[limit]
        headline.append(
            f"| {p.daily_users:,} | {v['Persona nodes']:.0f} | {v['Cassandra nodes']:.0f} "
            f"| {v['shards (one core each)']:.0f} | {v['resident profile memory']:,.0f} "
            f"| {v['Cassandra writes/s (rows, before replication)']:,.0f} "
            f"| {v['Cassandra reads/s (rows)']:,.0f} | {v['disk: total']:,.1f} "
            f"| {limit} ({driver}; {need:,.1f} nodes' worth) |"
        )
    lines = [
        "# Capacity model",
        "",
        f"Generated by `python -m bench.capacity` from {label} and the assumptions below; "
        "each measured figure names its benchmark and date. Results' run: "
        f"{machine.get('date', 'unknown date')}, {machine.get('cpus', '?')} cores, "
        f"{'quick' if results.get('quick') else 'full'}. `make bench` regenerates this file "
        "(last, in bench/run_all.py). Do not edit by hand: change an assumption in "
        "`bench/capacity.py` (or `--set name=value`) and rerun.",
        "",
        "## Headline",
        "",
        *headline,
        "",
        "*First bottleneck*: of Persona CPU, Persona memory, Cassandra CPU and Cassandra "
        "disk, the one that asks for the most nodes at that size before rounding up (in "
        "brackets, what drives it): what runs out first as the size grows. Peak rates are "
        "planned at the CPU target, memory and disk at theirs; Cassandra has at least RF "
        "nodes.",
        "",
        "## Measured costs (from bench/results.json)",
        "",
        "| figure | value | benchmark | date |",
        "|---|---|---|---|",
    ]
    for s in sources:
        lines.append(f"| {s.figure} | {s.value:,.2f} {s.unit} | {s.bench} | {s.date} |")
    lines += [
        "",
        "## Assumptions",
        "",
        "| name | value | meaning |",
        "|---|---|---|",
    ]
    for name, assumption in ASSUMPTIONS.items():
        lines.append(
            f"| `{name}` | {a[name]:g} {assumption.unit} | {assumption.why} |".replace("  |", " |")
        )
    lines += ["", "## Each size, with its formulas", ""]
    header = "| figure | " + " | ".join(f"{p.daily_users:,} users" for p in plans)
    lines += [header + " | unit | formula |", "|---" * (len(plans) + 3) + "|"]
    for n, (name, _value, unit, formula) in enumerate(plans[0].rows):
        values = " | ".join(_fmt(p.rows[n][1], unit) for p in plans)
        lines.append(f"| {name} | {values} | {unit} | {formula} |")
    lines += [
        "",
        "## What the figures include and leave out",
        "",
        "- HTTP CPU per request is the whole machine's during the HTTP benchmark, the load "
        "generator (wrk) and the shards included: an upper bound on the serving tier.",
        "- Cassandra CPU per event was measured at replication 1 on one node; the model "
        "multiplies it by the replication factor, a floor for the lightweight transaction "
        "each journal append is (Paxos adds round trips between replicas).",
        "- Core-us per profile write or read is the store benchmark's cores over its rate, "
        "with its client on the same cores: an upper bound on the node's own cost.",
        "- Cassandra CPU per event is all the node did during the ingest benchmark: the "
        "journal appends and the reads that run made (new users, each new source's dedup "
        "entries at 10,000-event batches); the read term above counts some of those "
        "again, so Cassandra CPU is overestimated, not under.",
        "- Events arrive through the fleet's ingest path; through `POST /v1/events` the "
        "ingress also parses JSON (see the HTTP benchmark in RESULTS.md). Shard CPU per "
        "event was measured with 10,000-event batches; a batch of events_per_request split "
        "over many shards gives each a smaller part, and a shard's CPU per event rises as "
        "its parts shrink (RESULTS.md, Scaling).",
        "- On real nodes, each cross-node call adds the network round trip to the hop cost "
        f"in RESULTS.md (Scaling{hop_note(results)}); a batch lookup makes one call per "
        "shard it touches.",
        f"- Shards at the largest size: {plans[-1].values['shards (one core each)']:.0f}, "
        + (
            "within"
            if plans[-1].values["shards (one core each)"] <= a["partitions"]
            else "**more than**"
        )
        + f" the {a['partitions']:.0f} partitions (PERSONA_PARTITIONS, fixed when a "
        "deployment is created: it caps the shards a deployment can ever have).",
        "- Item signals, the co-engagement graph, model vectors and per-shard dedup memory "
        "are not in the memory figure; the node overhead assumption stands for them.",
    ]
    return "\n".join(lines) + "\n"


def hop_note(results: dict) -> str:
    """The no-op hop measured by the cluster benchmark, same node and other node."""
    hops = [r["hop"]["noop"] for r in _get(results, "scaling", "runs") or [] if r.get("hop")]
    if not hops:
        return ""
    same = sorted(h["same"]["p50_ms"] for h in hops)[len(hops) // 2]
    cross = sorted(h["cross"]["p50_ms"] for h in hops)[len(hops) // 2]
    return f": a no-op call {same:.2f} ms p50 to the same node, {cross:.2f} ms to another, here"


def write_capacity(
    results: dict,
    out: Path,
    overrides: dict[str, float] | None = None,
    label: str = "`bench/results.json`",
) -> str:
    """Compute the model and write ``out``; returns the text. With figures missing it
    raises MissingFigures naming them and leaves ``out`` as it was."""
    a = {name: assumption.value for name, assumption in ASSUMPTIONS.items()}
    unknown = set(overrides or {}) - set(a)
    if unknown:
        raise SystemExit(f"--set: unknown assumption(s) {sorted(unknown)}; known: {sorted(a)}")
    a.update(overrides or {})
    # Missing figures raise before anything is written: the last CAPACITY.md stays.
    costs, sources = measured_costs(results)
    plans = [plan(n, costs, a) for n in SIZES]
    text = render(plans, sources, a, results, label)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--out", type=Path, default=HERE / "CAPACITY.md")
    parser.add_argument(
        "--label",
        default="`bench/results.json`",
        help="what to call the results in CAPACITY.md's first line (when not results.json)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="change an assumption"
    )
    args = parser.parse_args(argv)
    import json

    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.results}: {exc}; run `make bench` first", file=sys.stderr)
        return 1
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            overrides[name] = float(value)
        except ValueError:
            print(f"--set {item}: expected NAME=NUMBER", file=sys.stderr)
            return 2
    try:
        write_capacity(results, args.out, overrides, args.label)
    except MissingFigures as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
