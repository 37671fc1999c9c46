"""Checkpoint every shard now and report the journal positions.

python -m jobs.checkpoint
"""

from __future__ import annotations

import sys

from jobs.common import fleet_for_job


def run() -> list[dict]:
    with fleet_for_job() as fleet:
        return fleet.checkpoint()


def main(argv: list[str] | None = None) -> int:
    for result in run():
        print(
            f"{result['shard']}: position {result['seq']}, "
            f"{result['profiles']} profiles written in {result['seconds']:.2f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
