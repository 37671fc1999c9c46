"""Ragged per-row storage (actors/extents.py): rows grow, move, shrink and are compacted
without losing or mixing up their entries. Pure numpy, no services."""

from __future__ import annotations

import numpy as np

from actors.extents import Extents, class_sizes


def entries(pool: Extents, rows, counts) -> list[list[int]]:
    at = pool.grid(np.asarray(rows), np.asarray(counts), max(counts))
    return [[int(v) for v in line[:n]] for line, n in zip(pool["v"][at], counts, strict=True)]


def test_classes_grow_by_a_fifth_up_to_the_limit():
    assert class_sizes(100, step=4).tolist() == [0, 4, 8, 12, 16, 20, 24, 29, 35, 42, 51, 62,
                                                 75, 90, 100]  # fmt: skip
    assert class_sizes(512, block=512).tolist() == [0, 512]


def test_rows_keep_their_entries_through_moves_reuse_and_compaction():
    rng = np.random.default_rng(1)
    pool = Extents({"v": np.int64}, 100)
    pool.grow_rows(50)
    want: dict[int, list[int]] = {r: [] for r in range(50)}
    counts = np.zeros(50, dtype=np.int64)
    stamp = 1
    for _ in range(200):
        rows = np.unique(rng.integers(0, 50, size=10))
        new = np.minimum(counts[rows] + rng.integers(-5, 12, size=len(rows)), 100).clip(0)
        pool.resize(rows, counts[rows], new)
        for row, n in zip(rows.tolist(), new.tolist(), strict=True):
            del want[row][n:]
            added = list(range(stamp, stamp + n - len(want[row])))
            stamp += len(added)
            at = pool.at(np.full(len(added), row), np.arange(len(want[row]), n))
            pool["v"][at] = added
            want[row] += added
        counts[rows] = new
        assert entries(pool, range(50), counts.tolist()) == [want[r] for r in range(50)]
        # Slots past a row's count read as none, even in reused extents.
        at = pool.grid(np.arange(50), pool.sizes[pool.class_of[counts]], 100)
        past = np.arange(100)[None, :] >= counts[:, None]
        assert not pool["v"][at][past].any()
    assert pool.idle > 0
    held = np.flatnonzero(pool.off > 0)
    pool.compact(held, counts[held])
    assert pool.idle == 0
    assert entries(pool, range(50), counts.tolist()) == [want[r] for r in range(50)]
