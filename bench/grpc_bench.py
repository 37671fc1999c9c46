"""gRPC reads side by side with HTTP on the same app and run: GetProfile against GET
/v1/users/{id}/profile, BatchGetProfiles against POST /v1/profiles:batchGet.

    python -m bench.grpc_bench [--users 100000 --items 100000 --seconds 15 --rounds 2]

One fleet and catalog (as bench.http_bench builds them) and one deployment serving
both protocols (Serve's gRPC proxy beside its HTTP one; HAProxy in front of both
unless --proxy default). Both protocols are driven by the same kind of client, a
Python asyncio process (grpc.aio with --channels channels; aiohttp with one
connection per concurrent request), so the comparison is the server's; each run's
client is a process of its own whose CPU is reported (it shares the 2 cores with
the server), and so is the CPU per request of this benchmark's own Ray processes
(replicas, shards, proxy), which other load on a shared machine does not move. Modes
alternate round by round (grpc, http, then http, grpc) so a
shared machine's drift falls on both; figures are the rounds' medians. With wrk
installed, GET profile is also measured with wrk, the load generator of
bench.http_bench, to show what the Python client costs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid

from bench.common import machine_cpu, start_local_ray, store_url

APP = "persona"
WARMUP_S = 2.0


# --- the client: one process per run ---------------------------------------------------
def _percentile(sorted_ms: list[float], pct: float) -> float | None:
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * pct / 100))]


async def _drive(call, concurrency: int, seconds: float) -> dict:
    """Run ``call(rng)`` from ``concurrency`` tasks for ``seconds`` (after a warm-up);
    returns counts and latencies of the measured part."""
    latencies: list[float] = []
    errors = calls = 0
    measuring = False
    stop = False

    async def worker(seed: int) -> None:
        nonlocal errors, calls
        rng = random.Random(seed)
        while not stop:
            started = time.perf_counter()
            ok = await call(rng)
            calls += 1
            if measuring:
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

    tasks = [asyncio.create_task(worker(n)) for n in range(concurrency)]
    await asyncio.sleep(WARMUP_S)
    measuring = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    busy0, total0 = machine_cpu()
    await asyncio.sleep(seconds)
    measuring = False
    busy1, total1 = machine_cpu()
    cpu1, wall1 = time.process_time(), time.perf_counter()
    stop = True
    await asyncio.gather(*tasks)
    latencies.sort()
    wall = wall1 - wall0
    done = len(latencies)
    busy = (busy1 - busy0) / max(1, total1 - total0)
    return {
        "req_per_s": done / wall,
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "errors": errors,
        "calls": calls,  # warm-up included: what the server's CPU was spent on
        "concurrency": concurrency,
        "machine_busy": busy,
        # CPU the whole machine spent per request, the client's share included.
        "cpu_ms_per_request": busy * (os.cpu_count() or 1) * wall * 1000 / max(done, 1),
        "client_cpu_ms_per_request": (cpu1 - cpu0) * 1000 / max(done, 1),
        "client_cores": (cpu1 - cpu0) / wall,
    }


def _ids(rng: random.Random, users: int, batch: int) -> list[str]:
    return [f"user-{u}" for u in rng.sample(range(users), batch)]


async def grpc_client(args) -> dict:
    import grpc

    from serving import persona_pb2 as pb
    from serving import persona_pb2_grpc as pbg

    # A subchannel pool of its own per channel: otherwise channels to one address share
    # one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.channels)
    ]
    stubs = [pbg.PersonaStub(channel) for channel in channels]
    metadata = (("application", APP),)

    async def call(rng: random.Random) -> bool:
        stub = stubs[rng.randrange(len(stubs))]
        try:
            if args.batch:
                request = pb.BatchGetProfilesRequest(user_ids=_ids(rng, args.users, args.batch))
                answer = await stub.BatchGetProfiles(request, metadata=metadata, timeout=30)
                return len(answer.profiles) + len(answer.missing) == args.batch
            user = f"user-{rng.randrange(args.users)}"
            answer = await stub.GetProfile(
                pb.GetProfileRequest(user_id=user), metadata=metadata, timeout=30
            )
            return answer.user_id == user
        except grpc.aio.AioRpcError as error:
            # A user without events (the generator leaves ~5% out) is an answer too.
            return error.code() == grpc.StatusCode.NOT_FOUND

    try:
        return await _drive(call, args.connections, args.seconds)
    finally:
        for channel in channels:
            await channel.close()


async def http_client(args) -> dict:
    import aiohttp

    base = f"http://{args.target}"
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(rng: random.Random) -> bool:
            try:
                if args.batch:
                    body = {"user_ids": _ids(rng, args.users, args.batch)}
                    async with session.post(f"{base}/v1/profiles:batchGet", json=body) as reply:
                        answer = await reply.json()
                        found = len(answer["profiles"]) + len(answer["missing"])
                        return reply.status == 200 and found == args.batch
                user = f"user-{rng.randrange(args.users)}"
                async with session.get(f"{base}/v1/users/{user}/profile") as reply:
                    await reply.read()
                    return reply.status in (200, 404)  # 404: a user without events
            except aiohttp.ClientError:
                return False

        return await _drive(call, args.connections, args.seconds)


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["grpc", "http"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=0)
    args = parser.parse_args(argv)
    run = grpc_client if args.mode == "grpc" else http_client
    print(json.dumps(asyncio.run(run(args))))


# The server's processes by what they are (their command lines), for CPU per request.
KINDS = (("ServeReplica", "replicas"), ("ProfileShard", "shards"), ("haproxy", "proxy"))


def server_cpu() -> dict[str, float]:
    """CPU seconds so far of the processes this benchmark's Ray runs (its descendants:
    `ray.init(address="local")` starts them), by kind ("proxy": HAProxy or Serve's
    proxy actor). Other processes of the shared machine are not counted."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    seconds: dict[str, float] = {"replicas": 0.0, "shards": 0.0, "proxy": 0.0, "other": 0.0}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().decode(errors="replace")
        except OSError:
            continue
        kind = next((k for marker, k in KINDS if marker in command), None)
        if kind is None and "ProxyActor" in command:
            kind = "proxy"
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        seconds[kind or "other"] += used
    return seconds


def run_client(mode: str, target: str, args, *, batch: int = 0, connections: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.grpc_bench",
        "client",
        mode,
        "--target",
        target,
        "--users",
        str(args.users),
        "--seconds",
        str(args.seconds),
        "--connections",
        str(connections),
        "--channels",
        str(args.channels),
        "--batch",
        str(batch),
    ]
    before = server_cpu()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    after = server_cpu()
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # The server's own CPU per request (warm-up included on both sides): unlike the
    # machine's, not moved by whatever else the shared machine runs.
    for kind in before:
        figures[f"server_cpu_ms_{kind}"] = (
            (after[kind] - before[kind]) * 1000 / max(figures["calls"], 1)
        )
    figures["server_cpu_ms_per_request"] = sum(figures[f"server_cpu_ms_{kind}"] for kind in before)
    if batch:
        figures["profiles_per_s"] = figures["req_per_s"] * batch
    return figures


def summary(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "round"]
    out = {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


# --- the benchmark ---------------------------------------------------------------------
def main() -> None:
    if sys.argv[1:2] == ["client"]:
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels of the client")
    parser.add_argument("--batch", type=int, default=100, help="ids per batch lookup (0: none)")
    parser.add_argument("--batch-connections", type=int, default=8)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "cassandra"])
    parser.add_argument("--proxy", default="haproxy", choices=["haproxy", "default"])
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--http-port", type=int, default=24010)
    parser.add_argument("--grpc-port", type=int, default=24011)
    args = parser.parse_args()

    if args.proxy == "haproxy":
        os.environ.update(
            {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                # HAProxy's side ports and Serve's fallback proxies: out of the way of
                # another Serve on the machine.
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(args.http_port + 2),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(args.http_port + 3),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(args.http_port + 4),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(args.http_port + 5),
            }
        )
    import ray
    from ray import serve

    from bench.http_bench import populate, read_script, run_wrk, wait_ready
    from persona.settings import load_settings
    from serving.app import build_ingress
    from serving.grpc_ingress import grpc_options

    url, keyspace = store_url(args.store, load_settings())
    overrides = {
        "store_url": url,
        "namespace": f"bench-grpc-{uuid.uuid4().hex[:6]}",
        "checkpoint_interval_s": 3600.0,
        "grpc_port": args.grpc_port,
    }
    settings = load_settings(**overrides)
    results: dict = {
        "bench": "grpc",
        "users": args.users,
        "items": args.items,
        "proxy": args.proxy,
        "ingress_replicas": args.replicas,
        "connections": args.connections,
        "channels": args.channels,
        "batch": args.batch,
        "batch_connections": args.batch_connections,
        "seconds": args.seconds,
        "rounds": args.rounds,
    }
    start_local_ray(settings.namespace)
    try:
        store, fleet, topics = populate(settings, args.users, args.items)
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.http_port},
            grpc_options=grpc_options(settings),
        )
        serve.run(build_ingress(overrides, replicas=args.replicas), name=APP, route_prefix="/")
        wait_ready(f"http://127.0.0.1:{args.http_port}", topics[0])
        targets = {"grpc": f"127.0.0.1:{args.grpc_port}", "http": f"127.0.0.1:{args.http_port}"}
        runs: dict[str, list[dict]] = {"grpc": [], "http": []}
        batch_runs: dict[str, list[dict]] = {"grpc": [], "http": []}
        for round_ in range(args.rounds):
            order = ("grpc", "http") if round_ % 2 == 0 else ("http", "grpc")
            for mode in order:
                run = run_client(mode, targets[mode], args, connections=args.connections)
                runs[mode].append({**run, "round": round_})
                if args.batch:
                    run = run_client(
                        mode,
                        targets[mode],
                        args,
                        batch=args.batch,
                        connections=args.batch_connections,
                    )
                    batch_runs[mode].append({**run, "round": round_})
        results["profile"] = {mode: summary(r) for mode, r in runs.items()}
        results["profile_runs"] = runs
        results["grpc_to_http"] = (
            results["profile"]["grpc"]["req_per_s"] / results["profile"]["http"]["req_per_s"]
        )
        if args.batch:
            results["batch_lookup"] = {mode: summary(r) for mode, r in batch_runs.items()}
            results["batch_grpc_to_http"] = (
                results["batch_lookup"]["grpc"]["profiles_per_s"]
                / results["batch_lookup"]["http"]["profiles_per_s"]
            )
        if shutil.which("wrk"):
            results["profile_wrk"] = run_wrk(
                f"http://{targets['http']}",
                read_script("/v1/users/user-%d/profile", args.users),
                args.connections,
                int(args.seconds),
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
