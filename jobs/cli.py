"""The `persona` command line: one entry point for local operations and batch jobs."""

from __future__ import annotations

import argparse
import sys

from persona.errors import PersonaError
from persona.settings import load_settings


def _cassandra(args: argparse.Namespace) -> int:
    from storage.cassandra_local import LocalNode

    overrides = {"cassandra_port": args.port} if args.port else {}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    cassandra = commands.add_parser("cassandra", help="run a local Cassandra node for dev/tests")
    cassandra.add_argument("action", choices=["start", "stop", "status", "fetch"])
    cassandra.add_argument("--port", type=int, help="native (CQL) port; default 9042")
    cassandra.set_defaults(run=_cassandra)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PersonaError as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
