"""Routing: a stable hash from user id to one of P partitions, and partitions to shards.

The hash must be the same in every process and release (Python's hash() is
salted per process), so it is CRC32 of the UTF-8 bytes: fast, in the standard
library, and uniform enough over P partitions (tested).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence


def partition_of(user_id: str, partitions: int) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % partitions


def shard_name(index: int) -> str:
    return f"persona-shard-{index}"


def initial_assignment(partitions: int, shards: int) -> dict[int, str]:
    """Round-robin: partition p goes to shard p % shards."""
    return {p: shard_name(p % shards) for p in range(partitions)}


def split_by_owner(
    events: Sequence[Sequence], lines: Sequence[int], owners: Mapping[int, str], partitions: int
) -> dict[str, tuple[list, list[int]]]:
    """Events (user id first) and their lines, grouped by the shard that owns each
    user's partition; every event keeps its own line."""
    parts: dict[str, tuple[list, list[int]]] = {}
    for event, line in zip(events, lines, strict=True):
        part = parts.setdefault(owners[partition_of(event[0], partitions)], ([], []))
        part[0].append(event)
        part[1].append(line)
    return parts


def group_users(
    user_ids: Iterable[str], owners: Mapping[int, str], partitions: int
) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for user in user_ids:
        groups[owners[partition_of(user, partitions)]].append(user)
    return dict(groups)


def plan_moves(owners: Mapping[int, str], shards: Sequence[str]) -> list[tuple[int, str, str]]:
    """(partition, from, to) moves that balance partitions over ``shards`` while moving
    as few as possible: a partition stays where it is while its shard is wanted and
    under its quota."""
    count = len(owners)
    quota = {
        s: count // len(shards) + (1 if i < count % len(shards) else 0)
        for i, s in enumerate(shards)
    }
    kept: dict[str, int] = {s: 0 for s in shards}
    homeless = []
    for partition in sorted(owners):
        owner = owners[partition]
        if owner in kept and kept[owner] < quota[owner]:
            kept[owner] += 1
        else:
            homeless.append(partition)
    moves = []
    for shard in shards:
        while kept[shard] < quota[shard] and homeless:
            partition = homeless.pop(0)
            moves.append((partition, owners[partition], shard))
            kept[shard] += 1
    return moves
