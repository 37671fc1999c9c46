"""Export profiles to Parquet or JSONL (after checkpointing every shard, so the store is current).

python -m jobs.export OUT.parquet|OUT.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from actors.profile import Profile, ProfileRules
from jobs.common import fleet_for_job
from persona.errors import PersonaError
from persona.settings import Settings
from serving.views import profile_view
from storage import codec

CHUNK = 10_000


def run(out: Path, settings: Settings | None = None) -> int:
    if out.suffix not in (".parquet", ".jsonl"):
        raise PersonaError(f"{out}: export to .parquet or .jsonl")
    with fleet_for_job(settings) as fleet:
        fleet.checkpoint()
        rules = ProfileRules.from_settings(fleet.settings)
        return write(fleet.store.scan_profiles(), rules, out)


def write(stored: Iterable[tuple[str, bytes]], rules: ProfileRules, out: Path) -> int:
    """Write the views of stored profiles (user, blob) to ``out``; returns how many."""
    now = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    writer = None
    rows: list[dict] = []

    def flush() -> None:
        nonlocal writer
        if not rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            [
                {
                    **r,
                    "counters": json.dumps(r["counters"]),
                    "interests": json.dumps(r["interests"]),
                    "recent_actions": json.dumps(r["recent_actions"]),
                }
                for r in rows
            ]
        )
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        rows.clear()

    with out.open("w") if out.suffix == ".jsonl" else contextlib.nullcontext() as text:
        for user, blob in stored:
            record = codec.decode(blob, what=f"profile {user}")
            view = profile_view(Profile.from_record(record, rules).view(rules), rules, now)
            count += 1
            if text is not None:
                text.write(json.dumps(view) + "\n")
            else:
                rows.append(view)
                if len(rows) >= CHUNK:
                    flush()
    if out.suffix == ".parquet":
        flush()
        if writer is not None:
            writer.close()
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        count = run(args.out)
    except PersonaError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    print(f"export: {count:,} profiles to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
