"""The profile model and its update rules: pure Python, no Ray, bounded whatever the input.

Interest scores use forward decay: a topic's stored score is
``sum(w_i * exp(rate * (t_i - t0)))`` for a per-profile reference time ``t0``, so
an event is one addition and nothing decays on every tick; the score at time T is
the stored score times ``exp(-rate * (T - t0))``. Decay runs on event time, so a
replayed log gives the same profile as live ingestion. Stored scores keep their
order for any history length: when an event lies far past ``t0`` the profile is
rebased (every score scaled once, ``t0`` moved forward), so exponents stay small
and nothing a ranking depends on overflows or underflows.
"""

from __future__ import annotations

import math
import sys
import zlib
from bisect import insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter

import numpy as np

from persona.settings import Settings

# The scalars of a stored (columnar) record, packed little-endian in its "x" field:
# first/last seen, t0 (NaN for none), events, version, journal position.
STORED_SCALARS = np.dtype(
    [("f", "<f8"), ("l", "<f8"), ("t0", "<f8"), ("n", "<i8"), ("v", "<i8"), ("p", "<i8")]
)
# Forward decay's two limits, shared by this reference, the shards' column-wise fast
# path (actors/profile_table.py) and the item signals (actors/item_stats.py), which must
# all compute the same numbers:
# Rebase when rate*(t - t0) exceeds this: e^200 ~ 7e86 stays far from float overflow
# (e^709), and scores older than e^-200 relative to new ones are truly negligible.
REBASE_EXPONENT = 200.0
# The exponent floor of every exp(): exp(-745) is the smallest (subnormal) double, so
# anything lower is 0 anyway; the floor keeps the reference and numpy bit-for-bit equal.
EXP_FLOOR = -745.0
# Bit positions an item sets in a profile's filter of earlier items (a Bloom filter).
SEEN_HASHES = 3


def seen_positions(item: str, bits: int) -> list[int]:
    """The SEEN_HASHES bit positions of ``item`` in a filter of ``bits`` bits (double
    hashing of two CRC32s: the same in every process, unlike ``hash``)."""
    data = item.encode()
    first = zlib.crc32(data)
    step = zlib.crc32(data, 0x5BD1E995) | 1
    return [(first + n * step) % bits for n in range(SEEN_HASHES)]


def filter_has(earlier: bytes, item: str) -> bool:
    """Whether ``item`` is in a filter of earlier items (false positives: rarely)."""
    return all(earlier[b >> 3] >> (b & 7) & 1 for b in seen_positions(item, len(earlier) * 8))


HIDE = "hide"


@dataclass(frozen=True)
class ProfileRules:
    """The update rules' parameters, all from settings."""

    half_life_s: float
    top_k: int
    recent_n: int
    hidden_n: int
    actions: tuple[str, ...]
    weights: tuple[float, ...]
    seen_bytes: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ProfileRules:
        actions = tuple(settings.action_weights)
        return cls(
            half_life_s=settings.half_life_seconds,
            top_k=settings.top_k_topics,
            recent_n=settings.recent_actions,
            hidden_n=settings.hidden_items,
            actions=actions,
            weights=tuple(float(settings.action_weights[a]) for a in actions),
            seen_bytes=settings.seen_filter_bytes,
        )

    def __post_init__(self) -> None:
        # Derived once: apply_events runs per user per batch and must not rebuild these.
        object.__setattr__(self, "rate", math.log(2.0) / self.half_life_s)
        object.__setattr__(self, "codes", {a: i for i, a in enumerate(self.actions)})

    def code(self, action: str) -> int:
        return self.codes[action]


@dataclass(frozen=True, slots=True)
class ProfileView:
    """One user's profile as it is read: what shards return for reads and what the API
    views, ranking, export and jobs read, by field name. Built in one place,
    ``Profile.view``; the stored record's compact keys stay in the store.

    Plain values only (str, numbers, tuples, a dict, a frozenset), so it pickles across
    Ray about as cheaply as the dict it replaces (``__reduce__`` below)."""

    user_id: str
    version: int  # applied batches
    events: int
    counters: dict[str, int]  # events per action name, non-zero ones, in config order
    first_seen: float | None  # event time; None before any event
    last_seen: float | None
    t0: float | None  # the forward-decay reference time of the topic scores
    topics: tuple[tuple[str, float], ...]  # (topic, stored score), best first, ties by name
    recent: tuple[tuple[float, str, str], ...]  # (ts, item_id, action), newest first
    hidden: frozenset[str]  # item ids the user hid
    interest_vector: tuple[float, ...] | None  # decayed mean of engaged items' embeddings
    # The items that left ``recent`` (a Bloom filter; None when none has): what a user
    # met before their recent actions, so it is not recommended again (``saw_earlier``).
    earlier: bytes | None = None

    def __reduce__(self):
        # The fields as one tuple and the class's own __init__: unpickling a slotted,
        # frozen dataclass otherwise runs dataclasses' Python __setstate__ per object.
        return ProfileView, _VIEW_FIELDS(self)

    def saw_earlier(self, item: str) -> bool:
        """Whether the user met ``item`` before their recent actions (a false positive
        at most a few times in a hundred for a full filter)."""
        return self.earlier is not None and filter_has(self.earlier, item)

    def decay_factor(self, rate: float, at: float) -> float:
        """exp(-rate*(at - t0)): stored scores times this are the scores at ``at``."""
        if self.t0 is None:
            return 0.0
        return math.exp(max(EXP_FLOOR, -rate * (at - self.t0)))

    def interests_at(self, rules: ProfileRules, at: float) -> list[tuple[str, float]]:
        """Topics decayed to ``at``, in the stored scores' order."""
        factor = self.decay_factor(rules.rate, at)
        return [(topic, score * factor) for topic, score in self.topics]


_VIEW_FIELDS = attrgetter(*ProfileView.__slots__)


class Profile:
    """One user's bounded state. Mutated only through apply_events (and rebase)."""

    __slots__ = (
        "user_id",
        "counts",
        "first_seen",
        "last_seen",
        "events",
        "version",
        "t0",
        "topics",
        "recent",
        "hidden",
        "seen",
        "embedding",
        "embedding_weight",
        "journal",
        "position",
    )

    def __init__(self, user_id: str, n_actions: int):
        self.user_id = user_id
        self.counts = [0] * n_actions
        self.first_seen = math.inf
        self.last_seen = -math.inf
        self.events = 0
        self.version = 0
        self.t0: float | None = None
        self.topics: dict[str, float] = {}
        # (ts, item_id, action code), ascending; the real-time sequence.
        self.recent: list[tuple[float, str, int]] = []
        self.hidden: dict[str, float] | None = None
        # Items that left ``recent`` when it was trimmed: a Bloom filter of
        # rules.seen_bytes, created with the first of them.
        self.seen: bytearray | None = None
        self.embedding: np.ndarray | None = None
        self.embedding_weight = 0.0
        # Last journal position applied: replay skips rows at or below it.
        self.journal: str | None = None
        self.position = 0

    # --- reading ---
    def decay_factor(self, rate: float, at: float) -> float:
        """exp(-rate*(at - t0)) in a form that underflows only for display, never for order."""
        if self.t0 is None:
            return 0.0
        return math.exp(max(EXP_FLOOR, -rate * (at - self.t0)))

    def ranked_topics(self) -> list[tuple[str, float]]:
        """Topics by stored score, best first; ties by name, so the order is deterministic."""
        # Every profile read ranks its topics, so no Python key function: sort by score,
        # and only when two scores are equal (rare for sums of decayed weights) sort by
        # name first (a reverse sort is stable, so ties keep that order).
        ranked = sorted(self.topics.items(), key=itemgetter(1), reverse=True)
        if len(set(self.topics.values())) < len(ranked):
            ranked.sort(key=itemgetter(0))
            ranked.sort(key=itemgetter(1), reverse=True)
        return ranked

    def interests_at(self, rules: ProfileRules, at: float) -> list[tuple[str, float]]:
        factor = self.decay_factor(rules.rate, at)
        return [(topic, score * factor) for topic, score in self.ranked_topics()]

    def interest_vector(self) -> np.ndarray | None:
        if self.embedding is None or self.embedding_weight <= 0:
            return None
        return self.embedding / self.embedding_weight

    def is_hidden(self, item_id: str) -> bool:
        return bool(self.hidden) and item_id in self.hidden

    # --- updating ---
    def rebase(self, rate: float, new_t0: float) -> None:
        scale = math.exp(-rate * (new_t0 - self.t0))
        self.topics = {t: s * scale for t, s in self.topics.items()}
        if self.embedding is not None:
            self.embedding *= scale
            self.embedding_weight *= scale
        self.t0 = new_t0

    def trim(self, rules: ProfileRules) -> None:
        if len(self.topics) > rules.top_k:
            self.topics = dict(self.ranked_topics()[: rules.top_k])
        if len(self.recent) > rules.recent_n:
            if rules.seen_bytes:
                self.remember_earlier(
                    (item for _, item, _ in self.recent[: -rules.recent_n]), rules
                )
            del self.recent[: -rules.recent_n]
        if self.hidden and len(self.hidden) > rules.hidden_n:
            newest = sorted(self.hidden.items(), key=lambda kv: (-kv[1], kv[0]))
            self.hidden = dict(newest[: rules.hidden_n])

    def remember_earlier(self, items: Iterable[str], rules: ProfileRules) -> None:
        """Add items leaving ``recent`` to the filter of earlier items."""
        if self.seen is None:
            self.seen = bytearray(rules.seen_bytes)
        seen, bits = self.seen, rules.seen_bytes * 8
        for item in items:
            for b in seen_positions(item, bits):
                seen[b >> 3] |= 1 << (b & 7)

    def view(self, rules: ProfileRules) -> ProfileView:
        """The read-only view readers get (the only place one is built)."""
        actions = rules.actions
        vector = self.interest_vector()
        return ProfileView(
            self.user_id,
            self.version,
            self.events,
            {a: n for a, n in zip(actions, self.counts, strict=True) if n},
            self.first_seen if math.isfinite(self.first_seen) else None,
            self.last_seen if math.isfinite(self.last_seen) else None,
            self.t0,
            tuple(self.ranked_topics()),
            tuple([(ts, item, actions[code]) for ts, item, code in reversed(self.recent)]),
            frozenset(self.hidden or ()),
            None if vector is None else tuple(vector.tolist()),
            None if self.seen is None else bytes(self.seen),
        )

    # --- persistence ---
    def to_record(self, rules: ProfileRules) -> dict:
        return {
            "u": self.user_id,
            "c": {a: n for a, n in zip(rules.actions, self.counts, strict=True) if n},
            "f": self.first_seen,
            "l": self.last_seen,
            "n": self.events,
            "v": self.version,
            "t0": self.t0,
            "t": self.topics,
            "r": [[ts, item, rules.actions[code]] for ts, item, code in self.recent],
            "h": self.hidden,
            "sb": None if self.seen is None else bytes(self.seen),
            "e": self.embedding.tolist() if self.embedding is not None else None,
            "ew": self.embedding_weight,
            "j": self.journal,
            "p": self.position,
        }

    @classmethod
    def from_record(cls, record: dict, rules: ProfileRules) -> Profile:
        """A profile from its record: the columnar form shards store (``"s": 2``,
        ProfileTable.encode), or the list form ``to_record`` writes."""
        profile = cls(record["u"], len(rules.actions))
        counts = record["c"]
        if isinstance(counts, bytes):  # per code, in the action order it was written in
            written = np.frombuffer(counts, dtype="<i4").tolist()
            counts = dict(zip(record["an"], written, strict=True))
        for action, count in counts.items():
            if count and action in rules.actions:  # an action removed from config: dropped
                profile.counts[rules.code(action)] = count
        if "x" in record:
            x = np.frombuffer(record["x"], dtype=STORED_SCALARS)[0].item()
            first, last, t0, events, version, position = x
            record = {**record, "f": first, "l": last, "n": events, "v": version, "p": position}
            record["t0"] = None if math.isnan(t0) else t0
        profile.first_seen, profile.last_seen = record["f"], record["l"]
        profile.events, profile.version, profile.t0 = record["n"], record["v"], record["t0"]
        if "tn" in record:
            scores = np.frombuffer(record["tv"], dtype=np.float64).tolist()
            profile.topics = dict(zip(record["tn"], scores, strict=True))
            written = record["an"]
            recent = zip(
                np.frombuffer(record["rt"], dtype=np.float64).tolist(),
                record["ri"],
                (written[code] for code in record["ra"]),
                strict=True,
            )
        else:
            profile.topics = dict(record["t"])
            recent = record["r"]
        codes = rules.codes
        profile.recent = [
            (ts, sys.intern(item), codes[action]) for ts, item, action in recent if action in codes
        ]
        profile.hidden = dict(record["h"]) if record.get("h") else None
        profile.seen = _seen_filter(record.get("sb"), rules)
        if record.get("e") is not None:
            profile.embedding = np.asarray(record["e"], dtype=np.float64)
            profile.embedding_weight = record["ew"]
        profile.journal, profile.position = record["j"], record["p"]
        return profile


def _seen_filter(stored: bytes | None, rules: ProfileRules) -> bytearray | None:
    """A stored filter of earlier items, if it has this configuration's size (a filter
    of another size cannot be read; it is dropped, and old items may come back)."""
    if not stored or len(stored) != rules.seen_bytes:
        return None
    return bytearray(stored)


def apply_events(
    profile: Profile,
    events: Iterable[Sequence],
    rules: ProfileRules,
    *,
    embeddings: dict[str, np.ndarray] | None = None,
) -> None:
    """Apply events (user, item, action, ts, topics, weight) of one user, then trim.

    Late events are applied at their own time. Events with equal timestamps give
    the same profile in any order (sums are commutative; recent actions are
    ordered by (ts, item, action); trimming happens once, after the batch)."""
    # Hot loop: attributes are read into locals once and written back at the end.
    rate, codes, weights = rules.rate, rules.codes, rules.weights
    hide = codes.get(HIDE)
    counts, recent, topics = profile.counts, profile.recent, profile.topics
    first_seen, last_seen, t0 = profile.first_seen, profile.last_seen, profile.t0
    exp = math.exp
    applied = 0
    for _user, item, action, ts, event_topics, weight in events:
        code = codes[action]
        counts[code] += 1
        applied += 1
        if ts < first_seen:
            first_seen = ts
        if ts > last_seen:
            last_seen = ts
        if t0 is None:
            t0 = profile.t0 = ts
        exponent = rate * (ts - t0)
        if exponent > REBASE_EXPONENT:
            profile.rebase(rate, ts)
            topics, t0, exponent = profile.topics, ts, 0.0
        contribution = weights[code] * weight * exp(exponent if exponent > EXP_FLOOR else EXP_FLOOR)
        for topic in event_topics:
            topics[topic] = topics.get(topic, 0.0) + contribution
        entry = (ts, item, code)
        if not recent or entry >= recent[-1]:
            recent.append(entry)
        else:
            insort(recent, entry)
        if code == hide:
            if profile.hidden is None:
                profile.hidden = {}
            profile.hidden[item] = max(ts, profile.hidden.get(item, ts))
        if embeddings and contribution > 0:
            _add_embedding(profile, embeddings.get(item), contribution)
    if applied:
        profile.first_seen, profile.last_seen = first_seen, last_seen
        profile.events += applied
        profile.version += 1
        if (
            len(topics) > rules.top_k
            or len(recent) > rules.recent_n
            or (profile.hidden and len(profile.hidden) > rules.hidden_n)
        ):
            profile.trim(rules)


def _add_embedding(profile: Profile, vector: np.ndarray | None, contribution: float) -> None:
    if vector is None:
        return
    if profile.embedding is None:
        profile.embedding = np.zeros(len(vector), dtype=np.float64)
    if len(vector) == len(profile.embedding):
        profile.embedding += contribution * vector
        profile.embedding_weight += contribution
