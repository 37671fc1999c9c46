"""The store contract every backend implements (SQLite embedded, Cassandra production).

Small on purpose: profiles, a per-shard journal, checkpoint positions, partition
assignments with an epoch fence, the item catalog, user tombstones, and a little
deployment metadata. Values are opaque bytes (see storage.codec); concurrency
control lives here, not in callers: a stale partition owner or a second writer of
the same journal position is refused by the store itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    """Who owns a partition, and the epoch that owner's writes are fenced with."""

    owner: str
    epoch: int


@dataclass(frozen=True)
class Checkpoint:
    """A journal's durable position: every row at or below ``seq`` is reflected in the
    stored profiles. ``meta`` is the shard's own blob (e.g. remembered batch ids)."""

    seq: int
    meta: bytes


@dataclass(frozen=True)
class ModelSwitch:
    """One entry of the model log: at position ``seq`` serving switched to ``version``
    (``rollback``: by returning to it). The current version follows from the log."""

    seq: int
    version: str
    rollback: bool
    at: float


class Store(ABC):
    """Durable tier. Every method may raise StoreUnavailable; reads of stored blobs
    return bytes and leave decoding (and CorruptRecord) to storage.codec."""

    url: str

    # --- lifecycle ---
    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers a trivial query."""

    @abstractmethod
    def close(self) -> None: ...

    # --- deployment metadata ---
    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def put_meta_if_absent(self, key: str, value: str) -> str:
        """Store ``value`` unless the key exists; return the value now stored."""

    # --- profiles ---
    @abstractmethod
    def get_profiles(self, user_ids: Iterable[str]) -> dict[str, bytes]:
        """Blobs of the users that exist; missing users are simply absent."""

    @abstractmethod
    def put_profiles(self, profiles: Mapping[str, bytes]) -> None: ...

    @abstractmethod
    def delete_profiles(self, user_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def scan_profiles(self) -> Iterator[tuple[str, bytes]]:
        """Every stored profile, in no particular order, streamed."""

    # --- journal (one row per accepted batch) ---
    @abstractmethod
    def append_journal(
        self, journal_id: str, seq: int, blob: bytes, fence: Mapping[int, int] | None = None
    ) -> None:
        """Write ``blob`` at (journal_id, seq).

        Raises JournalConflict if that position is taken (a stale incarnation or a
        seal got there first) or was ever trimmed (a position at or below the
        journal's checkpoint is never free again: a writer lagging behind it would
        write where no reader looks), and StaleEpoch if ``fence`` names a partition
        that ``journal_id`` no longer owns at the given epoch."""

    @abstractmethod
    def read_journal(
        self, journal_id: str, after_seq: int, limit: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """Rows with seq > after_seq in ascending order. Positions are contiguous
        (a writer never skips one), which is how a reader knows where the end is."""

    @abstractmethod
    def trim_journal(self, journal_id: str, up_to_seq: int) -> None:
        """Rows with seq <= up_to_seq are no longer read (and are deleted, possibly a
        whole bucket at a time), and their positions stay taken."""

    # --- checkpoints ---
    @abstractmethod
    def get_checkpoint(self, journal_id: str) -> Checkpoint | None: ...

    @abstractmethod
    def put_checkpoint(self, journal_id: str, checkpoint: Checkpoint) -> None: ...

    # --- partition assignments ---
    @abstractmethod
    def get_assignments(self) -> dict[int, Assignment]: ...

    @abstractmethod
    def claim_partitions(self, owner: str, expected_epochs: Mapping[int, int]) -> dict[int, int]:
        """Give ``owner`` the partitions, compare-and-set on each partition's epoch
        (0 = never assigned). Returns the new epochs; raises StaleEpoch and changes
        nothing if any partition's epoch is not the expected one."""

    # --- item catalog ---
    @abstractmethod
    def upsert_items(self, items: Mapping[str, bytes]) -> None: ...

    @abstractmethod
    def get_items(self, item_ids: Iterable[str]) -> dict[str, bytes]: ...

    @abstractmethod
    def scan_items(self) -> Iterator[tuple[str, bytes]]: ...

    # --- applied lines per (partition, source), kept for a retention ---
    @abstractmethod
    def get_dedup(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Blobs of the keys that exist and have not expired."""

    @abstractmethod
    def put_dedup(self, records: Mapping[str, bytes], ttl_s: int) -> None:
        """Write records that expire ``ttl_s`` seconds after this write."""

    # --- a shard's item signals, in size-bounded chunks ---
    @abstractmethod
    def put_signals(self, journal_id: str, slot: int, chunks: list[bytes]) -> None:
        """Write chunks 0..n-1 of ``slot`` (a checkpoint writes the slot its current
        checkpoint does not point at, then points at it)."""

    @abstractmethod
    def get_signals(self, journal_id: str, slot: int, count: int) -> list[bytes]:
        """Chunks 0..count-1 of ``slot``; raises CorruptRecord if one is missing."""

    # --- quarantined journal rows (kept, reported, never replayed again) ---
    @abstractmethod
    def quarantine(self, journal_id: str, seq: int, blob: bytes, reason: str) -> None: ...

    @abstractmethod
    def get_quarantine(self, journal_id: str) -> list[tuple[int, str]]:
        """(seq, reason) of the rows of ``journal_id`` that were quarantined."""

    # --- model versions: item embeddings a training job published, and the switches ---
    @abstractmethod
    def put_model(self, version: str, info: bytes, chunks: list[bytes]) -> None:
        """Write chunks 0..n-1 of ``version``, then its info row: a version is listed
        only once it is whole. Raises VersionConflict if ``version`` exists (a
        published version never changes: replicas may be serving it)."""

    @abstractmethod
    def get_models(self) -> dict[str, bytes]:
        """The info blob of every published version."""

    @abstractmethod
    def get_model_chunks(self, version: str) -> list[bytes]:
        """Chunks of ``version`` in order; ConfigError for an unknown version,
        CorruptRecord if a chunk is missing."""

    @abstractmethod
    def append_model_switch(self, seq: int, version: str, rollback: bool) -> None:
        """Append a switch at position ``seq`` (1 + the last one); raises
        VersionConflict if another switch took the position first."""

    @abstractmethod
    def get_model_switches(self) -> list[ModelSwitch]:
        """The whole model log, oldest first (one row per switch: small)."""

    # --- exposures and attributions: timed records kept for a retention ---
    @abstractmethod
    def put_exposures(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        """Write exposures ``{rec_id: (at, blob)}`` that expire ``ttl_s`` seconds after
        this write; a rec_id written again is overwritten (a retried flush)."""

    @abstractmethod
    def scan_exposures(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        """(rec_id, at, blob) of the unexpired exposures with since <= at <= until."""

    @abstractmethod
    def put_attributions(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        """Write attributions ``{key: (event time, blob)}`` (key: the event's source and
        line), expiring like exposures; a key written again is overwritten (replay)."""

    @abstractmethod
    def scan_attributions(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        """(key, event time, blob) of the unexpired attributions in [since, until]."""

    # --- the experiment log: every configuration change, in order ---
    @abstractmethod
    def append_experiment_change(self, seq: int, blob: bytes) -> None:
        """Append a change at ``seq`` (1 + the last one), stamped with the store's time
        of writing; raises VersionConflict if another change took the position."""

    @abstractmethod
    def get_experiment_changes(self) -> list[tuple[int, float, bytes]]:
        """(seq, at, blob) of every change, oldest first (one small partition)."""

    # --- tombstones (privacy deletes that replay must not undo) ---
    @abstractmethod
    def add_tombstones(self, deleted_at: Mapping[str, float]) -> None: ...

    @abstractmethod
    def get_tombstones(self, user_ids: Iterable[str]) -> dict[str, float]: ...

    # --- helpers shared by backends ---
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stale_claims(
    expected_epochs: Mapping[int, int], current: Mapping[int, Assignment]
) -> list[str]:
    """The partitions whose stored epoch differs from the claimer's expectation."""
    problems = []
    for partition, expected in sorted(expected_epochs.items()):
        stored = current[partition].epoch if partition in current else 0
        if stored != expected:
            problems.append(f"partition {partition} is at epoch {stored}, expected {expected}")
    return problems


def fence_violations(
    owner: str, fence: Mapping[int, int], current: Mapping[int, Assignment]
) -> list[str]:
    """Why ``owner`` may not write under ``fence`` given the current assignments."""
    problems = []
    for partition, epoch in sorted(fence.items()):
        now = current.get(partition)
        if now is None:
            problems.append(f"partition {partition} is not assigned")
        elif now.owner != owner or now.epoch != epoch:
            problems.append(
                f"partition {partition} is owned by {now.owner} at epoch {now.epoch}, "
                f"not {owner} at epoch {epoch}"
            )
    return problems


def model_chunks(version: str, count: int, found: Mapping[int, bytes]) -> list[bytes]:
    """Chunks 0..count-1 of a model version in order, or CorruptRecord."""
    missing = [n for n in range(count) if n not in found]
    if missing:
        from persona.errors import CorruptRecord

        raise CorruptRecord(f"model {version} lacks chunk {missing[0]} of {count}")
    return [bytes(found[n]) for n in range(count)]


def signal_chunks(
    journal_id: str, slot: int, count: int, found: Mapping[int, bytes]
) -> list[bytes]:
    """Chunks 0..count-1 in order, or CorruptRecord naming the first one missing."""
    missing = [n for n in range(count) if n not in found]
    if missing:
        from persona.errors import CorruptRecord

        raise CorruptRecord(
            f"item signals of {journal_id} (slot {slot}) lack chunk {missing[0]} of {count}"
        )
    return [bytes(found[n]) for n in range(count)]
