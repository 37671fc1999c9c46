"""A shard's resident profiles held column-wise in numpy arrays, updated a batch at a time.

Why arrays: with one ``Profile`` object per user, every event costs a few
microseconds of Python (dict and tuple churn) and every profile several
kilobytes of object headers. Here each user is a row: counters and scalars in
dense arrays, and a bag of at most K topic slots, a bag of the N most recent
actions, its hidden items and its filter of earlier items as lists that grow with
the user (extents sized by class in flat pools, actors/extents.py), so a batch is
applied with a handful of vectorised operations over all its events and a profile
costs about ``130 + 13*recent + 12*topics`` bytes plus its user id, whether the
bounds are 100 and 64 or more.

The semantics are exactly those of ``apply_events`` (the reference model in
actors/profile.py), which stays the specification: rows whose update the fast path
cannot reproduce exactly (a rebase, more distinct topics than K slots, a tie on
event time at the edge of a full recent bag) are materialised as a ``Profile``,
updated by the reference code and written back. tests/test_profile_table.py
checks the two agree on random batches.

Bags, not sorted lists: the reference keeps recent actions sorted and drops the
oldest past N, i.e. it keeps the N largest (ts, item, action) entries. A bag of N
slots where a new entry replaces the smallest one keeps the same set without
shifting anything; order is restored when a profile is read. Times stay float64:
event times are any float, and no narrower encoding keeps every one exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from actors.extents import Extents
from actors.item_stats import CONTEXT
from actors.profile import (
    EXP_FLOOR,
    HIDE,
    REBASE_EXPONENT,
    SEEN_HASHES,
    STORED_SCALARS,
    Profile,
    ProfileRules,
    ProfileView,
    apply_events,
    seen_positions,
)
from storage import codec

# The per-row arrays: a row's counters and scalars, its entry counts, and its co-engagement
# context (the last CONTEXT engagements in its recent bag, as bag slot + 1; 0: none).
# Its recent actions, topics, hidden items and filter of earlier items are lists that
# grow with the user, in pools of extents (actors/extents.py).
ARRAYS = (
    "counts", "first_seen", "last_seen", "t0", "events", "version", "position", "journal",
    "used", "dirty", "n_topics", "n_recent", "n_hidden", "context",
)  # fmt: skip


class Vocabulary:
    """Strings <-> dense ids, so that arrays hold 4-byte ids instead of objects.
    Id 0 means "none": zero-filled arrays start out empty."""

    __slots__ = ("_array", "ids", "names")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = [""]
        self._array = np.asarray(self.names, dtype=object)

    def as_array(self) -> np.ndarray:
        """The names as an object array (id -> name by fancy indexing), kept current."""
        if len(self._array) != len(self.names):
            self._array = np.asarray(self.names, dtype=object)
        return self._array

    def encode(self, values: Sequence[str]) -> np.ndarray:
        get = self.ids.get
        out = np.array([get(v, -1) for v in values], dtype=np.int32)
        for n in np.flatnonzero(out < 0).tolist():
            out[n] = self.add(values[n])
        return out

    def add(self, value: str) -> int:
        known = self.ids.get(value)
        if known is None:
            known = self.ids[value] = len(self.names)
            self.names.append(value)
        return known

    def __len__(self) -> int:
        return len(self.names) - 1


class ProfileTable:
    """Resident profiles of one shard. Not thread-safe: one writer (the shard's loop)."""

    def __init__(self, rules: ProfileRules, capacity: int = 1024):
        self.rules = rules
        self.rows: dict[str, int] = {}
        self.users: list[str | None] = []
        self.free: list[int] = []  # rows given back (below next_row)
        self.next_row = 0  # rows from here on were never used
        self.items = Vocabulary()
        self.topics = Vocabulary()
        self.journals = Vocabulary()
        # The lists that grow with the user; each row's count of entries is a dense array.
        # Recent bags grow by an entry an event: classes 4 apart move a row every 4th.
        # Recent actions and hidden items are read by their counts only; new topic
        # slots are summed into, so they must start at zero.
        recent = {"ts": np.float64, "item": np.int32, "code": np.int8}
        self.recent = Extents(recent, rules.recent_n, step=4, zeroed=False)
        self.topic = Extents({"id": np.int32, "score": np.float64}, rules.top_k, step=2)
        hidden = {"item": np.int32, "ts": np.float64}
        self.hidden = Extents(hidden, rules.hidden_n, step=2, zeroed=False)
        # Filters of the items that left a row's recent bag (Profile.seen), for the rows
        # that have one: only users past recent_n actions. One block per filter.
        size = max(1, rules.seen_bytes)
        self.seen = Extents({"bits": np.uint8}, size, block=size)
        # Per vocabulary id, the filter bit positions of that item (seen_positions).
        self._seen_bits = np.zeros((0, SEEN_HASHES), dtype=np.int64)
        self.embedding: dict[int, tuple[np.ndarray, float]] = {}
        self.clock = 0  # LRU: each touch stamps rows with a larger number
        self.capacity = 0
        # Context entries are bag slots + 1: one byte each while the bag has < 255 slots.
        self._context_dtype = np.uint8 if rules.recent_n < 255 else np.uint16
        self._allocate(capacity)
        self._weights = np.array(rules.weights, dtype=np.float64)
        self._hide = rules.codes.get(HIDE, -1)

    # --- storage ---
    def _allocate(self, capacity: int) -> None:
        rules, n = self.rules, self.capacity
        a = len(rules.actions)
        # All zero when empty (vocabulary id 0 is "none"; first/last seen and t0 mean
        # nothing while events == 0): np.zeros maps untouched capacity lazily, so
        # memory follows the rows in use, not the capacity.
        for name, shape, dtype in (
            ("counts", (a,), np.int32),
            ("first_seen", (), np.float64),
            ("last_seen", (), np.float64),
            ("t0", (), np.float64),
            ("events", (), np.int64),
            ("version", (), np.int64),
            ("position", (), np.int64),
            ("journal", (), np.int32),
            ("used", (), np.int64),
            ("dirty", (), np.bool_),  # changed since last written to the store
            ("n_topics", (), np.int16),
            ("n_recent", (), np.int16),
            ("n_hidden", (), np.int16),
            # The last CONTEXT engagements in the recent bag by time, oldest first, as
            # bag slot + 1 (0: none): what new engagements pair with.
            ("context", (CONTEXT,), self._context_dtype),
        ):
            grown = np.zeros((capacity, *shape), dtype=dtype)
            if n:
                grown[:n] = getattr(self, name)
            setattr(self, name, grown)
        for pool in self._pools():
            pool.grow_rows(capacity)
        self.users.extend([None] * (capacity - n))
        self.capacity = capacity

    def _pools(self) -> tuple[Extents, ...]:
        return self.recent, self.topic, self.hidden, self.seen

    def _seen_counts(self, rows) -> np.ndarray:
        return np.where(self.seen.off[rows] > 0, self.rules.seen_bytes, 0)

    def _clear(self, rows: int | np.ndarray) -> None:
        """Reset one row or an array of distinct rows to the empty state."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        none = np.zeros(len(rows), dtype=np.int64)
        self.recent.resize(rows, self.n_recent[rows], none)
        self.topic.resize(rows, self.n_topics[rows], none)
        self.hidden.resize(rows, self.n_hidden[rows], none)
        self.seen.resize(rows, self._seen_counts(rows), none)
        for name in ARRAYS:
            getattr(self, name)[rows] = 0
        if self.embedding:
            for row in rows.tolist():
                self.embedding.pop(row, None)

    def _upkeep(self) -> None:
        """Compact the pools whose freed extents add up (rows that grew left them)."""
        for pool, counts in (
            (self.recent, self.n_recent),
            (self.topic, self.n_topics),
            (self.hidden, self.n_hidden),
            (self.seen, None),
        ):
            if pool.wants_compaction():
                rows = np.flatnonzero(pool.off > 0)
                pool.compact(rows, self._seen_counts(rows) if counts is None else counts[rows])

    def _new_row(self, user: str) -> int:
        if self.free:
            row = self.free.pop()
        else:
            if self.next_row == self.capacity:
                self._allocate(max(1024, self.capacity * 2))
            row = self.next_row
            self.next_row += 1
        self.rows[user] = row
        self.users[row] = user
        return row

    def nbytes(self) -> int:
        """Bytes of the per-row arrays and the pools (the parts that grow with users)."""
        return sum(self.layout_bytes().values())

    def layout_bytes(self) -> dict[str, int]:
        """Bytes by part: the dense per-row arrays, and each pool up to its last extent."""
        dense = sum(getattr(self, name).nbytes for name in ARRAYS)
        pools = dict(zip(("recent", "topics", "hidden", "seen"), self._pools(), strict=True))
        return {"rows": dense, **{name: pool.nbytes() for name, pool in pools.items()}}

    # --- mapping ---
    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, user: object) -> bool:
        return user in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.rows))

    def remove(self, user: str) -> bool:
        row = self.rows.pop(user, None)
        if row is None:
            return False
        self._clear(row)
        self.users[row] = None
        self.free.append(row)
        return True

    def position_of(self, user: str) -> int | None:
        row = self.rows.get(user)
        return None if row is None else int(self.position[row])

    def touch(self, users: Iterable[str]) -> None:
        rows = [r for r in map(self.rows.get, users) if r is not None]
        if rows:
            self.clock += 1
            self.used[rows] = self.clock

    def least_recent(self, count: int) -> list[str]:
        """The ``count`` least recently used users, oldest first."""
        live = np.fromiter(self.rows.values(), dtype=np.int64, count=len(self.rows))
        if count <= 0 or not len(live):
            return []
        if count < len(live):
            live = live[np.argpartition(self.used[live], count - 1)[:count]]
        live = live[np.argsort(self.used[live], kind="stable")]
        return [self.users[r] for r in live.tolist()]

    # --- one profile in and out ---
    def get(self, user: str) -> Profile | None:
        row = self.rows.get(user)
        return None if row is None else self._materialize(row)

    def encode(
        self, users: Iterable[str], extras: Mapping[str, dict] | None = None
    ) -> dict[str, bytes]:
        """Stored blobs of the resident ``users`` (columnar records, see
        ``Profile.from_record``), built from the arrays a chunk at a time: a
        checkpoint encodes every dirty profile, so this is its CPU cost. ``extras``
        adds fields to some users' records (a returning user's delete time)."""
        rules, get = self.rules, self.rows.get
        pairs = [(u, r) for u in users if (r := get(u)) is not None]
        if not pairs:
            return {}
        rows = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
        ts, items, codes = self._recent_in_order(rows)
        # Only the used slots, flattened; row i's entries are [start[i], start[i + 1]).
        n_recent, n_topics = self.n_recent[rows], self.n_topics[rows]
        used_r = np.arange(ts.shape[1])[None, :] < n_recent[:, None]
        start_r = np.r_[0, np.cumsum(n_recent)].tolist()
        start_t = np.r_[0, np.cumsum(n_topics)].tolist()
        ts_bytes = ts[used_r].tobytes()
        code_bytes = codes[used_r].astype(np.uint8).tobytes()
        item_array = self.items.as_array()
        item_names = item_array[items[used_r]].tolist()
        topic_at = self.topic.flat(rows, n_topics)
        topic_names = self.topics.as_array()[self.topic["id"][topic_at]].tolist()
        score_bytes = self.topic["score"][topic_at].tobytes()
        n_hidden = self.n_hidden[rows]
        start_h = np.r_[0, np.cumsum(n_hidden)].tolist()
        hidden_at = self.hidden.flat(rows, n_hidden)
        hidden_names = item_array[self.hidden["item"][hidden_at]].tolist()
        hidden_ts = self.hidden["ts"][hidden_at].tolist()
        seen_off, size = self.seen.off[rows], rules.seen_bytes
        seen_rows = np.flatnonzero(seen_off > 0)
        seen_bytes = self.seen["bits"].reshape(-1, max(1, size))[seen_off[seen_rows]].tobytes()
        seen_index = dict(zip(seen_rows.tolist(), range(len(seen_rows)), strict=True))
        scalars = np.empty(len(rows), dtype=STORED_SCALARS)
        applied = self.events[rows] > 0  # first/last seen and t0 mean nothing before that
        scalars["f"] = np.where(applied, self.first_seen[rows], math.inf)
        scalars["l"] = np.where(applied, self.last_seen[rows], -math.inf)
        scalars["t0"] = np.where(applied, self.t0[rows], math.nan)
        scalars["n"], scalars["v"] = self.events[rows], self.version[rows]
        scalars["p"] = self.position[rows]
        scalar_bytes, width = scalars.tobytes(), STORED_SCALARS.itemsize
        count_bytes, count_width = self.counts[rows].tobytes(), 4 * len(rules.actions)
        journal = self.journal[rows].tolist()
        journals, actions = self.journals.names, list(rules.actions)
        embedding, encode = self.embedding, codec.encoder()
        blobs = {}
        for i, (user, row) in enumerate(pairs):
            r0, r1, k0, k1 = start_r[i], start_r[i + 1], start_t[i], start_t[i + 1]
            record = {
                "s": 2,
                "u": user,
                "x": scalar_bytes[i * width : (i + 1) * width],
                "an": actions,
                "c": count_bytes[i * count_width : (i + 1) * count_width],
                "tn": topic_names[k0:k1],
                "tv": score_bytes[k0 * 8 : k1 * 8],
                "rt": ts_bytes[r0 * 8 : r1 * 8],
                "ri": item_names[r0:r1],
                "ra": code_bytes[r0:r1],
                "j": journals[journal[i]] if journal[i] else None,
            }
            h0, h1 = start_h[i], start_h[i + 1]
            if h1 > h0:
                record["h"] = dict(zip(hidden_names[h0:h1], hidden_ts[h0:h1], strict=True))
            if i in seen_index:
                at = seen_index[i] * size
                record["sb"] = seen_bytes[at : at + size]
            if row in embedding:
                vector, weight = embedding[row]
                record["e"], record["ew"] = vector.tolist(), weight
            if extras and user in extras:
                record.update(extras[user])
            blobs[user] = encode(record)
        return blobs

    def _recent_in_order(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The rows' recent bags sorted as the reference keeps them: by (ts, item, action);
        used slots first. Ties on time (rare) are ordered in Python by item name."""
        n_recent = self.n_recent[rows][:, None]
        width = int(n_recent.max(initial=0))  # slots past every row's count hold nothing
        used = np.arange(width)[None, :] < n_recent
        at = self.recent.grid(rows, n_recent[:, 0], width)
        ts = self.recent["ts"][at]
        order = np.argsort(np.where(used, ts, np.inf), axis=1, kind="stable")
        ts = np.take_along_axis(ts, order, axis=1)
        items = np.take_along_axis(self.recent["item"][at], order, axis=1)
        codes = np.take_along_axis(self.recent["code"][at], order, axis=1)
        tied = ((ts[:, 1:] == ts[:, :-1]) & used[:, 1:]).any(axis=1)
        names = self.items.names
        for i in np.flatnonzero(tied).tolist():
            n = int(n_recent[i, 0])
            entries = sorted(
                zip(ts[i, :n].tolist(), items[i, :n].tolist(), codes[i, :n].tolist(), strict=True),
                key=lambda e: (e[0], names[e[1]], e[2]),
            )
            ts[i, :n], items[i, :n], codes[i, :n] = zip(*entries, strict=True)
        return ts, items, codes

    def context_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows' co-engagement contexts as (times, item ids), (len(rows), CONTEXT)
        each, oldest first; empty entries are time 0 and item 0."""
        at = self._context_at(rows)
        return self.recent["ts"][at], self.recent["item"][at]

    def _context_at(self, rows: np.ndarray) -> np.ndarray:
        """Flat positions of the rows' context entries in the recent pool (0: none)."""
        slot = self.context[rows].astype(np.int64)
        base = self.recent.off[rows].astype(np.int64)[:, None] * self.recent.block
        return np.where(slot > 0, base + slot - 1, 0)

    def view(self, user: str) -> ProfileView | None:
        """What a read returns (``Profile.view``), or None if the user is not resident."""
        row = self.rows.get(user)
        return None if row is None else self._materialize(row).view(self.rules)

    def _hidden_of(self, row: int) -> dict[str, float]:
        entries = self.hidden.read(row, int(self.n_hidden[row]))
        names = self.items.names
        return dict(
            zip([names[i] for i in entries["item"].tolist()], entries["ts"].tolist(), strict=True)
        )

    def _materialize(self, row: int) -> Profile:
        rules = self.rules
        profile = Profile(self.users[row], len(rules.actions))
        profile.counts = self.counts[row].tolist()
        profile.events, profile.version = int(self.events[row]), int(self.version[row])
        if profile.events:  # otherwise the Profile defaults (inf, -inf, None) stand
            profile.first_seen = float(self.first_seen[row])
            profile.last_seen = float(self.last_seen[row])
            profile.t0 = float(self.t0[row])
        names = self.topics.names
        topics = self.topic.read(row, int(self.n_topics[row]))
        profile.topics = dict(
            zip(
                [names[i] for i in topics["id"].tolist()],
                topics["score"].tolist(),
                strict=True,
            )
        )
        recent = self.recent.read(row, int(self.n_recent[row]))
        items = self.items.names
        profile.recent = sorted(
            zip(
                recent["ts"].tolist(),
                [items[i] for i in recent["item"].tolist()],
                recent["code"].tolist(),
                strict=True,
            )
        )
        profile.hidden = self._hidden_of(row) if self.n_hidden[row] else None
        if self.seen.off[row]:
            profile.seen = bytearray(self.seen.read(row, rules.seen_bytes)["bits"].tobytes())
        if row in self.embedding:
            vector, weight = self.embedding[row]
            profile.embedding, profile.embedding_weight = vector.copy(), weight
        journal = int(self.journal[row])
        profile.journal = self.journals.names[journal] if journal else None
        profile.position = int(self.position[row])
        return profile

    def put(self, profile: Profile) -> None:
        """Make ``profile`` resident (replacing any row the user had)."""
        row = self.rows.get(profile.user_id)
        if row is None:
            row = self._new_row(profile.user_id)
        self._store(row, profile)
        self.clock += 1
        self.used[row] = self.clock

    def put_records(self, records: Sequence[dict]) -> None:
        """Make stored records resident (replacing any rows the users had), filling
        the arrays for all of them at once: recovery and cold reads load users by the
        thousand. Records in another shape (the list form, other action names, more
        topics, recent actions or hidden items than this table holds) go through ``put``."""
        rules = self.rules
        actions, top_k, recent_n = list(rules.actions), rules.top_k, rules.recent_n
        fast, other = [], []
        for record in records:
            if (
                record.get("s") == 2
                and record["an"] == actions
                and len(record["tn"]) <= top_k
                and len(record["ri"]) <= recent_n
                and len(record.get("h") or ()) <= rules.hidden_n
            ):
                fast.append(record)
            else:
                other.append(record)
        for record in other:
            self.put(Profile.from_record(record, rules))
        if not fast:
            return
        users = [r["u"] for r in fast]
        if len(set(users)) != len(users):  # the last copy of a user wins, as with put
            last = {u: n for n, u in enumerate(users)}
            fast = [r for n, r in enumerate(fast) if last[r["u"]] == n]
            users = [r["u"] for r in fast]
        rows = self._rows_for(users)
        self._clear(rows)
        none = np.zeros(len(rows), dtype=np.int64)
        scalars = np.frombuffer(b"".join(r["x"] for r in fast), dtype=STORED_SCALARS)
        self.events[rows], self.version[rows] = scalars["n"], scalars["v"]
        self.position[rows] = scalars["p"]
        self.first_seen[rows], self.last_seen[rows] = scalars["f"], scalars["l"]
        self.t0[rows] = np.nan_to_num(scalars["t0"], nan=0.0)
        self.counts[rows] = np.frombuffer(b"".join(r["c"] for r in fast), dtype="<i4").reshape(
            len(fast), len(actions)
        )
        self.journal[rows] = [0 if r["j"] is None else self.journals.add(r["j"]) for r in fast]
        # Topics and recent actions: flattened across records, then written to extents.
        n_topics = np.fromiter((len(r["tn"]) for r in fast), dtype=np.int64, count=len(fast))
        if n_topics.sum():
            self.topic.resize(rows, none, n_topics)
            at = self.topic.flat(rows, n_topics)
            self.topic["id"][at] = self.topics.encode([t for r in fast for t in r["tn"]])
            self.topic["score"][at] = np.frombuffer(
                b"".join(r["tv"] for r in fast), dtype=np.float64
            )
        self.n_topics[rows] = n_topics
        n_recent = np.fromiter((len(r["ri"]) for r in fast), dtype=np.int64, count=len(fast))
        if n_recent.sum():
            self.recent.resize(rows, none, n_recent)
            at = self.recent.flat(rows, n_recent)
            row_of, slot = _slots(rows, n_recent)
            ts = np.frombuffer(b"".join(r["rt"] for r in fast), dtype=np.float64)
            items = self.items.encode([i for r in fast for i in r["ri"]])
            codes = np.frombuffer(b"".join(r["ra"] for r in fast), dtype=np.uint8)
            self.recent["ts"][at] = ts
            self.recent["item"][at] = items
            self.recent["code"][at] = codes
            # Stored recent actions are in time order: the row's last CONTEXT engagements
            # are its context (the one with e engagements after it goes to slot -1 - e).
            engaged = self._weights[codes] > 0
            running = np.cumsum(engaged)
            after = np.repeat(running[np.cumsum(n_recent) - 1], n_recent) - running
            tail = engaged & (after < CONTEXT)
            self.context[row_of[tail], CONTEXT - 1 - after[tail]] = slot[tail] + 1
        self.n_recent[rows] = n_recent
        hidden = [(row, r["h"]) for row, r in zip(rows.tolist(), fast, strict=True) if r.get("h")]
        if hidden:
            self._write_hidden(
                np.array([row for row, _ in hidden], dtype=np.int64), [h for _, h in hidden]
            )
        filters = [
            (row, stored)
            for row, r in zip(rows.tolist(), fast, strict=True)
            if (stored := r.get("sb")) and len(stored) == rules.seen_bytes
        ]
        if filters:
            self._write_seen(
                np.array([row for row, _ in filters], dtype=np.int64),
                b"".join(stored for _, stored in filters),
            )
        for row, record in zip(rows.tolist(), fast, strict=True):
            if record.get("e") is not None:
                vector = np.asarray(record["e"], dtype=np.float64)
                self.embedding[row] = (vector, record["ew"])
        self.clock += 1
        self.used[rows] = self.clock
        self._upkeep()

    def _write_hidden(self, rows: np.ndarray, hidden: Sequence[Mapping[str, float]]) -> None:
        """Set distinct ``rows``' hidden items (name -> time, at most hidden_n each)."""
        counts = np.fromiter(map(len, hidden), dtype=np.int64, count=len(hidden))
        self.hidden.resize(rows, self.n_hidden[rows], counts)
        at = self.hidden.flat(rows, counts)
        self.hidden["item"][at] = self.items.encode([name for h in hidden for name in h])
        self.hidden["ts"][at] = [t for h in hidden for t in h.values()]
        self.n_hidden[rows] = counts

    def _write_seen(self, rows: np.ndarray, filters: bytes) -> None:
        """Set distinct ``rows``' filters of earlier items (seen_bytes each, concatenated)."""
        size = self.rules.seen_bytes
        self.seen.resize(rows, self._seen_counts(rows), np.full(len(rows), size))
        blocks = self.seen["bits"].reshape(-1, size)
        blocks[self.seen.off[rows]] = np.frombuffer(filters, dtype=np.uint8).reshape(-1, size)

    def _rows_for(self, users: Sequence[str]) -> np.ndarray:
        """Each user's row, creating rows for users not resident yet."""
        get = self.rows.get
        rows = np.array([get(u, -1) for u in users], dtype=np.int64)
        for n in np.flatnonzero(rows < 0).tolist():
            row = self.rows.get(users[n])
            rows[n] = self._new_row(users[n]) if row is None else row
        return rows

    # --- dirty rows (changed since written to the store) ---
    def take_dirty(self) -> list[str]:
        """The dirty users, now marked clean (a checkpoint is about to write them)."""
        rows = np.flatnonzero(self.dirty)
        self.dirty[rows] = False
        return [self.users[r] for r in rows.tolist()]

    def mark_dirty(self, users: Iterable[str]) -> None:
        rows = [r for r in map(self.rows.get, users) if r is not None]
        self.dirty[rows] = True

    def is_dirty(self, user: str) -> bool:
        row = self.rows.get(user)
        return row is not None and bool(self.dirty[row])

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self.dirty))

    def _store(self, row: int, profile: Profile) -> None:
        """Write ``profile`` over whatever the row held."""
        rules = self.rules
        self._clear(row)
        profile.trim(rules)  # a record written under larger limits fits these ones
        self.counts[row] = profile.counts
        self.events[row], self.version[row] = profile.events, profile.version
        if profile.events:
            self.first_seen[row], self.last_seen[row] = profile.first_seen, profile.last_seen
            self.t0[row] = profile.t0
        one, none = np.array([row]), np.zeros(1, dtype=np.int64)
        n = len(profile.topics)
        self.n_topics[row] = n
        if n:
            self.topic.resize(one, none, np.array([n]))
            at = self.topic.flat(one, np.array([n]))
            self.topic["id"][at] = self.topics.encode(list(profile.topics))
            self.topic["score"][at] = list(profile.topics.values())
        recent = profile.recent
        n = len(recent)
        self.n_recent[row] = n
        if n:
            ts, items, codes = zip(*recent, strict=True)
            self.recent.resize(one, none, np.array([n]))
            at = self.recent.flat(one, np.array([n]))
            self.recent["ts"][at] = ts
            self.recent["item"][at] = self.items.encode(items)
            self.recent["code"][at] = codes
            engaged = [i for i, code in enumerate(codes) if self._weights[code] > 0][-CONTEXT:]
            if engaged:
                self.context[row, CONTEXT - len(engaged) :] = np.array(engaged) + 1
        if profile.hidden:
            self._write_hidden(one, [profile.hidden])
        if profile.seen is not None and len(profile.seen) == rules.seen_bytes:
            self._write_seen(one, bytes(profile.seen))
        if profile.embedding is not None:
            self.embedding[row] = (profile.embedding.copy(), profile.embedding_weight)
        journal = profile.journal
        self.journal[row] = 0 if journal is None else self.journals.add(journal)
        self.position[row] = profile.position

    # --- applying a batch ---
    def apply(
        self,
        events: Sequence[Sequence],
        seq: int,
        journal: str,
        *,
        stats=None,
        embeddings: dict[str, np.ndarray] | None = None,
    ) -> int:
        """Apply validated events (batch order) at journal position ``seq``; users whose
        row is already at or past ``seq`` in this journal are skipped (replay).

        ``stats`` (an ItemStats) observes the applied events with each user's
        recent context before them. Returns the number of events applied; the rows
        they changed are marked dirty."""
        if not events:
            return 0
        users, item_names, actions, ts_list, topic_lists, weight_list = zip(*events, strict=True)
        journal_id = self.journals.add(journal)
        rows = self._rows_for(users)
        past = (self.journal[rows] == journal_id) & (self.position[rows] >= seq)
        if past.any():  # replay of rows some users already hold
            kept = np.flatnonzero(~past)
            if not len(kept):
                return 0
            events = [events[i] for i in kept.tolist()]
            rows = rows[kept]
            users, item_names, actions, ts_list, topic_lists, weight_list = zip(
                *events, strict=True
            )
        n = len(users)
        codes = np.array([self.rules.codes[a] for a in actions], dtype=np.int8)
        ts = np.array(ts_list, dtype=np.float64)
        weights = np.array(weight_list, dtype=np.float64)
        items = self.items.encode(item_names)

        # Per row: its events grouped (stable, so arrival order inside a group).
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        batch_rows = sorted_rows[starts]
        per_row = np.diff(np.r_[starts, n])
        group = np.empty(n, dtype=np.int64)  # event -> index into batch_rows
        group[order] = np.repeat(np.arange(len(batch_rows)), per_row)
        rank = np.empty(n, dtype=np.int64)  # event -> its place among its row's events
        rank[order] = np.arange(n) - np.repeat(starts, per_row)

        # A new row's reference time is its first event's (as in the reference model).
        t0 = self.t0[batch_rows]
        fresh = self.events[batch_rows] == 0
        t0[fresh] = ts[order[starts[fresh]]]
        exponent = self.rules.rate * (ts - t0[group])
        slow = np.zeros(len(batch_rows), dtype=bool)
        slow[group[exponent > REBASE_EXPONENT]] = True

        # Topics: (event, topic) pairs; a pair's topic either has a slot in the row or
        # takes the next free one. More distinct topics than slots -> reference path.
        lengths = np.fromiter(map(len, topic_lists), dtype=np.int64, count=n)
        pair_event = np.repeat(np.arange(n), lengths)
        pair_topic = self.topics.encode([t for ts_topics in topic_lists for t in ts_topics])
        pair_row = rows[pair_event]
        pair_slot = np.full(len(pair_event), -1, dtype=np.int64)
        if len(pair_event):
            # Each batch row's topic slots, read once (0 past its count: no topic).
            n_topics = self.n_topics[batch_rows]
            width = int(n_topics.max(initial=0))
            held = self.topic["id"][self.topic.grid(batch_rows, n_topics, width)]
            match = held[group[pair_event]] == pair_topic[:, None]
            found = match.any(axis=1)
            if found.any():
                pair_slot[found] = match[found].argmax(axis=1)
            missing = np.flatnonzero(~found)
            if len(missing):
                keys = (pair_row[missing] << 32) | pair_topic[missing].astype(np.int64)
                new_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
                new_rows = new_keys >> 32
                new_starts = np.flatnonzero(np.r_[True, new_rows[1:] != new_rows[:-1]])
                new_counts = np.diff(np.r_[new_starts, len(new_keys)])
                offset = np.arange(len(new_keys)) - np.repeat(new_starts, new_counts)
                new_slot = self.n_topics[new_rows].astype(np.int64) + offset
                pair_slot[missing] = new_slot[inverse.ravel()]
                over = new_slot >= self.rules.top_k
                if over.any():
                    slow[group[pair_event[missing[first[over]]]]] = True

        # Recent actions: rows with room take the next slots; full rows replace their
        # oldest entry, one round per event of the row (rank), on a copy of their times.
        recent_slot = self.n_recent[rows].astype(np.int64) + rank
        full = recent_slot >= self.rules.recent_n
        writes: list[tuple[np.ndarray, np.ndarray]] = []  # (event ids, slots) in order
        if full.any():
            tied, writes = self._replace_oldest(rows, ts, rank, group, full, len(batch_rows))
            slow |= tied

        fast_group = ~slow
        fast = fast_group[group]  # per event: its row takes the fast path
        if stats is not None:
            self._observe(stats, rows, items, codes, ts, fast)
        # Slow rows read their pre-batch state, then go the reference way.
        for row, row_events in _group_rows(rows, np.flatnonzero(~fast), events):
            profile = self._materialize(row)
            if stats is not None:
                stats.observe(row_events, profile.recent)
            apply_events(profile, row_events, self.rules, embeddings=embeddings)
            profile.journal, profile.position = journal, seq
            self._store(row, profile)

        # The fast path: every remaining event at once.
        if slow.any():
            keep = np.flatnonzero(fast)
            renumber = np.cumsum(fast) - 1  # event index -> index among the kept events
            pair_keep = np.flatnonzero(fast[pair_event])
            writes = [(renumber[e[fast[e]]], s[fast[e]]) for e, s in writes]
            pair_event = renumber[pair_event]
        else:
            keep = pair_keep = slice(None)
        rows_done = batch_rows[fast_group]
        if len(rows_done):
            self._apply_fast(
                rows_done, t0[fast_group], journal_id, seq,
                rows[keep], codes[keep], ts[keep], weights[keep], items[keep], exponent[keep],
                pair_event[pair_keep], pair_row[pair_keep], pair_slot[pair_keep],
                pair_topic[pair_keep], recent_slot[keep], full[keep], (per_row == 1)[group][keep],
                writes, embeddings, fresh[fast_group],
            )  # fmt: skip
        self.clock += 1
        self.used[batch_rows] = self.clock
        self.dirty[batch_rows] = True
        self._upkeep()
        return n

    def _apply_fast(
        self, rows_done, t0_rows, journal_id, seq, rows, codes, ts, weights, items, exponent,
        pair_event, pair_row, pair_slot, pair_topic, recent_slot, full, alone, writes,
        embeddings, fresh,
    ) -> None:  # fmt: skip
        self.t0[rows_done] = t0_rows
        new = rows_done[fresh]  # their first/last seen start from the batch's events
        self.first_seen[new], self.last_seen[new] = math.inf, -math.inf
        np.add.at(self.counts, (rows, codes), 1)
        np.minimum.at(self.first_seen, rows, ts)
        np.maximum.at(self.last_seen, rows, ts)
        np.add.at(self.events, rows, 1)
        self.version[rows_done] += 1
        self.journal[rows_done] = journal_id
        self.position[rows_done] = seq
        where = np.searchsorted(rows_done, rows)  # event -> its row's index in rows_done
        # Same operations in the same order as the reference: bit-for-bit equal scores.
        contribution = self._weights[codes] * weights * np.exp(np.maximum(exponent, EXP_FLOOR))
        if len(pair_event):
            before = self.n_topics[rows_done].astype(np.int64)
            after = before.copy()
            np.maximum.at(after, where[pair_event], pair_slot + 1)
            self.topic.resize(rows_done, before, after)  # room for the new slots
            at = self.topic.at(pair_row, pair_slot)
            self.topic["id"][at] = pair_topic
            np.add.at(self.topic["score"], at, contribution[pair_event])
            self.n_topics[rows_done] = after
        # The contexts before the batch, read before their bag slots are overwritten.
        context_slot = self.context[rows_done]
        context_ts = self.recent["ts"][self._context_at(rows_done)]
        room = ~full
        before = self.n_recent[rows_done].astype(np.int64)
        after = before.copy()
        np.maximum.at(after, where[room], recent_slot[room] + 1)
        self.recent.resize(rows_done, before, after)
        self.n_recent[rows_done] = after
        at = self.recent.at(rows[room], recent_slot[room])
        self.recent["ts"][at] = ts[room]
        self.recent["item"][at] = items[room]
        self.recent["code"][at] = codes[room]
        # Each event's bag slot + 1 (0: it never entered a full bag).
        slot_of = np.where(room, recent_slot + 1, 0)
        # What leaves full bags goes into their rows' filters of earlier items: the
        # entries each round overwrites, and events older than every entry (never in).
        left: list[tuple[np.ndarray, np.ndarray]] = []
        if self.rules.seen_bytes and full.any():
            written = np.concatenate([e for e, _ in writes]) if writes else np.zeros(0, int)
            never = np.setdiff1d(np.flatnonzero(full), written)
            left.append((rows[never], items[never]))
        for event_ids, slot in writes:  # in round order: later rounds overwrite
            target = rows[event_ids]
            at = self.recent.at(target, slot)
            if self.rules.seen_bytes:
                left.append((target, self.recent["item"][at]))
            self.recent["ts"][at] = ts[event_ids]
            self.recent["item"][at] = items[event_ids]
            self.recent["code"][at] = codes[event_ids]
            slot_of[event_ids] = slot + 1
        if left:
            self._remember_earlier(
                np.concatenate([r for r, _ in left]), np.concatenate([i for _, i in left])
            )
        engaged = self._weights[codes] > 0  # a hide is never paired with anything
        self._update_context(
            context_ts, context_slot, where[engaged], ts[engaged], slot_of[engaged], alone[engaged]
        )
        self._forget_context_past_the_bag(rows_done, context_ts, context_slot)
        self.context[rows_done] = context_slot
        hides = np.flatnonzero(codes == self._hide)
        if len(hides):
            self._hide_items(rows[hides], items[hides], ts[hides])
        if embeddings:
            self._add_embeddings(rows, items, contribution, embeddings)

    def _replace_oldest(self, rows, ts, rank, group, full, groups) -> tuple[np.ndarray, list]:
        """Place events of rows whose recent bag is full: each replaces the row's oldest
        entry if it is newer. Returns the groups to send the reference way (ties on
        time where the tuple order of the reference would have to decide) and the
        (event ids, slots) to write, one pair per round, in order."""
        slow, writes = np.zeros(groups, dtype=bool), []
        full_events = np.flatnonzero(full)
        full_rows = np.unique(rows[full_events])
        n = self.rules.recent_n
        local = self.recent["ts"][self.recent.grid(full_rows, self.n_recent[full_rows], n)]
        where = np.searchsorted(full_rows, rows)
        # Events that still fit before the bag filled count as entries already there.
        room = np.flatnonzero(~full & np.isin(rows, full_rows))
        local[where[room], (self.n_recent[rows[room]] + rank[room]).astype(np.int64)] = ts[room]
        for r in np.unique(rank[full_events]).tolist():
            these = full_events[rank[full_events] == r]
            at = where[these]
            bag = local[at]
            slot = bag.argmin(axis=1)
            oldest = bag[np.arange(len(at)), slot]
            # Only ties at the edge need the reference's (ts, item, action) order: a
            # new entry as old as the oldest, or several oldest entries to pick from.
            new_ts = ts[these]
            tie = (new_ts == oldest) | (
                (new_ts > oldest) & ((bag == oldest[:, None]).sum(axis=1) > 1)
            )
            slow[group[these[tie]]] = True
            newer = ts[these] > oldest
            local[at[newer], slot[newer]] = ts[these[newer]]
            writes.append((these[newer], slot[newer]))
        return slow, writes

    @staticmethod
    def _update_context(context_ts, context_slot, where, ts, slots, single) -> None:
        """Keep each row's last CONTEXT engagements by time (oldest first), in the
        rows' (time, bag slot + 1) arrays; ``where`` gives each engagement's row there,
        ``single`` marks engagements that are their row's only event in the batch."""
        one = np.flatnonzero(single)
        if len(one):  # most rows get one event per batch: insert it without sorting
            target, new_ts, new_slots = where[one], ts[one], slots[one]
            old_ts, old_slots = context_ts[target], context_slot[target]
            # k entries are older than the new one; it goes after them, the oldest drops.
            k = ((old_ts < new_ts[:, None]) | (old_slots == 0)).sum(axis=1)[:, None]
            slot = np.arange(CONTEXT)[None, :]
            shifted_ts = np.concatenate([old_ts[:, 1:], old_ts[:, -1:]], axis=1)
            shifted_slots = np.concatenate([old_slots[:, 1:], old_slots[:, -1:]], axis=1)
            context_ts[target] = np.where(
                slot < k - 1, shifted_ts, np.where(slot == k - 1, new_ts[:, None], old_ts)
            )
            context_slot[target] = np.where(
                slot < k - 1, shifted_slots, np.where(slot == k - 1, new_slots[:, None], old_slots)
            )
        many = np.flatnonzero(~single)
        if not len(many):
            return
        where, ts, slots = where[many], ts[many], slots[many]
        touched = np.unique(where)
        place = np.searchsorted(touched, where)
        all_rows = np.concatenate([np.repeat(np.arange(len(touched)), CONTEXT), place])
        all_ts = np.concatenate([context_ts[touched].ravel(), ts])
        all_slots = np.concatenate([context_slot[touched].ravel(), slots])
        order = np.lexsort((all_ts, all_rows))
        all_ts, all_slots = all_ts[order], all_slots[order]
        ends = np.r_[np.flatnonzero(np.diff(all_rows[order])), len(order) - 1]
        for k in range(CONTEXT):  # every row has >= CONTEXT entries (the padded context)
            context_ts[touched, k] = all_ts[ends - (CONTEXT - 1 - k)]
            context_slot[touched, k] = all_slots[ends - (CONTEXT - 1 - k)]

    def _forget_context_past_the_bag(self, rows, context_ts, context_slot) -> None:
        """The context is the last engagements *in the recent bag* (what a profile read
        back from the store has): entries older than a full bag's oldest are dropped
        (entries the batch wrote and then replaced among them). They are the context's
        first slots, since it is sorted by time."""
        n = self.rules.recent_n
        full = np.flatnonzero(self.n_recent[rows] >= n)
        if not len(full):
            return
        oldest = self.recent["ts"][self.recent.grid(rows[full], np.full(len(full), n), n)]
        gone = context_ts[full] < oldest.min(axis=1)[:, None]
        if gone.any():
            context_ts[full] = np.where(gone, 0.0, context_ts[full])
            context_slot[full] = np.where(gone, 0, context_slot[full])

    def _observe(self, stats, rows, items, codes, ts, fast) -> None:
        """Item signals for the fast rows' events, each with its row's pre-batch context."""
        weights = stats.code_weights(self.rules)[codes]
        chosen = np.flatnonzero((weights > 0) & fast)
        if not len(chosen):
            return
        touched = np.unique(rows[chosen])
        context_ts, context_items = self.context_of(touched)
        stats.observe_columns(
            np.searchsorted(touched, rows[chosen]),
            items[chosen],
            ts[chosen],
            weights[chosen],
            context_ts,
            context_items,
            self.items.names,
        )

    def _remember_earlier(self, rows: np.ndarray, items: np.ndarray) -> None:
        """Set the filter bits of ``items`` (vocabulary ids) in their ``rows``' filters
        of earlier items (Profile.remember_earlier), creating filters as needed."""
        if not len(rows):
            return
        known = len(self._seen_bits)
        if known < len(self.items.names):  # bit positions of items new to the vocabulary
            bits, names = self.rules.seen_bytes * 8, self.items.names
            fresh = [seen_positions(names[i], bits) for i in range(known, len(names))]
            self._seen_bits = np.concatenate(
                [self._seen_bits, np.asarray(fresh, dtype=np.int64).reshape(-1, SEEN_HASHES)]
            )
        size = self.rules.seen_bytes
        touched = np.unique(rows)
        new = touched[self.seen.off[touched] == 0]
        if len(new):
            self.seen.resize(new, np.zeros(len(new), dtype=np.int64), np.full(len(new), size))
        positions = self._seen_bits[items]  # (n, SEEN_HASHES)
        at = self.seen.off[rows].astype(np.int64)[:, None] * size + (positions >> 3)
        bit = (1 << (positions & 7)).astype(np.uint8)
        np.bitwise_or.at(self.seen["bits"], at.ravel(), bit.ravel())

    def _hide_items(self, rows, items, ts) -> None:
        names, limit = self.items.names, self.rules.hidden_n
        touched = np.unique(rows)
        n_hidden = self.n_hidden[touched]
        at = self.hidden.flat(touched, n_hidden)
        held_names = [names[i] for i in self.hidden["item"][at].tolist()]
        held_ts = self.hidden["ts"][at].tolist()
        changed, start = {}, 0
        for row, n in zip(touched.tolist(), n_hidden.tolist(), strict=True):
            end = start + n
            changed[row] = dict(zip(held_names[start:end], held_ts[start:end], strict=True))
            start = end
        for row, item, at in zip(rows.tolist(), items.tolist(), ts.tolist(), strict=True):
            hidden = changed[row]
            name = names[item]
            hidden[name] = max(at, hidden.get(name, at))
        for row, hidden in changed.items():  # trimmed once, after the batch (as the reference)
            if len(hidden) > limit:
                newest = sorted(hidden.items(), key=lambda kv: (-kv[1], kv[0]))
                changed[row] = dict(newest[:limit])
        self._write_hidden(touched, list(changed.values()))

    def _add_embeddings(self, rows, items, contribution, vectors) -> None:
        names = self.items.names
        for row, item, amount in zip(
            rows.tolist(), items.tolist(), contribution.tolist(), strict=True
        ):
            vector = vectors.get(names[item])
            if vector is None or amount <= 0:
                continue
            current = self.embedding.get(row)
            if current is None:
                current = (np.zeros(len(vector), dtype=np.float64), 0.0)
            if len(vector) == len(current[0]):
                current[0][...] += amount * vector
                self.embedding[row] = (current[0], current[1] + amount)


def _slots(rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, slot) for each of counts[i] entries of rows[i], in order."""
    at = np.repeat(rows, counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return at, np.arange(len(at)) - starts


def _group_rows(rows: np.ndarray, event_ids: np.ndarray, events: Sequence) -> list[tuple]:
    """(row, its events in batch order) for the given event indexes."""
    grouped: dict[int, list] = {}
    for e in event_ids.tolist():
        grouped.setdefault(int(rows[e]), []).append(tuple(events[e]))
    return list(grouped.items())
