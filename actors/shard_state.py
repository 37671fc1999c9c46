"""A shard's in-memory state and its journal/checkpoint protocol, without Ray.

ProfileShard (actors/shard.py) wraps this in an async Ray actor and decides which
steps run in a thread (store I/O) and which on the event loop (memory). Kept
separate so the protocol reads top to bottom in one place:

1. apply:      check -> load the batch's users and its dedup entries -> drop lines
               already applied and events older than a user's delete -> fence ->
               append journal row (write-ahead) -> apply -> record the lines -> ack.
2. checkpoint: take the dirty set, the changed dedup entries, the pending deletes and
               the last journal position -> redo pending store deletes -> write
               profiles and dedup entries -> record the position -> trim.
3. recover:    read the checkpoint -> replay later journal rows, each event only into
               a partition owned at the epoch the row was fenced with (a row that
               landed after a timeout and a move is not ours to apply); a row that
               cannot be applied is quarantined, never crash-looped on.
4. hand-over:  the old owner stops writes, checkpoints, seals its journal (a row
               naming the partitions, written like any append) and itself advances
               the store's epoch to the new owner; the new owner adopts partitions
               the store says it owns (on the mover's call, or lazily on first use).
5. passivate:  beyond the resident cap, the least recently used profiles that no
               batch in flight holds are written (if dirty) and dropped.

Users leave memory by eviction, delete or hand-over; every removal is counted, and a
store read that began before a user's removal is not installed (it may predate what
the removal wrote), but read again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from actors.attribution import Attribution, Exposure, ExposureIndex, attribution_key, decide
from actors.catalog import decode_item, item_vector
from actors.dedup import DedupIndex, LineSet, dedup_key
from actors.events import EventValidator, ValidEvent, decode_columns, encode_columns, references
from actors.freshness import Freshness
from actors.item_stats import ItemStats
from actors.profile import ProfileRules
from actors.profile_table import ProfileTable
from actors.routing import partition_of
from persona.errors import ConfigError, CorruptRecord, JournalConflict, PersonaError, StaleEpoch
from persona.settings import Settings
from storage import Assignment, Checkpoint, Store, codec

log = logging.getLogger(__name__)

# Profiles encoded between yields to the event loop during a checkpoint (~30 ms of
# encoding), and written per store call.
CHECKPOINT_CHUNK = 5_000
# Users whose removal (eviction, delete, hand-over) is remembered for loads in flight;
# a load older than the oldest remembered removal is read again rather than trusted.
REMOVALS_REMEMBERED = 100_000
# Deleted users whose delete time is kept in memory (older events for them are dropped).
TOMBSTONES_REMEMBERED = 100_000
# Item vectors cached per shard for the interest embedding; bounded, cleared when full.
ITEM_CACHE_LIMIT = 200_000
# Store reads of a batch's users retried when removals keep racing them.
LOAD_ATTEMPTS = 5


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
class CheckedBatch:
    """A batch's valid events with their lines, and why the others were rejected."""

    events: list[ValidEvent]
    lines: list[int]
    errors: list[dict]
    # The whole batch's lines, first to last, as its sender cut it: every event of a
    # partition in that range is in this batch, so the range is what a partition
    # records as applied (a file's consecutive batches then merge into one interval).
    span: tuple[int, int] | None = None
    # When the batch reached the fleet (wall clock), for the arrival-to-applied delay.
    arrived_at: float | None = None
    # {line: (rec_id, position)} of the events that name a recommendation.
    refs: dict = field(default_factory=dict)
    # The events and lines as the sender encoded them (events.encode_columns), if it
    # did: journaled as they are when no event is dropped.
    encoded: bytes | None = None
    # Filled on first use: the batch's distinct users, their partitions, its items.
    _users: list[str] | None = field(default=None, repr=False)
    _partitions: dict[str, int] | None = field(default=None, repr=False)
    _items: set[str] | None = field(default=None, repr=False)

    def users(self) -> list[str]:
        if self._users is None:
            self._users = list(dict.fromkeys(e[0] for e in self.events))
        return self._users

    def partitions(self, count: int) -> dict[str, int]:
        """Each distinct user's partition of ``count`` (computed once: the apply path
        asks several times)."""
        if self._partitions is None:
            self._partitions = {u: partition_of(u, count) for u in self.users()}
        return self._partitions

    def items(self) -> set[str]:
        if self._items is None:
            self._items = {e[1] for e in self.events}
        return self._items


@dataclass
class PreparedBatch:
    """A batch ready to be journaled: its new events (batch order) and their lines,
    their users (with each one's partition), its dedup keys and its row blob."""

    source: str
    seq: int
    events: list[ValidEvent]
    lines: list[int]
    users: dict[str, int]
    keys: dict[str, tuple[int, list[int]]]
    blob: bytes
    fence: dict[int, int]
    ack: Ack
    arrived_at: float | None = None
    # The attribution records its events make (key -> (event time, blob)).
    attributions: dict = field(default_factory=dict)


class ShardState:
    def __init__(self, name: str, store: Store, settings: Settings, partitions: int):
        self.name = name
        self.store = store
        self.settings = settings
        self.partitions = partitions
        self.fingerprint = settings.model_fingerprint()
        self.rules = ProfileRules.from_settings(settings)
        self.validator = EventValidator(self.rules.actions, settings.max_future_seconds)
        # Resident profiles, column-wise; also tracks dirty rows and recency (LRU).
        self.table = ProfileTable(self.rules)
        self.dedup = DedupIndex(settings.dedup_memory_entries)
        self.owned: dict[int, int] = {}
        # Partitions this shard stopped writing for a hand-over that has not been
        # confirmed in the store yet (restored if the hand-over fails).
        self.releasing: dict[int, int] = {}
        self.last_seq = 0  # last journal position written (and applied)
        self.checkpoint_seq = 0
        self.signals_slot = 0  # where the current checkpoint's item signals are
        self.item_vectors: dict[str, np.ndarray] = {}
        self.items_checked: set[str] = set()
        # Users a batch in flight holds: never evicted under it.
        self.pinned = Pins()
        # Removals so far, and the count at each recently removed user's removal.
        self.removals = 0
        self.removed_at: OrderedDict[str, int] = OrderedDict()
        self.removals_forgotten = 0  # removal count of the newest entry no longer kept
        # Delete time of recently deleted users, and deletes the store has not taken yet.
        self.tombstones: OrderedDict[str, float] = OrderedDict()
        self.pending_deletes: dict[str, float] = {}
        self.item_stats = ItemStats(settings, settings.action_weights)
        # Recent exposures of this shard's users (sent by the replicas), and the
        # attributions applied since the last checkpoint (written by the next one).
        self.exposures = ExposureIndex(settings.attribution_window_s, settings.exposure_index_users)
        self.pending_attributions: dict[str, tuple[float, bytes]] = {}
        # Attributed events applied by this incarnation, by (experiment, variant,
        # action); "" where the exposure is no longer held (exported as a counter).
        self.attributed: Counter[tuple[str, str, str]] = Counter()
        self.totals = {
            "applied": 0,
            "duplicate": 0,
            "rejected": 0,
            "loaded": 0,
            "evicted": 0,
            "load_misses": 0,
            "quarantined": 0,
        }
        self.last_checkpoint_at = time.monotonic()
        self.freshness = Freshness()

    def partition(self, user_id: str) -> int:
        return partition_of(user_id, self.partitions)

    # --- ownership ---
    def refresh_ownership(self) -> dict[int, int]:
        return self.sync_ownership(self.store.get_assignments())

    def sync_ownership(self, assignments: Mapping[int, Assignment]) -> dict[int, int]:
        """Own what the store says this shard owns. A partition gained afresh (or at a
        new epoch) starts with nothing of it in memory; one lost without a hand-over
        is dropped; one whose hand-over failed is owned again as it was."""
        now = {p: a.epoch for p, a in assignments.items() if a.owner == self.name}
        before = {**self.releasing, **self.owned}
        stale = {p for p in set(before) | set(now) if before.get(p) != now.get(p)}
        if stale:
            self.forget_partitions(stale)
        self.owned, self.releasing = now, {}
        return self.owned

    def stop_owning(self, partitions: Iterable[int]) -> dict[int, int]:
        """Refuse further writes to partitions; return the epochs they were held at."""
        stopped = {p: self.owned.pop(p) for p in partitions if p in self.owned}
        self.releasing.update(stopped)
        return stopped

    def handed_over(self, partitions: Iterable[int]) -> None:
        """The store now names another owner: drop the partitions' users and entries."""
        partitions = list(partitions)
        for p in partitions:
            self.releasing.pop(p, None)
        self.forget_partitions(partitions)

    def forget_partitions(self, partitions: Iterable[int]) -> int:
        """Drop the users and dedup entries of partitions (written before, or not ours)."""
        partitions = set(partitions)
        if not partitions:
            return 0
        gone = [u for u in self.table if self.partition(u) in partitions]
        for user in gone:
            self._remove(user)
        self.dedup.forget_partitions(partitions)
        return len(gone)

    # --- recovery ---
    def recover(self) -> int:
        """Load the checkpoint and replay the journal after it; return rows replayed.
        The exposure index is read back from the store's exposures of the window."""
        self.refresh_ownership()
        replayed = self.catch_up()
        now = time.time()
        self.note_exposures(
            Exposure.decode(blob)
            for _, _, blob in self.store.scan_exposures(
                now - self.settings.attribution_window_s, now
            )
        )
        return replayed

    def note_exposures(self, exposures) -> int:
        """Remember exposures of users in owned partitions (for attributing events
        that carry no rec_id); returns how many were new."""
        owned = self.owned
        return self.exposures.note(e for e in exposures if self.partition(e.user_id) in owned)

    def attributions_of(
        self, source: str, events: Sequence[Sequence], lines: Sequence[int], decided: Mapping
    ) -> dict[str, tuple[float, bytes]]:
        """Attribution records of the decided events, keyed by their (source, line)."""
        records = {}
        for event, line in zip(events, lines, strict=True):
            hit = decided.get(line)
            if hit is not None:
                record = Attribution(hit[0], event[0], event[1], event[2], event[3], hit[1])
                records[attribution_key(source, line)] = (event[3], record.encode())
        return records

    def reload_from(self, checkpoint: Checkpoint) -> None:
        """Start again from a checkpoint: nothing in memory is trusted any more."""
        if self.last_seq:  # not a start, where reading the checkpoint is the plan
            log.warning(
                "%s is at position %d behind its checkpoint %d: reloading",
                self.name,
                self.last_seq,
                checkpoint.seq,
            )
        for user in list(self.table):
            self._remove(user)
        self.removals_forgotten = self.removals  # loads in flight read again
        self.dedup = DedupIndex(self.settings.dedup_memory_entries)
        self.refresh_ownership()
        self.checkpoint_seq = self.last_seq = checkpoint.seq
        if checkpoint.meta:
            self.restore_signals(codec.decode(checkpoint.meta, what=f"checkpoint of {self.name}"))

    def catch_up(self) -> int:
        """Apply journal rows after last_seq (after a restart, or rows another
        incarnation of this shard wrote, or an append that timed out but landed).

        Each event is applied only if this shard owns its partition at the epoch the
        row was fenced with: a row that landed after its partition moved was never
        acknowledged, and the new owner holds the truth. Users and dedup entries the
        rows touch are loaded in bulk first (a round trip per row is most of what
        recovery would otherwise cost). A row that cannot be decoded or applied is
        quarantined (kept in the store, reported) and skipped.

        A checkpoint past our position means another incarnation went on without us
        (and took in every row we wrote): our memory is stale, so it is dropped and
        the state reloaded from that checkpoint first."""
        checkpoint = self.store.get_checkpoint(self.name)
        if checkpoint is not None and checkpoint.seq > self.last_seq:
            self.reload_from(checkpoint)
        rows = []
        for seq, blob in self.store.read_journal(self.name, self.last_seq):
            try:
                rows.append((seq, blob, journal_row(codec.decode(blob, what=f"journal@{seq}"))))
            except (CorruptRecord, KeyError, TypeError, ValueError) as exc:
                self.quarantine(seq, blob, f"undecodable: {exc}")
                rows.append((seq, blob, None))
        deleted_later: set[str] = set()
        touched: dict[str, None] = {}
        keys: dict[str, int] = {}
        for _seq, _blob, row in reversed(rows):
            if row is None or row.released:
                continue
            if row.deleted is not None:
                deleted_later.add(row.deleted)
                continue
            for _line, event in self._ours(row):
                partition = self.partition(event[0])
                keys[dedup_key(partition, row.source)] = partition
                if event[0] not in deleted_later:
                    touched[event[0]] = None
        self.load_missing(touched)
        self.install_dedup(self.fetch_dedup(self.dedup.unknown(keys)), keys)
        for seq, blob, row in rows:
            if row is not None:
                try:
                    self._replay(seq, row)
                except (PersonaError, KeyError, TypeError, ValueError) as exc:
                    self.quarantine(seq, blob, f"cannot be applied: {type(exc).__name__}: {exc}")
            self.last_seq = seq
        if self.pending_deletes:
            self.finish_deletes(dict(self.pending_deletes))
        return len(rows)

    def _ours(self, row: JournalRow) -> list[tuple[int, Sequence]]:
        """(line, event) of a row's events whose partition is owned at the row's epoch."""
        owned, releasing = self.owned, self.releasing
        kept = []
        for line, event in zip(row.lines, row.events, strict=True):
            partition = self.partition(event[0])
            # A partition being handed over is still ours to catch up with: every row
            # before the hand-over's seal must be in the checkpoint the new owner reads.
            epoch = owned.get(partition, releasing.get(partition))
            if epoch is not None and (row.fence is None or row.fence.get(partition) == epoch):
                kept.append((line, event))
        return kept

    def _replay(self, seq: int, row: JournalRow) -> None:
        if row.released:
            # Another incarnation of this shard handed these partitions over: nothing
            # of them may be written here any more (see seal_release).
            gone = [p for p, e in row.released.items() if self.owned.get(p) == e]
            for partition in gone:
                self.owned.pop(partition)
            self.handed_over(gone)
            return
        if row.deleted is not None:
            partition = self.partition(row.deleted)
            if partition in self.owned and (
                row.fence is None or row.fence.get(partition) == self.owned[partition]
            ):
                self.forget_deleted(row.deleted, row.deleted_at)
            return
        kept = self._ours(row)
        if not kept:
            return
        events = [tuple(e) for _, e in kept]
        self.check_trusted(events)
        self.apply_in_memory(events, seq)
        lines = [line for line, _ in kept]
        self.record_lines(row.source, events, lines, row.span)
        if row.refs:  # the attributions decided when the row was written, again
            self.pending_attributions.update(
                self.attributions_of(row.source, events, lines, row.refs)
            )

    def quarantine(self, seq: int, blob: bytes, reason: str) -> None:
        log.error("%s: journal row %d quarantined: %s", self.name, seq, reason)
        self.store.quarantine(self.name, seq, blob, reason)
        self.totals["quarantined"] += 1

    def seal_release(self, epochs: Mapping[int, int], target: str) -> int:
        """Write a hand-over's seal at this shard's next journal position, with the
        same conditional append as every batch. Any incarnation of this shard that
        appends later must take that position first, so it reads the seal and stops
        writing the partitions: no write can slip in between the owner's last
        checkpoint and the store's new epoch, whatever the store (Cassandra checks
        the fence with a read before the append; this closes that window)."""
        seq = self.last_seq + 1
        row = {"release": dict(epochs), "to": target, "fence": dict(epochs)}
        self.store.append_journal(self.name, seq, codec.encode(row), fence=dict(epochs))
        self.last_seq = seq
        return seq

    # --- loading ---
    def missing_users(self, user_ids: Iterable[str]) -> list[str]:
        table = self.table
        return [u for u in user_ids if u not in table]

    def fetch_profiles(self, user_ids: list[str]) -> dict[str, dict]:
        """Read and decode users' stored records (blocking I/O, no memory changes).
        Users the store holds no profile for get their tombstone, if they have one,
        as ``{"deleted_at": t}``: events older than a delete must not bring them back."""
        if not user_ids:
            return {}
        loaded = {}
        for user, blob in self.store.get_profiles(user_ids).items():
            try:
                loaded[user] = codec.decode(blob, what=f"profile {user}")
            except CorruptRecord:
                log.exception("profile %s is corrupt in the store; not loaded", user)
                raise
        absent = [u for u in user_ids if u not in loaded]
        if absent:
            for user, at in self.store.get_tombstones(absent).items():
                loaded[user] = {"deleted_at": at}
        return loaded

    def install(self, loaded: Mapping[str, dict], since: int | None = None) -> list[str]:
        """Make loaded records resident unless a newer copy got there first or their
        partition is not ours (a stale copy kept here would shadow the new owner's
        writes). Returns the users whose read began before their removal (count
        ``since``): their record may predate what the removal wrote, so the caller
        reads them again."""
        table, owned, removed_at = self.table, self.owned, self.removed_at
        stale_all = since is not None and since < self.removals_forgotten
        fresh, again = [], []
        for user, record in loaded.items():
            if user in table or self.partition(user) not in owned:
                continue
            if since is not None and (stale_all or removed_at.get(user, -1) > since):
                again.append(user)
                continue
            if user in self.pending_deletes:
                continue  # the store has not taken the delete yet: what it holds is gone
            if "deleted_at" in record:
                self._remember_tombstone(user, record["deleted_at"])
                continue
            if "dt" in record:
                self._remember_tombstone(user, record["dt"])
            fresh.append(record)
        table.put_records(fresh)
        self.totals["loaded"] += len(fresh)
        return again

    def load_missing(self, user_ids: Iterable[str]) -> None:
        self.install(self.fetch_profiles(self.missing_users(user_ids)))

    async def load(self, user_ids: Iterable[str]) -> list[str]:
        """load_missing with the store read off the event loop; other calls (applies,
        deletes, evictions) run meanwhile. Returns the users the store does not hold."""
        missing = self.missing_users(user_ids)
        if not missing:
            return []
        self.totals["load_misses"] += len(missing)
        absent: list[str] = []
        for _attempt in range(LOAD_ATTEMPTS):
            since = self.removals
            loaded = await asyncio.to_thread(self.fetch_profiles, missing)
            again = self.install(loaded, since)
            absent += [u for u in missing if u not in loaded or "deleted_at" in loaded[u]]
            missing = self.missing_users(again)
            if not missing:
                return absent
        raise StaleEpoch(f"{self.name}: loads kept racing evictions; retry")

    def fetch_dedup(self, keys: list[str]) -> tuple[list[str], dict[str, LineSet]]:
        """The stored applied lines of dedup keys (blocking I/O)."""
        if not keys:
            return keys, {}
        found = {
            key: LineSet.decode(blob, what=f"dedup record {key}")
            for key, blob in self.store.get_dedup(keys).items()
        }
        return keys, found

    def install_dedup(self, fetched: tuple[list[str], dict[str, LineSet]], partitions) -> None:
        asked, found = fetched
        owned, releasing = self.owned, self.releasing
        asked = [k for k in asked if partitions[k] in owned or partitions[k] in releasing]
        self.dedup.install(found, asked, partitions)

    async def load_dedup(self, keys: Mapping[str, int]) -> None:
        """Read the dedup entries of keys not in memory (off the event loop). Callers
        pin the keys first (see DedupIndex.pin), so what is loaded stays loaded."""
        unknown = self.dedup.unknown(k for k, p in keys.items() if p in self.owned)
        if unknown:
            self.install_dedup(await asyncio.to_thread(self.fetch_dedup, unknown), keys)

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
    def check(
        self,
        events,
        lines: Sequence[int] | None,
        *,
        validated: bool,
        span: Sequence[int] | None = None,
        arrived_at: float | None = None,
        refs: Mapping[int, tuple] | None = None,
    ) -> CheckedBatch:
        """Validate a batch (or check a pre-validated one against this shard's rules)
        and pair each valid event with its line (default: its index)."""
        if lines is not None and len(lines) != len(events):
            raise ConfigError(f"{len(lines)} lines for {len(events)} events")
        if lines is None:
            lines = range(len(events))
        if span is None and len(lines):
            span = (min(lines), max(lines))
        elif span is not None:
            span = (int(span[0]), int(span[1]))
            if len(lines) and not span[0] <= min(lines) <= max(lines) <= span[1]:
                raise ConfigError(f"lines outside their batch's span {span}")
        if validated:
            valid = [tuple(e) for e in events]
            self.check_trusted(valid)
            return CheckedBatch(valid, list(lines), [], span, arrived_at, dict(refs or {}))
        valid, errors = self.validator.validate(events)
        self.totals["rejected"] += len(errors)
        bad = {e["index"] for e in errors}
        kept = [line for n, line in enumerate(lines) if n not in bad]
        return CheckedBatch(valid, kept, errors, span, arrived_at, references(events, lines))

    def check_trusted(self, events: Sequence[Sequence]) -> None:
        """Refuse pre-validated events this shard's rules cannot apply (a fleet started
        with other settings): checked before the journal append, so no row that
        cannot be applied is ever written."""
        codes = self.rules.codes
        for event in events:
            if len(event) != 6 or not isinstance(event[0], str) or event[2] not in codes:
                raise ConfigError(
                    f"{self.name} cannot apply {str(event)[:120]}: its actions are "
                    f"{', '.join(self.rules.actions)}; the sender runs with other settings"
                )

    def dedup_keys(self, source: str, events: CheckedBatch | Iterable[Sequence]) -> dict[str, int]:
        """The dedup keys of a batch (its partitions are computed once) or of events."""
        if isinstance(events, CheckedBatch):
            partitions = set(events.partitions(self.partitions).values())
        else:
            partitions = {self.partition(e[0]) for e in events}
        return {dedup_key(p, source): p for p in partitions}

    def record_lines(
        self,
        source: str,
        events: Sequence[Sequence],
        lines: Sequence[int],
        span: Sequence[int] | None = None,
    ) -> None:
        by_key: dict[str, tuple[int, list[int]]] = {}
        for event, line in zip(events, lines, strict=True):
            partition = self.partition(event[0])
            by_key.setdefault(dedup_key(partition, source), (partition, []))[1].append(line)
        if span is not None:
            whole = range(span[0], span[1] + 1)
            by_key = {key: (partition, whole) for key, (partition, _) in by_key.items()}
        # An entry is only ever extended after it was read from the store: one built
        # from these lines alone would overwrite the source's history when written.
        unknown = self.dedup.unknown(by_key)
        if unknown:
            fetched = self.fetch_dedup(unknown)
            self.dedup.install(fetched[1], unknown, {k: by_key[k][0] for k in unknown})
        for key, (partition, key_lines) in by_key.items():
            self.dedup.record(key, partition, key_lines)

    def prepare(self, source: str, batch: CheckedBatch) -> PreparedBatch | Ack:
        """Drop already applied lines and events older than their user's delete, and
        fence the rest; an Ack means there is nothing to journal.

        Duplicates are decided per (source, partition, line): a file rerun with any
        batch size, or a batch retried after some of its partitions moved to another
        shard, is applied exactly once. The users and dedup entries must be loaded."""
        partition_of_user = batch.partitions(self.partitions)
        not_owned = {p for p in partition_of_user.values() if p not in self.owned}
        if not_owned:
            raise StaleEpoch(
                f"{self.name} does not own partition(s) {sorted(not_owned)[:10]}; "
                "refresh the assignment and resend"
            )
        seen: dict[str, list[bool]] = {}
        grouped: dict[str, list[int]] = {}
        for n, event in enumerate(batch.events):
            grouped.setdefault(dedup_key(partition_of_user[event[0]], source), []).append(n)
        duplicate_at: set[int] = set()
        for key, indexes in grouped.items():
            seen[key] = self.dedup.seen(key, [batch.lines[n] for n in indexes])
            duplicate_at.update(n for n, dup in zip(indexes, seen[key], strict=True) if dup)
        errors = list(batch.errors)
        events, lines = [], []
        tombstones = self.tombstones
        for n, event in enumerate(batch.events):
            if n in duplicate_at:
                continue
            deleted = tombstones.get(event[0])
            if deleted is not None and event[3] <= deleted:
                errors.append(
                    {
                        "index": n,
                        "reason": f"user {event[0]!r} was deleted at {deleted:.0f}; "
                        "events from before the delete are dropped",
                    }
                )
                continue
            events.append(event)
            lines.append(batch.lines[n])
        dropped = len(errors) - len(batch.errors)
        self.totals["duplicate"] += len(duplicate_at)
        self.totals["rejected"] += dropped
        ack = Ack(
            applied=len(events),
            duplicate=len(duplicate_at),
            rejected=len(errors),
            errors=errors,
        )
        if not events:
            return ack
        users = {e[0]: partition_of_user[e[0]] for e in events}
        keys: dict[str, tuple[int, Sequence[int]]] = {}
        for event, line in zip(events, lines, strict=True):
            partition = users[event[0]]
            keys.setdefault(dedup_key(partition, source), (partition, []))[1].append(line)
        if batch.span is not None:
            whole = range(batch.span[0], batch.span[1] + 1)
            keys = {key: (partition, whole) for key, (partition, _) in keys.items()}
        partitions = sorted(set(users.values()))
        fence = {p: self.owned[p] for p in partitions}
        # Events and lines as one columnar, compressed blob (~19 bytes an event against
        # ~70 for a msgpack list of tuples): Cassandra's work per append grows with
        # the row's bytes. The sender's own encoding is kept when nothing was dropped.
        part = batch.encoded
        if part is None or len(events) != len(batch.events):
            part = encode_columns(events, lines)
        row = {"source": source, "part": part, "fence": fence}
        if batch.span is not None:
            row["span"] = list(batch.span)
        # Attribution is decided once, here, and journaled: a replay reproduces it
        # without the exposure index (which may have changed since).
        decided = decide(self.exposures, events, lines, batch.refs)
        if decided:
            row["refs"] = [[line, rec_id, position] for line, (rec_id, position) in decided.items()]
        blob = codec.encode(row)
        seq = self.last_seq + 1
        return PreparedBatch(
            source,
            seq,
            events,
            lines,
            users,
            keys,
            blob,
            fence,
            ack,
            batch.arrived_at,
            self.attributions_of(source, events, lines, decided) if decided else {},
        )

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
        """Apply a journaled batch. The events were checked before the append; should
        applying still fail, the row is quarantined rather than replayed forever."""
        try:
            self.apply_in_memory(batch.events, batch.seq)
        except Exception as exc:
            self.last_seq = batch.seq
            self.quarantine(batch.seq, batch.blob, f"cannot be applied: {exc!r}")
            raise PersonaError(
                f"{self.name}: batch {batch.source} could not be applied and was quarantined "
                f"at journal position {batch.seq}: {exc!r}"
            ) from exc
        for key, (partition, lines) in batch.keys.items():
            self.dedup.record(key, partition, lines)
        self.pending_attributions.update(batch.attributions)
        for _ts, blob in batch.attributions.values():
            record = Attribution.decode(blob)
            experiment, variant = self.exposures.arm_of(record.rec_id) or ("", "")
            self.attributed[(experiment or "", variant or "", record.action)] += 1
        self.last_seq = batch.seq
        self.totals["applied"] += batch.ack.applied
        # Live batches only: a replayed row's delay says how long the shard was down.
        self.freshness.record(batch.events, batch.arrived_at, time.time(), time.monotonic())
        return batch.ack

    # --- pinning (batches in flight) ---
    def pin(self, users: Iterable[str]) -> set[str]:
        """Hold users against eviction; returns the hold to pass to ``unpin``."""
        return self.pinned.add(users)

    def unpin(self, held: set[str]) -> None:
        self.pinned.remove(held)

    # --- passivation ---
    def eviction_candidates(self) -> list[str]:
        """Least recently used users beyond the cap (with 5% slack, so eviction runs in
        batches rather than on every call), except users a batch in flight holds."""
        cap = self.settings.max_resident_profiles
        if not cap or len(self.table) <= cap:
            return []
        count = len(self.table) - int(cap * 0.95)
        pinned = self.pinned
        candidates = self.table.least_recent(count + len(pinned))
        return [u for u in candidates if u not in pinned][:count]

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
            if user not in table or user in self.pinned:
                continue
            if table.is_dirty(user) and written.get(user) != table.position_of(user):
                continue
            self._remove(user)
            evicted += 1
        self.totals["evicted"] += evicted
        return evicted

    def _remove(self, user: str) -> bool:
        """Drop a resident user, remembering when (for loads in flight)."""
        self.removals += 1
        self.removed_at[user] = self.removals
        self.removed_at.move_to_end(user)
        while len(self.removed_at) > REMOVALS_REMEMBERED:
            _user, count = self.removed_at.popitem(last=False)
            self.removals_forgotten = count
        return self.table.remove(user)

    # --- deleting ---
    def forget_user(self, user_id: str) -> bool:
        return self._remove(user_id)

    def _remember_tombstone(self, user_id: str, deleted_at: float) -> None:
        self.tombstones[user_id] = max(deleted_at, self.tombstones.get(user_id, deleted_at))
        self.tombstones.move_to_end(user_id)
        while len(self.tombstones) > TOMBSTONES_REMEMBERED:
            self.tombstones.popitem(last=False)

    def forget_deleted(self, user_id: str, deleted_at: float) -> bool:
        """Forget a user whose delete is journaled. Until the store has taken the
        delete, no load may bring the stored profile back, and every checkpoint
        redoes the store delete before it trims the journal."""
        self._remember_tombstone(user_id, deleted_at)
        self.pending_deletes[user_id] = deleted_at
        return self._remove(user_id)

    def journal_delete(self, user_id: str, deleted_at: float) -> int:
        """Journal a delete, fenced like any write: only the owner may delete."""
        partition = self.partition(user_id)
        if partition not in self.owned:
            raise StaleEpoch(f"{self.name} does not own partition {partition}; resend")
        seq = self.last_seq + 1
        fence = {partition: self.owned[partition]}
        self.store.append_journal(
            self.name,
            seq,
            codec.encode({"delete": user_id, "at": deleted_at, "fence": fence}),
            fence=fence,
        )
        self.last_seq = seq
        return seq

    def finish_deletes(self, deletes: Mapping[str, float]) -> None:
        """Delete users' stored profiles and record their tombstones (blocking I/O);
        those still pending with the same time are done."""
        if not deletes:
            return
        self.store.delete_profiles(list(deletes))
        self.store.add_tombstones(dict(deletes))
        for user, at in deletes.items():
            if self.pending_deletes.get(user) == at:
                del self.pending_deletes[user]

    # --- checkpointing ---
    def begin_checkpoint(self) -> CheckpointPlan:
        """Swap out the dirty set and the changed dedup entries: everything journaled
        up to the returned position is in memory, and every profile and entry it
        touched is in the plan, as are the deletes the store has not taken yet."""
        slot, signals, meta = self.signal_chunks()
        return CheckpointPlan(
            seq=self.last_seq,
            users=self.table.take_dirty(),
            dedup=self.dedup.take_dirty(),
            deletes=dict(self.pending_deletes),
            signals_slot=slot,
            signals=signals,
            meta=meta,
            attributions=self.take_attributions(),
        )

    def take_attributions(self) -> dict[str, tuple[float, bytes]]:
        taken, self.pending_attributions = self.pending_attributions, {}
        return taken

    def abort_checkpoint(self, plan: CheckpointPlan) -> None:
        self.table.mark_dirty(plan.users)
        self.dedup.mark_dirty(plan.dedup)
        # Newer records of the same key (none: a key is applied once) would win.
        self.pending_attributions = {**plan.attributions, **self.pending_attributions}

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
        """Stored records of resident users (users deleted since they were dirtied are
        skipped); a user who came back after a delete keeps its delete time."""
        tombstones = self.tombstones
        extras = {u: {"dt": tombstones[u]} for u in users if u in tombstones}
        return self.table.encode(users, extras=extras)

    def restore_signals(self, meta: dict) -> None:
        signals = meta.get("signals")
        if signals is not None:
            chunks = self.store.get_signals(self.name, signals["slot"], signals["chunks"])
            self.signals_slot = signals["slot"]
            self.item_stats.restore_chunks(
                codec.decode(blob, what=f"item signals of {self.name}") for blob in chunks
            )
        else:  # written before signals were chunked: one blob in the meta
            self.item_stats.restore(meta.get("item_stats"))

    def signal_chunks(self) -> tuple[int, list[bytes], bytes]:
        """The item signals as size-bounded chunks for the slot the current checkpoint
        does not point at (a crash while writing them leaves that checkpoint whole),
        and the meta that points at them."""
        slot = 1 - self.signals_slot
        encode = codec.encoder()
        chunks = [encode(chunk) for chunk in self.item_stats.chunks()]
        meta = codec.encode({"signals": {"slot": slot, "chunks": len(chunks)}, "at": time.time()})
        return slot, chunks, meta

    def finish_checkpoint(self, plan: CheckpointPlan) -> None:
        """Write the dedup entries and item signals as of the position, record the
        position pointing at them, then trim the journal."""
        self.store.put_dedup(plan.dedup, self.settings.dedup_retention_s)
        self.store.put_attributions(plan.attributions, self.settings.exposure_retention_s)
        self.store.put_signals(self.name, plan.signals_slot, plan.signals)
        self.store.put_checkpoint(self.name, Checkpoint(seq=plan.seq, meta=plan.meta))
        self.signals_slot = plan.signals_slot
        self.store.trim_journal(self.name, plan.seq)
        self.checkpoint_seq = plan.seq
        self.last_checkpoint_at = time.monotonic()

    def stats(self) -> dict:
        return {
            "name": self.name,
            "resident": len(self.table),
            "dirty": self.table.dirty_count(),
            "last_seq": self.last_seq,
            "checkpoint_seq": self.checkpoint_seq,
            "partitions_owned": len(self.owned),
            "dedup_entries": len(self.dedup),
            "pending_deletes": len(self.pending_deletes),
            **self.totals,
            "freshness": self.freshness.summary(time.monotonic()),
        }


class Pins:
    """The users batches in flight hold, one set per batch: pinning and unpinning a
    batch costs one set, not a count per user, and only eviction asks who is held."""

    def __init__(self) -> None:
        self._held: list[set[str]] = []

    def add(self, users: Iterable[str]) -> set[str]:
        held = set(users)
        self._held.append(held)
        return held

    def remove(self, held: set[str]) -> None:
        # By identity: two batches may hold equal sets.
        for n, other in enumerate(self._held):
            if other is held:
                del self._held[n]
                return

    def __contains__(self, user: object) -> bool:
        return any(user in held for held in self._held)

    def __len__(self) -> int:
        """Holds counted per batch (a user two batches hold counts twice)."""
        return sum(map(len, self._held))


@dataclass
class CheckpointPlan:
    """What one checkpoint writes, all as of journal position ``seq``."""

    seq: int
    users: list[str]
    dedup: dict[str, bytes]
    deletes: dict[str, float]
    signals_slot: int
    signals: list[bytes]
    meta: bytes
    attributions: dict[str, tuple[float, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class JournalRow:
    """One decoded journal row: a batch (source, events, lines), a delete, or the seal
    of a hand-over."""

    source: str = ""
    events: list = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    fence: dict[int, int] | None = None
    deleted: str | None = None
    deleted_at: float = 0.0
    released: dict[int, int] | None = None  # a hand-over's seal: partition -> epoch
    span: tuple[int, int] | None = None
    refs: dict[int, tuple[str, int]] | None = None  # line -> attributed (rec_id, position)


def journal_row(row: dict) -> JournalRow:
    """Rows written before lines and fences were journaled read as whole batches
    (lines = indexes) whose events belong to whoever owns their partition now."""
    fence = row.get("fence")
    fence = {int(p): e for p, e in fence.items()} if fence is not None else None
    if "release" in row:
        return JournalRow(released={int(p): e for p, e in row["release"].items()}, fence=fence)
    if "delete" in row:
        return JournalRow(deleted=row["delete"], deleted_at=row.get("at", 0.0), fence=fence)
    if "part" in row:  # columnar (events.encode_columns)
        events, lines = decode_columns(row["part"])
    else:  # rows written before: a list of event tuples and one of lines
        events = row["events"]
        lines = row.get("lines") or list(range(len(events)))
    span = tuple(row["span"]) if row.get("span") else None
    return JournalRow(
        source=row.get("source") or row["batch_id"],
        events=events,
        lines=lines,
        fence=fence,
        span=span,
        refs={int(line): (rec_id, pos) for line, rec_id, pos in row["refs"]}
        if row.get("refs")
        else None,
    )
