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

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.catalog import decode_item, item_vector
from actors.events import EventValidator, ValidEvent
from actors.item_stats import ItemStats
from actors.profile import ProfileRules
from actors.profile_table import ProfileTable
from actors.routing import partition_of
from persona.errors import CorruptRecord, JournalConflict, StaleEpoch
from persona.settings import Settings
from storage import Checkpoint, Store, codec

log = logging.getLogger(__name__)

# Profiles encoded between yields to the event loop during a checkpoint (~30 ms of
# encoding), and written per store call.
CHECKPOINT_CHUNK = 5_000
# Deleted users remembered for loads in flight (far more than can be in flight).
DELETES_REMEMBERED = 10_000
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
    """A batch ready to be journaled: its new events (batch order), their users (with
    each one's partition), and its row blob."""

    batch_id: str
    seq: int
    events: list[ValidEvent]
    users: dict[str, int]
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
        # Resident profiles, column-wise; also tracks dirty rows and recency (LRU).
        self.table = ProfileTable(self.rules)
        # Per partition, so that a partition's memory of applied batches moves with it.
        self.batch_ids: dict[int, OrderedDict[str, None]] = {}
        self.owned: dict[int, int] = {}
        self.last_seq = 0  # last journal position written (and applied)
        self.checkpoint_seq = 0
        self.item_vectors: dict[str, np.ndarray] = {}
        self.items_checked: set[str] = set()
        # Deletes so far, and the count at each recent user's delete: a load that began
        # before a user's delete must not make the user resident again.
        self.deletes = 0
        self.deleted_at: OrderedDict[str, int] = OrderedDict()
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
        gone = [u for u in self.table if self.partition(u) in partitions]
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
                self.forget_deleted(row["delete"])
                self.store.delete_profiles([row["delete"]])
            else:
                events = row["events"]
                self.apply_in_memory(events, seq)
                self.remember(row["batch_id"], {self.partition(e[0]) for e in events})
            self.last_seq = seq
        return len(rows)

    # --- loading ---
    def missing_users(self, user_ids: Iterable[str]) -> list[str]:
        table = self.table
        return [u for u in user_ids if u not in table]

    def fetch_profiles(self, user_ids: list[str]) -> dict[str, dict]:
        """Read and decode users' stored records (blocking I/O, no memory changes)."""
        if not user_ids:
            return {}
        loaded = {}
        for user, blob in self.store.get_profiles(user_ids).items():
            try:
                loaded[user] = codec.decode(blob, what=f"profile {user}")
            except CorruptRecord:
                log.exception("profile %s is corrupt in the store; not loaded", user)
                raise
        return loaded

    def install(self, loaded: Mapping[str, dict], since: int | None = None) -> None:
        """Make loaded records resident unless a newer copy got there first, their
        partition was handed over while they were being read (a stale copy kept here
        would shadow the new owner's writes if the partition ever came back), or
        they were deleted after deletion count ``since`` (when the read began)."""
        table, owned, deleted = self.table, self.owned, self.deleted_at
        fresh = [
            record
            for user, record in loaded.items()
            if user not in table
            and self.partition(user) in owned
            # read before a delete landed: it must not come back
            and (since is None or deleted.get(user, -1) <= since)
        ]
        table.put_records(fresh)
        self.totals["loaded"] += len(fresh)

    def load_missing(self, user_ids: Iterable[str]) -> None:
        self.install(self.fetch_profiles(self.missing_users(user_ids)))

    async def load(self, user_ids: Iterable[str]) -> list[str]:
        """load_missing with the store read off the event loop; other calls (applies,
        deletes) run meanwhile. Returns the users the store does not hold."""
        missing = self.missing_users(user_ids)
        if not missing:
            return []
        self.totals["load_misses"] += len(missing)
        since = self.deletes
        loaded = await asyncio.to_thread(self.fetch_profiles, missing)
        self.install(loaded, since)
        return [u for u in missing if u not in loaded]

    async def load_item_vectors(self, item_ids: Iterable[str]) -> None:
        """Cache the catalog embeddings of items not looked up before (off the loop)."""
        checked = self.items_checked
        unknown = {i for i in item_ids if i not in checked}
        if unknown:
            self.install_item_vectors(await asyncio.to_thread(self.fetch_item_vectors, unknown))

    def touch(self, user_ids: Iterable[str]) -> None:
        """Mark users as recently used (they move to the back of the eviction order)."""
        self.table.touch(user_ids)

    def fetch_item_vectors(self, item_ids: Iterable[str]) -> dict[str, np.ndarray | None]:
        unknown = [i for i in set(item_ids) if i not in self.items_checked]
        if not unknown:
            return {}
        found = {
            i: item_vector(decode_item(i, blob))
            for i, blob in self.store.get_items(unknown).items()
        }
        return {i: found.get(i) for i in unknown}

    def install_item_vectors(self, vectors: Mapping[str, np.ndarray | None]) -> None:
        """Remember which items were looked up, and the vectors of those that have one
        (only those reach the profile update: most catalogs embed few or no items)."""
        if len(self.items_checked) + len(vectors) > ITEM_CACHE_LIMIT:
            self.items_checked.clear()
            self.item_vectors.clear()
        self.items_checked.update(vectors)
        self.item_vectors.update((i, v) for i, v in vectors.items() if v is not None)

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
        partition_of_user = {u: self.partition(u) for u in dict.fromkeys(e[0] for e in valid)}
        not_owned = {p for p in partition_of_user.values() if p not in self.owned}
        if not_owned:
            raise StaleEpoch(
                f"{self.name} does not own partition(s) {sorted(not_owned)[:10]}; "
                "refresh the assignment and resend"
            )
        seen = {p for p in set(partition_of_user.values()) if batch_id in self.batch_ids.get(p, ())}
        duplicate = 0
        if seen:
            fresh = [e for e in valid if partition_of_user[e[0]] not in seen]
            duplicate = len(valid) - len(fresh)
            valid = fresh
            self.totals["duplicate"] += duplicate
            partition_of_user = {u: p for u, p in partition_of_user.items() if p not in seen}
        ack = Ack(applied=len(valid), duplicate=duplicate, rejected=len(errors), errors=errors)
        if not valid:
            return ack
        partitions = sorted(set(partition_of_user.values()))
        fence = {p: self.owned[p] for p in partitions}
        blob = codec.encode({"batch_id": batch_id, "events": valid})
        seq = self.last_seq + 1
        return PreparedBatch(batch_id, seq, valid, partition_of_user, partitions, blob, fence, ack)

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

    def apply_in_memory(self, events: Sequence[Sequence], seq: int) -> int:
        """Apply events (batch order) at journal position seq; users already past it
        (a replayed row they hold) are skipped. Applied rows become dirty."""
        return self.table.apply(
            events,
            seq,
            self.name,
            stats=self.item_stats,
            embeddings=self.item_vectors or None,
        )

    def commit(self, batch: PreparedBatch) -> Ack:
        self.apply_in_memory(batch.events, batch.seq)
        self.remember(batch.batch_id, batch.partitions)
        self.last_seq = batch.seq
        self.totals["applied"] += batch.ack.applied
        return batch.ack

    # --- passivation ---
    def eviction_candidates(self) -> list[str]:
        """Least recently used users beyond the cap (with 5% slack, so eviction runs in
        batches rather than on every call)."""
        cap = self.settings.max_resident_profiles
        if not cap or len(self.table) <= cap:
            return []
        return self.table.least_recent(len(self.table) - int(cap * 0.95))

    def encode_for_eviction(self, users: Iterable[str]) -> tuple[dict[str, bytes], dict[str, int]]:
        """Blobs of the dirty users among ``users`` and the journal position each had."""
        table = self.table
        positions = {u: table.position_of(u) for u in users if table.is_dirty(u)}
        return self.encode_profiles(positions), positions

    def evict(self, users: Iterable[str], written: Mapping[str, int]) -> int:
        """Drop users that are clean, or whose state was written and has not changed
        since (an event applied meanwhile keeps the user resident and dirty)."""
        evicted = 0
        table = self.table
        for user in users:
            if user not in table:
                continue
            if table.is_dirty(user) and written.get(user) != table.position_of(user):
                continue
            table.remove(user)
            evicted += 1
        self.totals["evicted"] += evicted
        return evicted

    # --- deleting ---
    def forget_user(self, user_id: str) -> bool:
        return self.table.remove(user_id)

    def forget_deleted(self, user_id: str) -> bool:
        """Forget a user that is being deleted, so that loads in flight drop it too."""
        self.deletes += 1
        self.deleted_at[user_id] = self.deletes
        self.deleted_at.move_to_end(user_id)
        while len(self.deleted_at) > DELETES_REMEMBERED:
            self.deleted_at.popitem(last=False)
        return self.forget_user(user_id)

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
        return self.last_seq, self.table.take_dirty(), self.checkpoint_meta()

    async def write_profiles(self, users: list[str], chunk: int = CHECKPOINT_CHUNK) -> None:
        """Encode and write profiles a chunk at a time, encoding the next chunk while
        the previous one is being written. Encoding stays on the caller's thread (the
        shard's event loop), so each chunk is a consistent view between batches."""
        writing = None
        try:
            for at in range(0, len(users), chunk):
                encoded = self.encode_profiles(users[at : at + chunk])
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(self.store.put_profiles, encoded))
                await asyncio.sleep(0)  # let reads and writes in between chunks
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                await asyncio.wait([writing])  # never leave a write running unobserved

    def encode_profiles(self, users: Iterable[str]) -> dict[str, bytes]:
        return self.table.encode(users)  # users deleted since they were dirtied are skipped

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
            "resident": len(self.table),
            "dirty": self.table.dirty_count(),
            "last_seq": self.last_seq,
            "checkpoint_seq": self.checkpoint_seq,
            "partitions_owned": len(self.owned),
            "remembered_batch_ids": sum(len(ids) for ids in self.batch_ids.values()),
            **self.totals,
        }
