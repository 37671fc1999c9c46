"""What exposure logging costs GET recommendations: throughput with it on and off, in one run.

    python -m bench.exposure_bench [--users 100000 --items 100000 --seconds 15 --rounds 2]

One fleet and catalog (as bench.http_bench builds them); the same app is deployed
with exposure logging on and off (the `exposure_logging` setting,
PERSONA_EXPOSURE_LOGGING=0 turns it off), alternating on/off, off/on round after
round so a shared machine's drift falls on both; each deployment is warmed up
before wrk measures it. Prints one JSON line; the figure is the ratio on/off of the
rounds' median throughputs. Needs wrk. Serve listens on a free port.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import sys
import time
import uuid

from bench.common import start_local_ray, store_url
from bench.http_bench import populate, read_script, run_wrk, wait_ready

SWITCH = "exposure_logging"  # PERSONA_EXPOSURE_LOGGING
WARMUP_S = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def has_switch() -> bool:
    from persona.settings import Settings

    return SWITCH in {f.name for f in dataclasses.fields(Settings)}


def summary(runs: list[dict]) -> dict:
    return {
        "req_per_s": statistics.median(r["req_per_s"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "cassandra"])
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=0, help="Serve's port (default: a free one)")
    args = parser.parse_args()
    results: dict = {"bench": "exposures", "users": args.users, "items": args.items}
    if not has_switch():
        results["error"] = f"not measured: no `{SWITCH}` setting yet (issue #14's exposure logging)"
        print(json.dumps(results))
        return
    if not shutil.which("wrk"):
        sys.exit("bench.exposure_bench needs wrk: apt-get install wrk")
    import ray
    from ray import serve

    from persona.settings import load_settings
    from serving.app import build_ingress

    port = args.port or free_port()
    url, keyspace = store_url(args.store, load_settings())
    overrides = {
        "store_url": url,
        "namespace": f"bench-exposures-{uuid.uuid4().hex[:6]}",
        "checkpoint_interval_s": 3600.0,
    }
    settings = load_settings(**overrides)
    start_local_ray(settings.namespace)
    try:
        store, fleet, topics = populate(settings, args.users, args.items)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = f"http://127.0.0.1:{port}"
        script = read_script("/v1/users/user-%d/recommendations?k=20", args.users)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for round_ in range(args.rounds):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for mode in order:
                app = build_ingress({**overrides, SWITCH: mode == "on"}, replicas=args.replicas)
                serve.run(app, name="persona", route_prefix="/")
                wait_ready(base_url, topics[0])
                run_wrk(base_url, script, args.connections, WARMUP_S)
                run = run_wrk(base_url, script, args.connections, args.seconds)
                runs[mode].append({**run, "round": round_})
        serve.shutdown()
        fleet.shutdown()
        if keyspace:
            store._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        store.close()
    finally:
        ray.shutdown()
    results["on"], results["off"] = summary(runs["on"]), summary(runs["off"])
    results["on_to_off"] = results["on"]["req_per_s"] / results["off"]["req_per_s"]
    results["runs"] = runs
    results.update(
        rounds=args.rounds,
        seconds=args.seconds,
        connections=args.connections,
        ingress_replicas=args.replicas,
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
