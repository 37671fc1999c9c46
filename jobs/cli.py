"""The `persona` command line: local operations, batch jobs and a look at users.

Commands: demo, up, down, status, scale, ingest, generate, checkpoint, export, evaluate,
train, model list|switch VERSION|rollback, profile USER, recs USER,
cassandra start|stop|status|fetch, bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from persona.errors import PersonaError
from persona.settings import load_settings


def _settings(args: argparse.Namespace, *, starting: bool = False):
    """The command's settings: the running stack's (see settings_for_command), except
    for commands that start one, which take the environment and the flags."""
    from jobs.common import settings_for_command

    overrides = {}
    if getattr(args, "store", None):
        overrides["store_url"] = args.store
    if getattr(args, "port", None):
        overrides["http_port"] = args.port
    return load_settings(**overrides) if starting else settings_for_command(**overrides)


def _cassandra(args: argparse.Namespace) -> int:
    from storage.cassandra_local import LocalNode

    overrides = {"cassandra_port": args.cql_port} if args.cql_port else {}
    node = LocalNode.from_settings(load_settings(**overrides))
    if args.action == "start":
        print(node.start())
    elif args.action == "stop":
        print(node.stop())
    elif args.action == "status":
        running, message = node.status()
        print(message)
        return 0 if running else 3
    elif args.action == "fetch":
        print(f"Cassandra jars in {node.fetch_jars()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo import run

    return run(
        _settings(args, starting=True),
        once=args.once,
        users=args.users,
        items=args.items,
        events=args.events,
    )


def _up(args: argparse.Namespace) -> int:
    from jobs.local import up

    state = up(_settings(args, starting=True), haproxy=not args.no_haproxy)
    grpc = f", gRPC {state['grpc']}" if state.get("grpc") else ""
    print(
        f"Persona is up: API {state['api']} (docs {state['api']}/docs){grpc}, "
        f"shards {', '.join(state['shards'])}; dashboard {state['dashboard']}"
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    from jobs.local import down

    for line in down(_settings(args)):
        print(line)
    return 0


def _status(args: argparse.Namespace) -> int:
    from jobs.local import status

    report = status(_settings(args))
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("stack") == "running" else 3


def _scale(args: argparse.Namespace) -> int:
    from jobs.common import fleet_for_job

    fleet = fleet_for_job(_settings(args))
    for move in fleet.scale(args.shards):
        print(
            f"moved {move['partitions']} partitions {move['from']} -> {move['to']} "
            f"in {move['seconds']:.2f}s"
        )
    print(f"{len(fleet.shards)} shards: {', '.join(sorted(fleet.shards))}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from jobs.ingest import main

    return main(args.rest)


def _generate(args: argparse.Namespace) -> int:
    from jobs.generate import main

    main(args.rest)
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from jobs.checkpoint import main

    return main([])


def _export(args: argparse.Namespace) -> int:
    from jobs.export import main

    return main(args.rest)


def _evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import run

    return run(args)


def _train(args: argparse.Namespace) -> int:
    from jobs.train_embeddings import main

    return main(args.rest)


def _model(args: argparse.Namespace) -> int:
    """The model versions of the store the command acts on (the running stack's)."""
    from actors import item_model
    from storage import open_store

    store = open_store(settings=_settings(args))
    try:
        if args.action == "list":
            for row in item_model.list_models(store):
                mark = "*" if row["serving"] else " "
                print(
                    f"{mark} {row['version']}  {row['items']:,} items x {row['dim']}  "
                    f"{row.get('algorithm', '')} on {row.get('events', 0):,} events "
                    f"({row.get('source', '')})"
                )
            return 0
        if args.action == "switch":
            if not args.version:
                print("persona: model switch needs a VERSION", file=sys.stderr)
                return 2
            print(f"serving {item_model.switch(store, args.version)}")
        else:
            print(f"serving {item_model.switch(store, rollback=True)} (rolled back)")
        return 0
    finally:
        store.close()


def _experiments(args: argparse.Namespace) -> int:
    """Results, plots and changes of the experiments in the store the command acts on."""
    from jobs import experiments
    from storage import open_store

    settings = _settings(args)
    store = open_store(settings=settings)
    try:
        return experiments.run(settings, store, args)
    finally:
        store.close()


def _exposures(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobs.experiments import export_exposures
    from storage import open_store

    store = open_store(settings=_settings(args))
    try:
        count = export_exposures(store, Path(args.out), since=args.since)
    finally:
        store.close()
    print(f"{count} exposures -> {args.out}")
    return 0


def _ask_api(args: argparse.Namespace, path: str) -> int:
    settings = _settings(args)
    url = f"http://127.0.0.1:{settings.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            print(json.dumps(json.loads(reply.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"persona: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(
            f"persona: the API at {url} is not answering ({exc.reason}); run `persona up`",
            file=sys.stderr,
        )
        return 2


def _profile(args: argparse.Namespace) -> int:
    return _ask_api(args, f"/v1/users/{urllib.parse.quote(args.user, safe='')}/profile")


def _recs(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"k": args.k, **({"topic": args.topic} if args.topic else {})})
    return _ask_api(
        args, f"/v1/users/{urllib.parse.quote(args.user, safe='')}/recommendations?{query}"
    )


def _bench(args: argparse.Namespace) -> int:
    """Benchmarks live in the checkout, not in the package: run them from there."""
    import subprocess

    from persona.settings import PROJECT_ROOT

    if not (PROJECT_ROOT / "bench" / "run_all.py").exists():
        print("persona: the benchmarks run from a checkout of Persona (bench/)", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "bench.run_all", *(["--quick"] if args.quick else [])]
    return subprocess.call(command, cwd=PROJECT_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, passthrough: bool = False):
        sub = commands.add_parser(name, help=help, add_help=not passthrough)
        sub.set_defaults(run=run)
        if passthrough:
            sub.add_argument("rest", nargs=argparse.REMAINDER)
        return sub

    demo = command("demo", _demo, "generate, ingest and serve a synthetic data set end to end")
    demo.add_argument("--once", action="store_true", help="exit after the walkthrough")
    demo.add_argument("--store", help="store URL (default: embedded SQLite)")
    demo.add_argument("--port", type=int, help="HTTP port (default 8000)")
    demo.add_argument("--users", type=int, default=2_000)
    demo.add_argument("--items", type=int, default=1_000)
    demo.add_argument("--events", type=int, default=100_000)

    upc = command("up", _up, "start a local Ray head, the shards and the HTTP API")
    upc.add_argument("--store")
    upc.add_argument("--port", type=int)
    upc.add_argument("--no-haproxy", action="store_true", help="use Serve's default proxy")
    command("down", _down, "stop what `persona up` started").add_argument("--store")
    command("status", _status, "cluster, shards and API readiness").add_argument("--store")
    scale = command("scale", _scale, "grow or shrink the shard set live (moves whole partitions)")
    scale.add_argument("--shards", type=int, required=True)
    scale.add_argument("--store")
    command("ingest", _ingest, "ingest event files (see `persona ingest --help`)", True)
    command("generate", _generate, "generate a synthetic data set", True)
    command("checkpoint", _checkpoint, "checkpoint every shard now")
    command("export", _export, "export profiles to Parquet or JSONL", True)
    from jobs.evaluate import add_arguments

    add_arguments(
        command(
            "evaluate",
            _evaluate,
            "offline Recall/NDCG/MRR/coverage next to baselines (--dataset movielens-100k)",
        )
    )
    command("train", _train, "train item embeddings, publish and switch to them", True)
    model = command("model", _model, "list, switch or roll back item-embedding versions")
    model.add_argument("action", choices=["list", "switch", "rollback"])
    model.add_argument("version", nargs="?", help="the version to switch to")
    model.add_argument("--store")
    exp = command("experiments", _experiments, "experiment results, plots and changes")
    exp.add_argument("name", nargs="?", help="an experiment (none: list them)")
    exp.add_argument("--plot", metavar="OUT.png", help="draw the engagement rate over time")
    exp.add_argument("--json", action="store_true", help="the whole report as JSON")
    exp.add_argument(
        "--set",
        metavar="V=SHARE,...",
        help="change the running experiment's shares (a new NAME starts a new experiment)",
    )
    exp.add_argument("--blend", action="append", metavar="V=JSON", help="a variant's blend")
    exp.add_argument("--control", help="the control variant")
    exp.add_argument("--salt", help="the salt of a new experiment (default: its name)")
    exp.add_argument("--store")
    expo = command("exposures", _exposures, "export the exposure log as JSON lines")
    expo.add_argument("action", choices=["export"])
    expo.add_argument("out", metavar="OUT.jsonl")
    expo.add_argument("--since", type=float, default=0.0, help="epoch seconds")
    expo.add_argument("--store")
    profile = command("profile", _profile, "print a user's profile from the running API")
    profile.add_argument("user")
    profile.add_argument("--port", type=int)
    recs = command("recs", _recs, "print a user's recommendations from the running API")
    recs.add_argument("user")
    recs.add_argument("--k", type=int, default=10)
    recs.add_argument("--topic")
    recs.add_argument("--port", type=int)
    cassandra = command("cassandra", _cassandra, "run a local Cassandra node for dev and tests")
    cassandra.add_argument("action", choices=["start", "stop", "status", "fetch"])
    cassandra.add_argument("--cql-port", type=int, help="native (CQL) port; default 9042")
    bench = command("bench", _bench, "run the benchmarks and regenerate bench/RESULTS.md")
    bench.add_argument("--quick", action="store_true")
    return parser


def _join_with_ray_token(args: argparse.Namespace) -> None:
    """Ray 2.60 authenticates every driver of the clusters it starts with the token in
    ~/.ray/auth_token. A command that starts or joins the stack `persona up` records
    says so before Ray is first imported (Ray reads the mode once, at import)."""
    import os

    from jobs.local import read_stack

    if args.command in ("up", "down", "status") or read_stack(load_settings()) is not None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A pass-through command hands its arguments to the job's own parser. argparse's
    # REMAINDER takes nothing when they start with an option (`persona generate --users
    # 10 ...`), so options it did not take go to the job too, in their order.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = [*unknown, *args.rest]
    try:
        _join_with_ray_token(args)
        return args.run(args)
    except PersonaError as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
