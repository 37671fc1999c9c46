"""HTTP benchmarks with wrk: GET profile, GET recommendations, the batch profile
lookup, POST events, and two peer baselines measured in the same run: the same no-op
route under plain uvicorn and under Ray Serve (same proxy, same replica count).

    python -m bench.http_bench [--users 100000 --items 100000 --seconds 15 --store sqlite]

Needs wrk (`apt-get install wrk`). Starts its own Ray (HAProxy ingress on unless
--proxy default) and Serve apps on --port (8000), and a uvicorn baseline on
--ceiling-port (8101).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from bench.common import as_dicts, machine_cpu, start_local_ray, store_url, synthetic_events

SERVE_PORT = 8000
BODIES = 30  # distinct bodies each POST run cycles through
CEILING_PORT = 8101
LOOKUP_SIZES = (100, 1000)  # user ids per batch lookup


def parse_wrk(output: str) -> dict:
    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    figures = {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        figures[f"p{pct}_ms"] = ms(match.group(1)) if match else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    figures["non_2xx"] = int(errors.group(1)) if errors else 0
    return figures


def run_wrk(url: str, script: str, connections: int, seconds: int, threads: int = 2) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        f.name,
        url,
    ]
    busy_before, total_before = machine_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    busy_after, total_after = machine_cpu()
    figures = {**parse_wrk(out), "connections": connections}
    busy = (busy_after - busy_before) / max(1, total_after - total_before)
    figures["machine_busy"] = busy
    # CPU the whole machine spent per request (wrk's own share included).
    figures["cpu_ms_per_request"] = busy * (os.cpu_count() or 1) * 1000 / figures["req_per_s"]
    return figures


def read_script(path: str, users: int) -> str:
    return f"""
math.randomseed({random.randrange(1 << 30)})
request = function()
  return wrk.format("GET", string.format("{path}", math.random(0, {users - 1})))
end
"""


def post_script(bodies: list[str]) -> str:
    """POSTs cycling through ``bodies`` (distinct events: one body sent over and over
    would pile identical actions into every user's recent list)."""
    table = ",\n".join(json.dumps(b) for b in bodies)
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
bodies = {{{table}}}
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end
"""


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def populate(settings, users: int, items: int) -> tuple:
    """A store with ``items`` catalog items (one of 500 topics, a 16-dim embedding) and
    a started fleet holding ``users`` users (three events each). Returns (store,
    fleet, topics)."""
    from actors.catalog import encode_item
    from actors.fleet import Fleet
    from storage import open_store

    store = open_store(settings=settings)
    rng = random.Random(4)
    topics = [f"topic-{t}" for t in range(500)]
    for at in range(0, items, 20_000):
        store.upsert_items(
            {
                f"item-{i}": encode_item(
                    {
                        "topics": [topics[i % 500]],
                        "embedding": [rng.gauss(0, 1) for _ in range(16)],
                        "created_at": time.time() - i,
                    }
                )
                for i in range(at, min(items, at + 20_000))
            }
        )
    fleet = Fleet.start(settings, store)
    events = as_dicts(synthetic_events(users * 3, users, items=items, seed=11))
    for at in range(0, len(events), 10_000):
        fleet.apply(f"load-{at}", events[at : at + 10_000])
    return store, fleet, topics


def lookup_bodies(users: int, ids: int, rng: random.Random) -> list[str]:
    """Batch lookup bodies of ``ids`` random users each (distinct, all of them resident)."""
    return [
        json.dumps({"user_ids": [f"user-{u}" for u in rng.sample(range(users), ids)]})
        for _ in range(BODIES)
    ]


def wait_answering(url: str, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200 (a Serve app is routed once it does)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer 200")
        time.sleep(0.5)


def serve_noop(base_url: str, args) -> dict:
    """The no-op route under Serve, deployed like Persona's ingress, measured, removed."""
    from ray import serve

    from bench import serve_noop as noop

    serve.run(noop.app(args.users, args.replicas), name="noop", route_prefix="/")
    try:
        wait_answering(f"{base_url}/v1/users/user-0/profile")
        return run_wrk(
            base_url,
            read_script("/v1/users/user-%d/profile", args.users),
            args.connections,
            args.seconds,
        )
    finally:
        serve.delete("noop")


def wait_ready(base_url: str, topic: str) -> None:
    """Wait for the app, then upsert one item: a catalog upsert over HTTP makes the
    recommender reload catalog and signals."""
    import httpx

    wait_port(int(base_url.rsplit(":", 1)[1]))
    httpx.put(
        f"{base_url}/v1/items",
        json={"items": [{"item_id": "item-0", "topics": [topic]}]},
        timeout=120,
    ).raise_for_status()


def ceiling(users: int, seconds: int, connections: int, port: int = CEILING_PORT) -> dict:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.uvicorn_ceiling", "--port", str(port), "--users", str(users)]
    )
    try:
        wait_port(port)
        return run_wrk(
            f"http://127.0.0.1:{port}",
            read_script("/v1/users/user-%d/profile", users),
            connections,
            seconds,
        )
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "cassandra"])
    parser.add_argument("--proxy", default="haproxy", choices=["haproxy", "default"])
    # One ingress replica per core, as serve.yaml's autoscaler would settle on under
    # sustained load on this machine.
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=SERVE_PORT, help="Serve's HTTP port")
    parser.add_argument("--ceiling-port", type=int, default=CEILING_PORT)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench.http_bench needs wrk: apt-get install wrk")

    results = {
        "bench": "http",
        "users": args.users,
        "items": args.items,
        "proxy": args.proxy,
        "ingress_replicas": args.replicas,
    }
    results["uvicorn_ceiling"] = ceiling(
        args.users, args.seconds, args.connections, args.ceiling_port
    )

    if args.proxy == "haproxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    import ray
    from ray import serve

    from persona.settings import load_settings
    from serving.app import build_ingress

    base = load_settings()
    url, keyspace = store_url(args.store, base)
    overrides = {
        "store_url": url,
        "namespace": f"bench-http-{uuid.uuid4().hex[:6]}",
        "max_batch_events": 10_000,
        "checkpoint_interval_s": 3600.0,
    }
    settings = load_settings(**overrides)
    start_local_ray(settings.namespace)
    try:
        store, fleet, topics = populate(settings, args.users, args.items)
        rng = random.Random(4)
        resident = sum(s["resident"] for s in fleet.stats())
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        base_url = f"http://127.0.0.1:{args.port}"
        results["serve_noop"] = serve_noop(base_url, args)
        handle = serve.run(
            build_ingress(overrides, replicas=args.replicas), name="persona", route_prefix="/"
        )
        wait_ready(base_url, topics[0])
        del handle
        results["resident_users"] = resident
        results["profile"] = run_wrk(
            base_url,
            read_script("/v1/users/user-%d/profile", args.users),
            args.connections,
            args.seconds,
        )
        results["recommendations"] = run_wrk(
            base_url,
            read_script("/v1/users/user-%d/recommendations?k=20", args.users),
            args.connections,
            args.seconds,
        )
        for ids in LOOKUP_SIZES:
            run = run_wrk(
                base_url + "/v1/profiles:batchGet",
                post_script(lookup_bodies(args.users, ids, rng)),
                8,
                args.seconds,
            )
            run["profiles_per_s"] = run["req_per_s"] * ids
            results[f"lookup_{ids}"] = run
        now = time.time()
        bodies = [
            json.dumps(
                [
                    {
                        "user_id": f"user-{rng.randrange(args.users)}",
                        "item_id": f"item-{rng.randrange(args.items)}",
                        "action": "view",
                        "ts": now - rng.uniform(0, 86_400),
                        "topics": [topics[rng.randrange(500)]],
                    }
                    for _ in range(1000)
                ]
            )
            for _ in range(BODIES)
        ]
        events_run = run_wrk(base_url + "/v1/events", post_script(bodies), 8, args.seconds)
        events_run["events_per_s"] = events_run["req_per_s"] * 1000
        results["events_1000"] = events_run
        results["profile_to_ceiling"] = (
            results["profile"]["req_per_s"] / results["uvicorn_ceiling"]["req_per_s"]
        )
        for route in ("profile", "recommendations"):
            results[f"{route}_to_serve_noop"] = (
                results[route]["req_per_s"] / results["serve_noop"]["req_per_s"]
            )
        serve.shutdown()
        fleet.shutdown()
        if keyspace:
            store._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        store.close()
    finally:
        ray.shutdown()
    results.update(
        cpus=os.cpu_count(), python=sys.version.split()[0], date=time.strftime("%Y-%m-%d")
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
