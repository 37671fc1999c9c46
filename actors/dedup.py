"""What a shard has applied, per (partition, source): sets of line numbers, bounded in
memory and durable in the store with a retention. Pure Python, no Ray.

Every event a shard applies comes from a *source* with a *line*: a file's identity
and the event's line (or row) in it, or an HTTP client's Idempotency-Key (scoped to
the client) and the event's index in the request. Remembering lines rather than
batch ids is what makes a rerun exact whatever batch size it uses: a file ingested
with --batch 7 and rerun with --batch 3 sends other batches but the same lines.

A partition records each batch's whole line span (every event of the partition in
that span is in the batch), so a request is one interval, and so is a file ingested
in batches, in each partition. The index keeps recently used entries
in memory (LRU over clean entries); entries changed since the last checkpoint are
written to the store with the checkpoint, and entries not in memory are read from
the store, so memory stays bounded whatever the traffic, and a partition's memory
moves with it (the new owner reads what the old owner's release checkpoint wrote).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from storage import codec


class LineSet:
    """A set of non-negative integers as sorted, disjoint, non-adjacent inclusive
    intervals ``[lo, hi]``."""

    __slots__ = ("highs", "lows")

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()):
        self.lows: list[int] = []
        self.highs: list[int] = []
        for lo, hi in intervals:
            self.add_range(lo, hi)

    def __contains__(self, line: int) -> bool:
        at = bisect_right(self.lows, line) - 1
        return at >= 0 and line <= self.highs[at]

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in zip(self.lows, self.highs, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LineSet) and (self.lows, self.highs) == (other.lows, other.highs)

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.lows, self.highs, strict=True))

    def add_range(self, lo: int, hi: int) -> None:
        lows, highs = self.lows, self.highs
        # Intervals that overlap or touch [lo, hi] merge with it.
        first = bisect_right(highs, lo - 2)
        last = bisect_right(lows, hi + 1)
        if first < last:
            lo = min(lo, lows[first])
            hi = max(hi, highs[last - 1])
        lows[first:last] = [lo]
        highs[first:last] = [hi]

    def add(self, lines: Iterable[int]) -> None:
        """Add lines (in any order); runs of consecutive lines cost one merge each."""
        if isinstance(lines, range) and lines.step == 1:
            if len(lines):
                self.add_range(lines.start, lines.stop - 1)
            return
        ordered = sorted(set(lines))
        if not ordered:
            return
        start = prev = ordered[0]
        for line in ordered[1:]:
            if line != prev + 1:
                self.add_range(start, prev)
                start = line
            prev = line
        self.add_range(start, prev)

    def update(self, other: LineSet) -> None:
        for lo, hi in zip(other.lows, other.highs, strict=True):
            self.add_range(lo, hi)

    def encode(self) -> bytes:
        flat = [v for pair in zip(self.lows, self.highs, strict=True) for v in pair]
        return codec.encode(flat)

    @classmethod
    def decode(cls, blob: bytes, what: str = "dedup record") -> LineSet:
        flat = codec.decode(blob, what=what)
        lines = cls()
        lines.lows, lines.highs = list(flat[0::2]), list(flat[1::2])
        return lines


def dedup_key(partition: int, source: str) -> str:
    """The store key of one (partition, source): shard-independent, so it survives moves."""
    return f"{partition}/{source}"


class DedupIndex:
    """Applied lines per (partition, source), the recently used ones in memory."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, LineSet] = OrderedDict()
        self.partition_of: dict[str, int] = {}
        self.dirty: set[str] = set()
        # Keys a batch in flight needs from its load to its commit: never dropped.
        self.pinned: Counter[str] = Counter()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def unknown(self, keys: Iterable[str]) -> list[str]:
        """Keys that must be read from the store before their lines can be judged."""
        entries = self.entries
        return [k for k in dict.fromkeys(keys) if k not in entries]

    def install(self, found: Mapping[str, LineSet], asked: Iterable[str], partitions) -> None:
        """Take what the store held for ``asked`` keys (absent: nothing applied yet).
        Merged with any lines applied meanwhile: a union is always right, since both
        describe the same partition's history."""
        for key in asked:
            stored = found.get(key, LineSet())
            current = self.entries.get(key)
            if current is None:
                self.entries[key] = stored
                self.partition_of[key] = partitions[key]
            else:
                current.update(stored)
        self._shrink(keep=set(asked))

    def seen(self, key: str, lines: Sequence[int]) -> list[bool]:
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(f"dedup entry {key!r} was not loaded")
        self.entries.move_to_end(key)
        return [line in entry for line in lines]

    def record(self, key: str, partition: int, lines: Iterable[int]) -> None:
        """Add applied lines to an entry read before (``install``): an entry made of
        these lines alone would, once written, overwrite the source's history."""
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(f"dedup entry {key!r} must be read from the store before it grows")
        entry.add(lines)
        self.entries.move_to_end(key)
        self.dirty.add(key)
        self._shrink()

    def take_dirty(self) -> dict[str, bytes]:
        """Encoded entries changed since the last call (a checkpoint writes them)."""
        taken = {key: self.entries[key].encode() for key in self.dirty if key in self.entries}
        self.dirty = set()
        return taken

    def mark_dirty(self, keys: Iterable[str]) -> None:
        """A checkpoint that failed to write these must write them next time."""
        self.dirty.update(k for k in keys if k in self.entries)

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        for key in [k for k, p in self.partition_of.items() if p in gone]:
            del self.entries[key]
            del self.partition_of[key]
            self.dirty.discard(key)

    def pin(self, keys: Iterable[str]) -> None:
        self.pinned.update(keys)

    def unpin(self, keys: Iterable[str]) -> None:
        self.pinned.subtract(keys)
        for key in [k for k, n in self.pinned.items() if n <= 0]:
            del self.pinned[key]

    def over_capacity(self) -> bool:
        """More changed entries than the memory holds: time for a checkpoint."""
        return len(self.dirty) >= self.capacity

    def _shrink(self, keep: set[str] = frozenset()) -> None:
        """Drop least recently used clean entries past the capacity, down to 90% of it
        (so eviction runs in rounds, not on every call). Dirty ones wait for the
        checkpoint that writes them; pinned ones for their batch; ``keep`` were just
        read for a batch."""
        if len(self.entries) <= self.capacity:
            return
        excess = len(self.entries) - int(self.capacity * 0.9)
        evictable = len(self.entries) - len(self.dirty) - len(self.pinned) - len(keep)
        if evictable <= 0:
            return  # nothing can go before the next checkpoint: do not scan for it
        pinned = self.pinned
        for key in list(self.entries):
            if excess <= 0:
                break
            if key not in self.dirty and key not in keep and key not in pinned:
                del self.entries[key]
                del self.partition_of[key]
                excess -= 1

    def __len__(self) -> int:
        return len(self.entries)
