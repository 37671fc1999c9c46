"""A shard's in-memory state and its journal/checkpoint protocol, without Ray.

ProfileShard (actors/shard.py) wraps this in an async Ray actor and decides which
steps run in a thread (store I/O) and which on the event loop (memory). Kept
separate so the protocol reads top to bottom in one place:

1. apply:      dedupe (batch id, partition) -> validate -> ownership fence -> load
               missing users -> append journal row (write-ahead) -> apply -> ack.
2. checkpoint: take the dirty set and the last journal position -> write dirty
               profiles -> record the position (with remembered batch ids) -> trim.
3. recover:    read the checkpoint -> replay later journal rows, loading users
               lazily and skipping rows a profile already contains.
4. hand-over:  release (stop writes, checkpoint, forget the users) on the old
               owner; the store's epoch advances; acquire on the new owner, which
               takes over the partition's remembered batch ids.
5. passivate:  beyond the resident cap, the least recently used profiles are
               written (if dirty) and dropped; they load again on demand.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.catalog import decode_item, item_vector
from actors.events import EventValidator, ValidEvent
from actors.item_stats import ItemStats
from actors.profile import Profile, ProfileRules, apply_events
from actors.routing import partition_of
from persona.errors import CorruptRecord, JournalConflict, StaleEpoch
from persona.settings import Settings
from storage import Checkpoint, Store, codec

log = logging.getLogger(__name__)

# Item vectors cached per shard for the interest embedding; bounded, cleared when full.
ITEM_CACHE_LIMIT = 200_000


@dataclass
class Ack:
    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    errors: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "applied": self.applied,
            "duplicate": self.duplicate,
            "rejected": self.rejected,
            "errors": self.errors,
        }


@dataclass
class PreparedBatch:
    """A batch ready to be journaled: new events grouped by user, and its row blob."""

    batch_id: str
    seq: int
    by_user: dict[str, list[ValidEvent]]
    partitions: list[int]
    blob: bytes
    fence: dict[int, int]
    ack: Ack


class ShardState:
    def __init__(self, name: str, store: Store, settings: Settings, partitions: int):
        self.name = name
        self.store = store
        self.settings = settings
        self.partitions = partitions
        self.rules = ProfileRules.from_settings(settings)
        self.validator = EventValidator(self.rules.actions, settings.max_future_seconds)
        # Least recently used first: the order passivation evicts in.
        self.profiles: OrderedDict[str, Profile] = OrderedDict()
        self.dirty: set[str] = set()
        # Per partition, so that a partition's memory of applied batches moves with it.
        self.batch_ids: dict[int, OrderedDict[str, None]] = {}
        self.owned: dict[int, int] = {}
        self.last_seq = 0  # last journal position written (and applied)
        self.checkpoint_seq = 0
        self.item_vectors: dict[str, np.ndarray | None] = {}
        self.item_stats = ItemStats(settings, settings.action_weights)
        self.totals = {
            "applied": 0,
            "duplicate": 0,
            "rejected": 0,
            "loaded": 0,
            "evicted": 0,
            "load_misses": 0,
        }
        self.last_checkpoint_at = time.monotonic()

    def partition(self, user_id: str) -> int:
        return partition_of(user_id, self.partitions)

    # --- ownership ---
    def refresh_ownership(self) -> dict[int, int]:
        self.owned = {
            p: a.epoch for p, a in self.store.get_assignments().items() if a.owner == self.name
        }
        return self.owned

    def stop_owning(self, partitions: Iterable[int]) -> dict[int, int]:
        """Refuse further writes to partitions; return the epochs they were held at."""
        return {p: self.owned.pop(p) for p in partitions if p in self.owned}

    def forget_partitions(self, partitions: Iterable[int]) -> int:
        """Drop the users of partitions (after a checkpoint wrote them)."""
        partitions = set(partitions)
        gone = [u for u in self.profiles if self.partition(u) in partitions]
        for user in gone:
            self.forget_user(user)
        return len(gone)

    def acquire(self, epochs: Mapping[int, int], batch_ids: Mapping[int, list[str]]) -> None:
        for partition, epoch in epochs.items():
            self.owned[partition] = epoch
            remembered = self.batch_ids.setdefault(partition, OrderedDict())
            for batch_id in batch_ids.get(partition, []):
                remembered[batch_id] = None

    def previous_owner_batch_ids(self, owner: str, partitions: Iterable[int]) -> dict[int, list]:
        """A partition's remembered batch ids, from its previous owner's checkpoint."""
        checkpoint = self.store.get_checkpoint(owner)
        if checkpoint is None or not checkpoint.meta:
            return {}
        meta = codec.decode(checkpoint.meta, what=f"checkpoint of {owner}")
        ids = meta.get("batch_ids", {})
        return {p: ids.get(p, []) for p in partitions}

    # --- recovery ---
    def recover(self) -> int:
        """Load the checkpoint and replay the journal after it; return rows replayed."""
        self.refresh_ownership()
        checkpoint = self.store.get_checkpoint(self.name)
        if checkpoint is not None:
            self.checkpoint_seq = self.last_seq = checkpoint.seq
            if checkpoint.meta:
                meta = codec.decode(checkpoint.meta, what=f"checkpoint of {self.name}")
                self.batch_ids = {
                    int(p): OrderedDict.fromkeys(ids)
                    for p, ids in meta.get("batch_ids", {}).items()
                }
                self.item_stats.restore(meta.get("item_stats"))
        return self.catch_up()

    def catch_up(self) -> int:
        """Apply journal rows after last_seq (after a restart, or rows another
        incarnation of this shard wrote). Rows a profile already holds are skipped.

        The users the rows touch are loaded from the store in one bulk read before
        anything is applied: one grouped request per ~100 users instead of a round
        trip per row is most of what recovery costs."""
        rows = [
            (seq, codec.decode(blob, what=f"journal {self.name}@{seq}"))
            for seq, blob in self.store.read_journal(self.name, self.last_seq)
        ]
        deleted_later: set[str] = set()
        touched: dict[str, None] = {}
        for _seq, row in reversed(rows):
            if "delete" in row:
                deleted_later.add(row["delete"])
            else:
                for event in row["events"]:
                    if event[0] not in deleted_later:
                        touched[event[0]] = None
        self.load_missing(touched)
        for seq, row in rows:
            if "delete" in row:
                self.forget_user(row["delete"])
                self.store.delete_profiles([row["delete"]])
            else:
                by_user: dict[str, list] = {}
                for user, item, action, ts, topics, weight in row["events"]:
                    by_user.setdefault(user, []).append(
                        (user, sys.intern(item), action, ts, tuple(topics), weight)
                    )
                self.apply_in_memory(by_user, seq)
                self.remember(row["batch_id"], {self.partition(u) for u in by_user})
            self.last_seq = seq
        return len(rows)

    # --- loading ---
    def missing_users(self, user_ids: Iterable[str]) -> list[str]:
        return [u for u in user_ids if u not in self.profiles]

    def fetch_profiles(self, user_ids: list[str]) -> dict[str, Profile]:
        """Read and decode users from the store (blocking I/O, no memory changes)."""
        if not user_ids:
            return {}
        loaded = {}
        for user, blob in self.store.get_profiles(user_ids).items():
            try:
                loaded[user] = Profile.from_record(
                    codec.decode(blob, what=f"profile {user}"), self.rules
                )
            except CorruptRecord:
                log.exception("profile %s is corrupt in the store; not loaded", user)
                raise
        return loaded

    def install(self, loaded: Mapping[str, Profile]) -> None:
        """Make loaded profiles resident unless a newer copy got there first, or their
        partition was handed over while they were being read (a stale copy kept here
        would shadow the new owner's writes if the partition ever came back)."""
        for user, profile in loaded.items():
            if user not in self.profiles and self.partition(user) in self.owned:
                self.profiles[user] = profile
                self.totals["loaded"] += 1

    def load_missing(self, user_ids: Iterable[str]) -> None:
        self.install(self.fetch_profiles(self.missing_users(user_ids)))

    def touch(self, user_ids: Iterable[str]) -> None:
        """Mark users as recently used (they move to the back of the eviction order)."""
        for user in user_ids:
            if user in self.profiles:
                self.profiles.move_to_end(user)

    def fetch_item_vectors(self, item_ids: Iterable[str]) -> dict[str, np.ndarray | None]:
        unknown = [i for i in set(item_ids) if i not in self.item_vectors]
        if not unknown:
            return {}
        found = {
            i: item_vector(decode_item(i, blob))
            for i, blob in self.store.get_items(unknown).items()
        }
        return {i: found.get(i) for i in unknown}

    def install_item_vectors(self, vectors: Mapping[str, np.ndarray | None]) -> None:
        if len(self.item_vectors) + len(vectors) > ITEM_CACHE_LIMIT:
            self.item_vectors.clear()
        self.item_vectors.update(vectors)

    # --- applying ---
    def remember(self, batch_id: str, partitions: Iterable[int]) -> None:
        limit = self.settings.remembered_batch_ids
        for partition in partitions:
            remembered = self.batch_ids.setdefault(partition, OrderedDict())
            remembered[batch_id] = None
            while len(remembered) > limit:
                remembered.popitem(last=False)

    def prepare(self, batch_id: str, events, *, validated: bool = False) -> PreparedBatch | Ack:
        """Validate, dedupe and fence a batch; an Ack means there is nothing to journal.

        Duplicates are decided per (batch id, partition): a batch retried after some
        of its partitions moved to another shard is still applied exactly once."""
        if validated:
            valid, errors = [tuple(e) for e in events], []
        else:
            valid, errors = self.validator.validate(events)
        self.totals["rejected"] += len(errors)
        by_user: dict[str, list[ValidEvent]] = {}
        for event in valid:
            by_user.setdefault(event[0], []).append(event)
        partition_of_user = {user: self.partition(user) for user in by_user}
        not_owned = {p for p in partition_of_user.values() if p not in self.owned}
        if not_owned:
            raise StaleEpoch(
                f"{self.name} does not own partition(s) {sorted(not_owned)[:10]}; "
                "refresh the assignment and resend"
            )
        seen = {p for p in set(partition_of_user.values()) if batch_id in self.batch_ids.get(p, ())}
        duplicate = 0
        if seen:
            for user in [u for u, p in partition_of_user.items() if p in seen]:
                duplicate += len(by_user.pop(user))
            self.totals["duplicate"] += duplicate
        applied = sum(len(e) for e in by_user.values())
        ack = Ack(applied=applied, duplicate=duplicate, rejected=len(errors), errors=errors)
        if not by_user:
            return ack
        partitions = sorted({partition_of_user[u] for u in by_user})
        fence = {p: self.owned[p] for p in partitions}
        new_events = [e for events in by_user.values() for e in events]
        blob = codec.encode({"batch_id": batch_id, "events": new_events})
        return PreparedBatch(batch_id, self.last_seq + 1, by_user, partitions, blob, fence, ack)

    def append(self, batch: PreparedBatch) -> None:
        """Write-ahead: the journal row must be durable before anything is applied.

        A taken position means an earlier attempt of ours landed after all (a
        timeout that was not a failure) or another incarnation wrote there; both
        are resolved by catching up with the journal first."""
        try:
            self.store.append_journal(self.name, batch.seq, batch.blob, fence=batch.fence)
        except JournalConflict:
            rows = list(self.store.read_journal(self.name, batch.seq - 1, limit=1))
            if rows and rows[0][1] == batch.blob:
                return
            raise

    def apply_in_memory(self, by_user: Mapping[str, Sequence[ValidEvent]], seq: int) -> int:
        """Apply grouped events at journal position seq; skip users already past it."""
        applied = 0
        vectors = self.item_vectors or None
        profiles = self.profiles
        for user, events in by_user.items():
            profile = profiles.get(user)
            if profile is None:
                profile = profiles[user] = Profile(user, len(self.rules.actions))
            else:
                if profile.journal == self.name and profile.position >= seq:
                    continue
                profiles.move_to_end(user)
            self.item_stats.observe(events, profile.recent)
            apply_events(profile, events, self.rules, embeddings=vectors)
            profile.journal, profile.position = self.name, seq
            self.dirty.add(user)
            applied += len(events)
        return applied

    def commit(self, batch: PreparedBatch) -> Ack:
        self.apply_in_memory(batch.by_user, batch.seq)
        self.remember(batch.batch_id, batch.partitions)
        self.last_seq = batch.seq
        self.totals["applied"] += batch.ack.applied
        return batch.ack

    # --- passivation ---
    def eviction_candidates(self) -> list[str]:
        """Least recently used users beyond the cap (with 5% slack, so eviction runs in
        batches rather than on every call)."""
        cap = self.settings.max_resident_profiles
        if not cap or len(self.profiles) <= cap:
            return []
        target = int(cap * 0.95)
        count = len(self.profiles) - target
        victims = []
        for user in self.profiles:
            victims.append(user)
            if len(victims) >= count:
                break
        return victims

    def encode_for_eviction(self, users: Iterable[str]) -> tuple[dict[str, bytes], dict[str, int]]:
        """Blobs of the dirty users among ``users`` and the journal position each had."""
        dirty = [u for u in users if u in self.dirty]
        positions = {u: self.profiles[u].position for u in dirty if u in self.profiles}
        return self.encode_profiles(positions), positions

    def evict(self, users: Iterable[str], written: Mapping[str, int]) -> int:
        """Drop users that are clean, or whose state was written and has not changed
        since (an event applied meanwhile keeps the user resident and dirty)."""
        evicted = 0
        for user in users:
            profile = self.profiles.get(user)
            if profile is None:
                continue
            if user in self.dirty:
                if written.get(user) != profile.position:
                    continue
                self.dirty.discard(user)
            del self.profiles[user]
            evicted += 1
        self.totals["evicted"] += evicted
        return evicted

    # --- deleting ---
    def forget_user(self, user_id: str) -> bool:
        self.dirty.discard(user_id)
        return self.profiles.pop(user_id, None) is not None

    def journal_delete(self, user_id: str) -> int:
        """Journal a delete, fenced like any write: only the owner may delete."""
        partition = self.partition(user_id)
        if partition not in self.owned:
            raise StaleEpoch(f"{self.name} does not own partition {partition}; resend")
        seq = self.last_seq + 1
        self.store.append_journal(
            self.name,
            seq,
            codec.encode({"delete": user_id}),
            fence={partition: self.owned[partition]},
        )
        self.last_seq = seq
        return seq

    # --- checkpointing ---
    def begin_checkpoint(self) -> tuple[int, list[str], bytes]:
        """Swap out the dirty set; everything journaled up to the returned position
        is in memory, every profile it touched is in the returned list, and the
        returned meta (batch ids, item signals) is as of that same position."""
        users, self.dirty = list(self.dirty), set()
        return self.last_seq, users, self.checkpoint_meta()

    def encode_profiles(self, users: Iterable[str]) -> dict[str, bytes]:
        encoded = {}
        for user in users:
            profile = self.profiles.get(user)
            if profile is not None:  # deleted since it was dirtied
                encoded[user] = codec.encode(profile.to_record(self.rules))
        return encoded

    def checkpoint_meta(self) -> bytes:
        return codec.encode(
            {
                "batch_ids": {p: list(ids) for p, ids in self.batch_ids.items()},
                "item_stats": self.item_stats.state(),
                "at": time.time(),
            }
        )

    def finish_checkpoint(self, seq: int, meta: bytes) -> None:
        self.store.put_checkpoint(self.name, Checkpoint(seq=seq, meta=meta))
        self.store.trim_journal(self.name, seq)
        self.checkpoint_seq = seq
        self.last_checkpoint_at = time.monotonic()

    def stats(self) -> dict:
        return {
            "name": self.name,
            "resident": len(self.profiles),
            "dirty": len(self.dirty),
            "last_seq": self.last_seq,
            "checkpoint_seq": self.checkpoint_seq,
            "partitions_owned": len(self.owned),
            "remembered_batch_ids": sum(len(ids) for ids in self.batch_ids.values()),
            **self.totals,
        }
