"""Lists of varying length per row, in flat numpy columns: the profile table's ragged storage.

A row's entries (its recent actions, its topics, its hidden items, its filter of
earlier items) fill one extent of a pool: a run of slots in flat columns, sized by
class (capacities growing by about a fifth), so a row holds room for what it has,
not for the bound. A row that outgrows its extent moves to one of the next class
(its entries copied, in slot order, so slot numbers stay valid); freed extents are
reused by rows of the same class, and the pool is compacted when they add up to a
quarter of what is in use. In a ``zeroed`` pool slots a row has not filled are zero
(freed extents are zeroed); in any pool, extent 0 is never handed out and stays
zero: reads of slots a row does not have (``grid``) are pointed there and read 0.

Vectorised throughout: a batch moves, reads or writes the extents of many rows with
a handful of numpy operations, and the caller keeps each row's count of entries.
"""

from __future__ import annotations

import math

import numpy as np

# Growth between classes: small steps waste little room (about a tenth on average)
# and cost a copy of the row's entries each time it moves up.
GROWTH = 1.2
# Compact when freed extents hold this share of what is in use (and at least MIN_IDLE
# slots): bounds the memory held by extents rows left behind when they grew.
IDLE_SHARE = 0.25
MIN_IDLE = 1 << 16
# Rows are compacted a chunk at a time, so the index arrays stay small.
COMPACT_ROWS = 1 << 16


def class_sizes(limit: int, block: int = 1, step: int = 1) -> np.ndarray:
    """Capacities of the classes in entries: 0 (no extent), then from ``step`` up by
    GROWTH (and at least ``step``), the last one ``limit`` rounded up to whole blocks."""
    step = -(-max(step, block) // block) * block
    top = -(-limit // block) * block
    sizes, size = [0], step
    while size < top:
        sizes.append(size)
        size = max(size + step, -(-math.ceil(size * GROWTH) // block) * block)
    sizes.append(top)
    return np.asarray(sizes, dtype=np.int64)


class Extents:
    """Rows' entries in extents of flat ``columns`` (name -> dtype), at most ``limit``
    per row; ``block`` entries per offset unit (every extent is whole blocks), classes
    at least ``step`` entries apart (a row that grows one entry at a time moves at most
    every ``step`` entries).
    The caller owns the rows' entry counts and passes them in; the class of a row is
    always the smallest that holds its count."""

    def __init__(
        self,
        columns: dict[str, type],
        limit: int,
        *,
        block: int = 1,
        step: int = 1,
        zeroed: bool = True,
    ):
        self.block = block
        # Whether slots past a row's count must read as zero (entries are summed or
        # or-ed into new slots); otherwise readers go by the counts and freeing is cheaper.
        self.zeroed = zeroed
        self.limit = limit
        self.sizes = class_sizes(limit, block, step)
        # Entry count -> its class.
        self.class_of = np.searchsorted(self.sizes, np.arange(limit + 1)).astype(np.int64)
        self.dtypes = dict(columns)
        self.columns = {name: np.zeros(block, dtype=dt) for name, dt in columns.items()}
        # Per row, its extent in blocks (0: none). uint32: up to 4G blocks per pool.
        self.off = np.zeros(0, dtype=np.uint32)
        self.top = 1  # blocks handed out so far (block 0 is the zero extent)
        self.free: list[list[np.ndarray]] = [[] for _ in self.sizes]
        self.idle = 0  # entries in freed extents

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    # --- rows and room ---
    def grow_rows(self, capacity: int) -> None:
        grown = np.zeros(capacity, dtype=np.uint32)
        grown[: len(self.off)] = self.off
        self.off = grown

    def _room(self, blocks: int) -> None:
        have = len(next(iter(self.columns.values()))) // self.block
        if blocks <= have:
            return
        want = max(blocks, have * 2) * self.block
        if want // self.block >= 2**32:
            raise MemoryError(f"extent pool past {2**32:,} blocks; use more shards")
        for name, column in self.columns.items():
            # np.zeros maps its pages lazily: the unused tail costs no memory.
            grown = np.zeros(want, dtype=column.dtype)
            grown[: len(column)] = column
            self.columns[name] = grown

    def _take(self, cls: int, count: int) -> np.ndarray:
        """``count`` extents of class ``cls`` (block offsets): freed ones first."""
        out, need = [], count
        stack = self.free[cls]
        while need and stack:
            last = stack[-1]
            if len(last) <= need:
                out.append(stack.pop())
                need -= len(last)
            else:
                out.append(last[-need:])
                stack[-1] = last[:-need]
                need = 0
        size = int(self.sizes[cls]) // self.block
        if need:
            start = self.top
            self.top += need * size
            self._room(self.top)
            out.append(np.arange(start, self.top, size, dtype=np.int64))
        self.idle -= (count - need) * int(self.sizes[cls])
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _give(self, offsets: np.ndarray, classes: np.ndarray) -> None:
        """Free extents (zeroed, in a zeroed pool)."""
        held = classes > 0
        offsets, classes = offsets[held], classes[held]
        if not len(offsets):
            return
        sizes = self.sizes[classes]
        if self.zeroed:
            at = _ranges(offsets * self.block, sizes)
            for column in self.columns.values():
                column[at] = 0
        self.idle += int(sizes.sum())
        for cls in np.unique(classes).tolist():
            self.free[cls].append(offsets[classes == cls])

    def resize(self, rows: np.ndarray, old_n: np.ndarray, new_n: np.ndarray) -> None:
        """Give ``rows`` (distinct) room for ``new_n`` entries each; rows that change
        class move, keeping their first min(old, new) entries in their slots."""
        old_n, new_n = np.asarray(old_n, dtype=np.int64), np.asarray(new_n, dtype=np.int64)
        old_c, new_c = self.class_of[old_n], self.class_of[new_n]
        shrunk = np.flatnonzero((old_c == new_c) & (new_n < old_n)) if self.zeroed else ()
        if len(shrunk):  # slots past the count read as none: zero the ones given up
            start = self.off[rows[shrunk]].astype(np.int64) * self.block + new_n[shrunk]
            at = _ranges(start, old_n[shrunk] - new_n[shrunk])
            for column in self.columns.values():
                column[at] = 0
        moved = np.flatnonzero(old_c != new_c)
        if not len(moved):
            return
        rows, old_c, new_c = rows[moved], old_c[moved], new_c[moved]
        keep = np.minimum(old_n[moved], new_n[moved])
        old_off = self.off[rows].astype(np.int64)
        new_off = np.zeros(len(rows), dtype=np.int64)
        for cls in np.unique(new_c).tolist():
            if cls:
                these = new_c == cls
                new_off[these] = self._take(cls, int(these.sum()))
        if keep.any():
            src, dst = _ranges(old_off * self.block, keep), _ranges(new_off * self.block, keep)
            for column in self.columns.values():
                column[dst] = column[src]
        # Point the rows at their copies before the old extents are freed (and zeroed).
        self.off[rows] = new_off
        self._give(old_off, old_c)

    # --- reading and writing ---
    def at(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Flat positions of (row, slot) pairs (the slots must be within the rows' room)."""
        return self.off[rows].astype(np.int64) * self.block + slots

    def flat(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Flat positions of each row's first ``counts`` entries, row after row."""
        return _ranges(self.off[rows].astype(np.int64) * self.block, counts)

    def grid(self, rows: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
        """(len(rows), width) flat positions; slots past a row's count point at the
        zero extent, so columns read through them give 0 there."""
        slots = np.arange(width)[None, :]
        where = self.off[rows].astype(np.int64)[:, None] * self.block + slots
        return np.where(slots < np.asarray(counts)[:, None], where, 0)

    def read(self, row: int, count: int) -> dict[str, np.ndarray]:
        start = int(self.off[row]) * self.block
        return {name: column[start : start + count] for name, column in self.columns.items()}

    # --- upkeep ---
    def used(self) -> int:
        """Entries held by extents in use (their whole capacity)."""
        return (self.top - 1) * self.block - self.idle

    def nbytes(self) -> int:
        """Bytes of the pool up to its last extent handed out (the part in memory)."""
        entry = sum(np.dtype(dt).itemsize for dt in self.dtypes.values())
        return self.top * self.block * entry + self.off.nbytes

    def wants_compaction(self) -> bool:
        return self.idle > max(MIN_IDLE, IDLE_SHARE * self.used())

    def compact(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """Lay every extent in use out again without gaps: ``rows`` are all rows with
        one, ``counts`` their entries."""
        sizes = self.sizes[self.class_of[counts]] // self.block
        new_off = 1 + np.cumsum(sizes) - sizes
        top = 1 + int(sizes.sum())
        length = max(top + top // 8, 2) * self.block  # some room to grow into
        fresh = {name: np.zeros(length, dtype=c.dtype) for name, c in self.columns.items()}
        for at in range(0, len(rows), COMPACT_ROWS):
            part = slice(at, at + COMPACT_ROWS)
            n = counts[part]
            src = _ranges(self.off[rows[part]].astype(np.int64) * self.block, n)
            dst = _ranges(new_off[part] * self.block, n)
            for name, column in self.columns.items():
                fresh[name][dst] = column[src]
        self.columns = fresh
        self.off[rows] = new_off
        self.top, self.idle = top, 0
        self.free = [[] for _ in self.sizes]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[i], starts[i] + 1, ..., starts[i] + counts[i] - 1, for each i in turn."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - counts), counts) + np.arange(
        total
    )
