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
    events: Iterable[Sequence], owners: Mapping[int, str], partitions: int
) -> dict[str, list]:
    """Group events (user id first) by the shard that owns the user's partition."""
    parts: dict[str, list] = defaultdict(list)
    for event in events:
        parts[owners[partition_of(event[0], partitions)]].append(event)
    return dict(parts)


def group_users(
    user_ids: Iterable[str], owners: Mapping[int, str], partitions: int
) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for user in user_ids:
        groups[owners[partition_of(user, partitions)]].append(user)
    return dict(groups)
