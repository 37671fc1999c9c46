"""CassandraStore: the production store, on the DataStax/Apache Python driver.

Prepared statements for every hot path; bulk reads and writes go out with bounded
concurrency (execute_concurrent), one row per user (one blob, not a row per
feature); journal appends and partition claims are lightweight transactions so a
stale writer is refused by Cassandra itself. Driver timeouts and unavailability
surface as StoreUnavailable with the node list and the cause.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    DriverException,
    OperationTimedOut,
    Timeout,
    Unavailable,
)
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.concurrent import execute_concurrent, execute_concurrent_with_args
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    RoundRobinPolicy,
    TokenAwarePolicy,
)
from cassandra.query import BatchStatement, BatchType, SimpleStatement, named_tuple_factory

from persona.errors import (
    ConfigError,
    JournalConflict,
    StaleEpoch,
    StoreUnavailable,
    VersionConflict,
)
from storage import cql
from storage.base import (
    Assignment,
    Checkpoint,
    ModelSwitch,
    Store,
    fence_violations,
    model_chunks,
    signal_chunks,
    stale_claims,
)

log = logging.getLogger(__name__)

_ROW_CLASSES: dict[tuple[str, ...], type] = {}
# The execution profile of bulk reads (_concurrent).
_BULK = "bulk"


def _row_factory(colnames, rows):
    """The driver's named-tuple rows, with the row class made once per column list:
    its own factory builds a namedtuple class for every result page (~100 us each,
    a tenth of the client's CPU on the ingest path's many small reads)."""
    key = tuple(colnames)
    row_class = _ROW_CLASSES.get(key)
    if row_class is None:
        if len(_ROW_CLASSES) > 1_000:  # only this module's statements come here
            _ROW_CLASSES.clear()
        # Made from a placeholder row: most bulk reads find nothing (new users).
        placeholder = named_tuple_factory(colnames, [(None,) * len(colnames)])
        row_class = _ROW_CLASSES[key] = type(placeholder[0])
    return [row_class(*row) for row in rows]


# Item-signal chunks (~512 KiB each) written or read at once: ~4 MiB in flight.
SIGNAL_CHUNKS_IN_FLIGHT = 8

_UNAVAILABLE = (
    NoHostAvailable,
    OperationTimedOut,
    Timeout,
    Unavailable,
    CoordinationFailure,
)


@dataclass(frozen=True)
class CassandraOptions:
    hosts: tuple[str, ...]
    port: int
    keyspace: str
    replication_factor: int = 1
    strategy: str = "SimpleStrategy"
    datacenter: str | None = None
    consistency: str = "LOCAL_QUORUM"
    timeout_s: float = 10.0
    write_concurrency: int = 64
    journal_bucket_rows: int = 64
    # Multi-key requests: keys per IN query, rows and bytes per unlogged batch.
    read_keys_per_query: int = 100
    batch_rows: int = 100
    batch_bytes: int = 40 * 1024
    # settings.durability; "strict" is checked against the cluster at connect.
    durability: str = "normal"

    def replication_map(self) -> str:
        if self.strategy == "SimpleStrategy":
            return f"{{'class': 'SimpleStrategy', 'replication_factor': {self.replication_factor}}}"
        if not self.datacenter:
            raise ConfigError("NetworkTopologyStrategy needs datacenter=<name> in the store URL")
        return (
            f"{{'class': 'NetworkTopologyStrategy', "
            f"'{self.datacenter}': {self.replication_factor}}}"
        )


class CassandraStore(Store):
    def __init__(self, options: CassandraOptions):
        self.options = options
        self.url = (
            f"cassandra://{','.join(options.hosts)}:{options.port}/{options.keyspace}"
            f"?replication={options.replication_factor}&consistency={options.consistency}"
        )
        try:
            consistency = ConsistencyLevel.name_to_value[options.consistency]
        except KeyError as exc:
            names = ", ".join(sorted(ConsistencyLevel.name_to_value))
            raise ConfigError(
                f"unknown consistency {options.consistency!r}; use one of {names}"
            ) from exc
        serial = (
            ConsistencyLevel.SERIAL
            if consistency in (ConsistencyLevel.QUORUM, ConsistencyLevel.ALL)
            else ConsistencyLevel.LOCAL_SERIAL
        )
        balancing = (
            TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=options.datacenter))
            if options.datacenter
            else TokenAwarePolicy(RoundRobinPolicy())
        )
        profile = ExecutionProfile(
            load_balancing_policy=balancing,
            consistency_level=consistency,
            serial_consistency_level=serial,
            request_timeout=options.timeout_s,
        )
        # Bulk reads (many small pages): the same, with row classes made once. The
        # default profile keeps the driver's factory, which was_applied requires.
        bulk = ExecutionProfile(
            load_balancing_policy=balancing,
            consistency_level=consistency,
            serial_consistency_level=serial,
            request_timeout=options.timeout_s,
            row_factory=_row_factory,
        )
        self._cluster = Cluster(
            contact_points=list(options.hosts),
            port=options.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile, _BULK: bulk},
            connect_timeout=options.timeout_s,
            # Schema agreement and topology refreshes are slow on a busy laptop.
            control_connection_timeout=options.timeout_s,
            # After an outage, find the nodes again within seconds (the default backs
            # off to 10 minutes), so writes resume without restarting anything.
            reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.5, max_delay=5.0),
        )
        with self._errors("connect"):
            self._session = self._cluster.connect()
            self._create_schema()
        self._prepared = {}
        self._check_durability()

    # --- plumbing ---
    @contextmanager
    def _errors(self, what: str):
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"Cassandra at {','.join(self.options.hosts)}:{self.options.port} "
                f"could not {what}: {type(exc).__name__}: {exc}"
            ) from exc
        except DriverException as exc:
            raise StoreUnavailable(f"Cassandra driver error during {what}: {exc}") from exc

    def _stmt(self, text: str):
        stmt = self._prepared.get(text)
        if stmt is None:
            with self._errors("prepare a statement"):
                stmt = self._prepared[text] = self._session.prepare(text)
        return stmt

    def _create_schema(self) -> None:
        ks = self.options.keyspace
        self._session.execute(
            cql.KEYSPACE.format(keyspace=ks, replication=self.options.replication_map())
        )
        self._session.set_keyspace(ks)
        for ddl in cql.TABLES:
            self._session.execute(ddl)
        journal = self._cluster.metadata.keyspaces[ks].tables.get("journal")
        if journal is not None and "trimmed" not in journal.columns:
            self._session.execute(cql.ADD_TRIMMED_MARKER)

    def _concurrent(
        self, text: str, params: list[tuple], what: str, concurrency: int | None = None
    ) -> list:
        if not params:
            return []
        with self._errors(what):
            results = execute_concurrent_with_args(
                self._session,
                self._stmt(text),
                params,
                concurrency=concurrency or self.options.write_concurrency,
                raise_on_first_error=True,
                results_generator=False,
                execution_profile=_BULK,
            )
        return [result for _ok, result in results]

    def _bucket(self, seq: int) -> int:
        return seq // self.options.journal_bucket_rows

    def ping(self) -> None:
        with self._errors("answer a ping"):
            self._session.execute("SELECT release_version FROM system.local")

    def close(self) -> None:
        self._cluster.shutdown()

    def _check_durability(self) -> None:
        """Strict durability is server configuration (commitlog_sync batch or group on
        every replica) plus acks from a quorum of replicas; the store cannot change
        either, so it warns when what it sees falls short. A single node is fine."""
        o = self.options
        if o.durability not in ("normal", "strict"):
            raise ConfigError(f"durability {o.durability!r} is not one of ['normal', 'strict']")
        if o.durability != "strict":
            return
        quorum = o.replication_factor // 2 + 1
        acks = {"ANY": 0, "ONE": 1, "LOCAL_ONE": 1, "TWO": 2, "THREE": 3}.get(o.consistency)
        if acks is not None and acks < quorum:
            log.warning(
                "strict durability with consistency %s and replication %d: an acknowledged "
                "write may be on fewer than a quorum of replicas; use LOCAL_QUORUM or QUORUM",
                o.consistency,
                o.replication_factor,
            )
        mode = self.commitlog_sync()
        if mode not in (None, "batch", "group"):
            log.warning(
                "strict durability, but the Cassandra node answering syncs its commitlog "
                "%s: an acknowledged write may be lost if every replica loses power; set "
                "commitlog_sync: batch (or group) in each node's cassandra.yaml",
                mode,
            )

    def commitlog_sync(self) -> str | None:
        """The commitlog sync mode of the node that answers (periodic, batch or group),
        or None where Cassandra has no system_views (before 4.0)."""
        try:
            row = self._session.execute(
                "SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'"
            ).one()
        except DriverException:
            return None
        return row.value if row else None

    def keyspace_replication(self) -> dict[str, str]:
        """The replication map Cassandra holds for this keyspace (for checks and tests)."""
        with self._errors("read the keyspace schema"):
            row = self._session.execute(
                self._stmt(cql.KEYSPACE_REPLICATION), (self.options.keyspace,)
            ).one()
        return dict(row.replication) if row else {}

    # --- meta ---
    def get_meta(self, key: str) -> str | None:
        with self._errors("read metadata"):
            row = self._session.execute(self._stmt(cql.GET_META), (key,)).one()
        return row.value if row else None

    def put_meta_if_absent(self, key: str, value: str) -> str:
        with self._errors("write metadata"):
            result = self._session.execute(self._stmt(cql.INSERT_META_IF_ABSENT), (key, value))
        return value if result.was_applied else result.one().value

    # --- bulk reads and writes, grouped by replica ---
    def _by_replica(self, keys: Iterable[str]) -> list[list[str]]:
        """Keys grouped by the node that holds them, so that one multi-key request
        (an IN query or an unlogged batch) touches one replica set, not the cluster."""
        metadata = self._cluster.metadata
        if len(metadata.all_hosts()) <= 1:
            return [list(keys)]  # one node holds everything: no token per key to compute
        groups: dict[object, list[str]] = {}
        for key in keys:
            replicas = metadata.get_replicas(self.options.keyspace, key.encode())
            groups.setdefault(replicas[0] if replicas else None, []).append(key)
        return list(groups.values())

    def _get_many(self, text: str, ids: Iterable[str], what: str) -> dict:
        wanted = list(dict.fromkeys(ids))
        step = self.options.read_keys_per_query
        params = [
            (group[at : at + step],)
            for group in self._by_replica(wanted)
            for at in range(0, len(group), step)
        ]
        found = {}
        for rows in self._concurrent(text, params, what):
            for key, value in rows:
                found[key] = value
        return found

    def _write_many(self, text: str, rows: list[tuple], what: str) -> None:
        """Unlogged batches of rows that share a replica, each under the byte budget
        (Cassandra's batch_size_fail_threshold defaults to 50 KiB)."""
        if not rows:
            return
        statement = self._stmt(text)
        by_key = {row[0]: row for row in rows}
        batches = []
        for group in self._by_replica(by_key):
            batch, size = BatchStatement(batch_type=BatchType.UNLOGGED), 0
            for key in group:
                row = by_key[key]
                row_size = sum(len(v) for v in row if isinstance(v, bytes | str)) + 16
                if len(batch) and (
                    size + row_size > self.options.batch_bytes
                    or len(batch) >= self.options.batch_rows
                ):
                    batches.append(batch)
                    batch, size = BatchStatement(batch_type=BatchType.UNLOGGED), 0
                batch.add(statement, row)
                size += row_size
            batches.append(batch)
        with self._errors(what):
            execute_concurrent(
                self._session,
                [(b, None) for b in batches],
                concurrency=self.options.write_concurrency,
                raise_on_first_error=True,
                results_generator=False,
            )

    # --- profiles ---
    def get_profiles(self, user_ids: Iterable[str]) -> dict[str, bytes]:
        return self._get_many(cql.GET_PROFILES, user_ids, "read profiles")

    def put_profiles(self, profiles: Mapping[str, bytes]) -> None:
        self._write_many(cql.PUT_PROFILE, list(profiles.items()), "write profiles")

    def delete_profiles(self, user_ids: Iterable[str]) -> None:
        self._write_many(cql.DELETE_PROFILE, [(u,) for u in user_ids], "delete profiles")

    def _scan(self, text: str, what: str) -> Iterator[tuple[str, bytes]]:
        statement = SimpleStatement(text, fetch_size=1000)
        with self._errors(what):
            yield from ((key, blob) for key, blob in self._session.execute(statement))

    def scan_profiles(self) -> Iterator[tuple[str, bytes]]:
        return self._scan(cql.SCAN_PROFILES, "scan profiles")

    # --- journal ---
    def _fetch_assignments(self, partitions: list[int] | None) -> dict[int, Assignment]:
        with self._errors("read partition assignments"):
            if partitions is None:
                rows = self._session.execute(self._stmt(cql.GET_ASSIGNMENTS), (cql.DEPLOYMENT,))
            else:
                rows = self._session.execute(
                    self._stmt(cql.GET_SOME_ASSIGNMENTS), (cql.DEPLOYMENT, partitions)
                )
            return {r.partition: Assignment(owner=r.owner, epoch=r.epoch) for r in rows}

    def append_journal(
        self, journal_id: str, seq: int, blob: bytes, fence: Mapping[int, int] | None = None
    ) -> None:
        if fence:
            # Check, then write: a move that lands between the two is caught by the
            # journal seal the new owner writes (see README, "Ownership and fencing").
            problems = fence_violations(journal_id, fence, self._fetch_assignments(list(fence)))
            if problems:
                raise StaleEpoch(f"{journal_id} may not write: " + "; ".join(problems))
        with self._errors(f"append to journal {journal_id}"):
            result = self._session.execute(
                self._stmt(cql.APPEND_JOURNAL), (blob, journal_id, self._bucket(seq), seq)
            )
        if not result.was_applied:
            raise JournalConflict(
                f"journal {journal_id} position {seq} is already written or trimmed"
            )

    def _trimmed_to(self, journal_id: str) -> int:
        with self._errors(f"read journal {journal_id}"):
            row = self._session.execute(self._stmt(cql.GET_CHECKPOINT), (journal_id,)).one()
        return row.trimmed_to if row and row.trimmed_to is not None else -1

    def read_journal(
        self, journal_id: str, after_seq: int, limit: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        rows_per_bucket = self.options.journal_bucket_rows
        remaining = limit if limit is not None else -1
        # Trimmed buckets are gone, and an empty bucket reads as the end: start past them.
        cursor = max(after_seq, self._trimmed_to(journal_id))
        while remaining != 0:
            bucket = self._bucket(cursor + 1)
            take = rows_per_bucket if remaining < 0 else min(rows_per_bucket, remaining)
            with self._errors(f"read journal {journal_id}"):
                rows = list(
                    self._session.execute(
                        self._stmt(cql.READ_JOURNAL_BUCKET), (journal_id, bucket, cursor, take)
                    )
                )
            rows = [row for row in rows if row.seq is not None]  # not a bucket's marker
            for row in rows:
                yield row.seq, row.blob
            if not rows:
                return
            cursor = rows[-1].seq
            if remaining > 0:
                remaining -= len(rows)
            bucket_last = (bucket + 1) * rows_per_bucket - 1
            # Positions are contiguous: a bucket that stops short of its last slot
            # (and was read whole) is the end of the journal.
            if cursor < bucket_last and len(rows) < take:
                return

    def trim_journal(self, journal_id: str, up_to_seq: int) -> None:
        """Drop the buckets whose every position is at or below ``up_to_seq``, each
        marked trimmed in the same partition-local batch (so no append can reuse a
        position in it); rows of the bucket still being written stay until it is
        whole: they hold their positions against a writer that lags behind."""
        trimmed_to = self._trimmed_to(journal_id)
        if up_to_seq <= trimmed_to:
            return
        rows_per_bucket = self.options.journal_bucket_rows
        # From the bucket the last trim stopped in (it may have been left whole).
        first = self._bucket(max(trimmed_to, 0))
        last_whole = (up_to_seq + 1) // rows_per_bucket - 1
        mark, drop = self._stmt(cql.MARK_BUCKET_TRIMMED), self._stmt(cql.DELETE_BUCKET_ROWS)
        batches = []
        for bucket in range(first, last_whole + 1):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            batch.add(mark, (journal_id, bucket))
            batch.add(drop, (journal_id, bucket, bucket * rows_per_bucket))
            batches.append((batch, None))
        with self._errors(f"trim journal {journal_id}"):
            if batches:
                execute_concurrent(
                    self._session,
                    batches,
                    concurrency=self.options.write_concurrency,
                    raise_on_first_error=True,
                    results_generator=False,
                )
            # Readers start after this position (rows kept in a partial bucket included).
            self._session.execute(self._stmt(cql.SET_TRIMMED_TO), (up_to_seq, journal_id))

    # --- checkpoints ---
    def get_checkpoint(self, journal_id: str) -> Checkpoint | None:
        with self._errors("read a checkpoint"):
            row = self._session.execute(self._stmt(cql.GET_CHECKPOINT), (journal_id,)).one()
        if row is None or row.seq is None:
            return None
        return Checkpoint(seq=row.seq, meta=row.meta or b"")

    def put_checkpoint(self, journal_id: str, checkpoint: Checkpoint) -> None:
        with self._errors("write a checkpoint"):
            self._session.execute(
                self._stmt(cql.PUT_CHECKPOINT), (checkpoint.seq, checkpoint.meta, journal_id)
            )

    # --- assignments ---
    def get_assignments(self) -> dict[int, Assignment]:
        return self._fetch_assignments(None)

    def claim_partitions(self, owner: str, expected_epochs: Mapping[int, int]) -> dict[int, int]:
        if not expected_epochs:
            return {}
        # All assignment rows share one Cassandra partition, so this conditional batch
        # is atomic: every claim applies or none does.
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        new = {}
        for partition, expected in sorted(expected_epochs.items()):
            new[partition] = expected + 1
            if expected == 0:
                batch.add(
                    self._stmt(cql.CLAIM_NEW_PARTITION), (cql.DEPLOYMENT, partition, owner, 1)
                )
            else:
                batch.add(
                    self._stmt(cql.CLAIM_PARTITION),
                    (owner, expected + 1, cql.DEPLOYMENT, partition, expected),
                )
        with self._errors("claim partitions"):
            result = self._session.execute(batch)
        if not result.was_applied:
            stale = stale_claims(expected_epochs, self._fetch_assignments(list(expected_epochs)))
            raise StaleEpoch(f"{owner} cannot claim: " + "; ".join(stale or ["lost a race"]))
        return new

    # --- catalog ---
    def upsert_items(self, items: Mapping[str, bytes]) -> None:
        self._write_many(cql.PUT_ITEM, list(items.items()), "write items")

    def get_items(self, item_ids: Iterable[str]) -> dict[str, bytes]:
        return self._get_many(cql.GET_ITEMS, item_ids, "read items")

    def scan_items(self) -> Iterator[tuple[str, bytes]]:
        return self._scan(cql.SCAN_ITEMS, "scan items")

    # --- dedup records ---
    def get_dedup(self, keys: Iterable[str]) -> dict[str, bytes]:
        return self._get_many(cql.GET_DEDUP, keys, "read dedup records")

    def put_dedup(self, records: Mapping[str, bytes], ttl_s: int) -> None:
        rows = [(k, v, int(ttl_s)) for k, v in records.items()]
        self._write_many(cql.PUT_DEDUP, rows, "write dedup records")

    # --- item signals ---
    def put_signals(self, journal_id: str, slot: int, chunks: list[bytes]) -> None:
        # One statement per chunk (a chunk is far above the batch size threshold), a
        # few at a time: 64 chunks of ~512 KiB in flight exceed what a node accepts
        # from one client (native_transport_max_request_data_in_flight_per_ip, heap/40),
        # and the driver then fails the requests it cannot send (measured: bench/).
        params = [(journal_id, slot, n, blob) for n, blob in enumerate(chunks)]
        self._concurrent(
            cql.PUT_SIGNALS,
            params,
            f"write item signals of {journal_id}",
            concurrency=SIGNAL_CHUNKS_IN_FLIGHT,
        )

    def get_signals(self, journal_id: str, slot: int, count: int) -> list[bytes]:
        params = [(journal_id, slot, n) for n in range(count)]
        found = {}
        chunks = self._concurrent(
            cql.GET_SIGNALS, params, "read item signals", concurrency=SIGNAL_CHUNKS_IN_FLIGHT
        )
        for n, rows in enumerate(chunks):
            row = rows.one()
            if row is not None:
                found[n] = row.blob
        return signal_chunks(journal_id, slot, count, found)

    # --- quarantine ---
    def quarantine(self, journal_id: str, seq: int, blob: bytes, reason: str) -> None:
        with self._errors(f"quarantine journal {journal_id} row {seq}"):
            self._session.execute(
                self._stmt(cql.PUT_QUARANTINE), (journal_id, seq, blob, reason, time.time())
            )

    def get_quarantine(self, journal_id: str) -> list[tuple[int, str]]:
        with self._errors("read quarantined rows"):
            rows = self._session.execute(self._stmt(cql.GET_QUARANTINE), (journal_id,))
            return [(r.seq, r.reason) for r in rows]

    # --- model versions ---
    def _model_chunk_count(self, version: str) -> int | None:
        with self._errors(f"read model {version}"):
            row = self._session.execute(self._stmt(cql.GET_MODEL), (version,)).one()
        return row.chunks if row else None

    def put_model(self, version: str, info: bytes, chunks: list[bytes]) -> None:
        # Checked first so that a second publisher of the name never overwrites the
        # chunks of a version being served; the info row's own condition settles a race.
        if self._model_chunk_count(version) is not None:
            raise VersionConflict(f"model version {version!r} is already published")
        params = [(version, n, blob) for n, blob in enumerate(chunks)]
        self._concurrent(
            cql.PUT_MODEL_CHUNK,
            params,
            f"write model {version}",
            concurrency=SIGNAL_CHUNKS_IN_FLIGHT,
        )
        with self._errors(f"write model {version}"):
            result = self._session.execute(self._stmt(cql.PUT_MODEL), (version, len(chunks), info))
        if not result.was_applied:
            raise VersionConflict(f"model version {version!r} is already published")

    def get_models(self) -> dict[str, bytes]:
        return dict(self._scan(cql.SCAN_MODELS, "list model versions"))

    def get_model_chunks(self, version: str) -> list[bytes]:
        count = self._model_chunk_count(version)
        if count is None:
            raise ConfigError(f"no model version {version!r} is published")
        params = [(version, n) for n in range(count)]
        results = self._concurrent(
            cql.GET_MODEL_CHUNK, params, f"read model {version}", SIGNAL_CHUNKS_IN_FLIGHT
        )
        found = {}
        for n, rows in enumerate(results):
            row = rows.one()
            if row is not None:
                found[n] = row.blob
        return model_chunks(version, count, found)

    def append_model_switch(self, seq: int, version: str, rollback: bool) -> None:
        with self._errors("switch the model"):
            result = self._session.execute(
                self._stmt(cql.APPEND_MODEL_SWITCH),
                (cql.DEPLOYMENT, seq, version, rollback, time.time()),
            )
        if not result.was_applied:
            raise VersionConflict(f"model log position {seq} is already taken")

    def get_model_switches(self) -> list[ModelSwitch]:
        with self._errors("read the model log"):
            rows = self._session.execute(self._stmt(cql.GET_MODEL_SWITCHES), (cql.DEPLOYMENT,))
            return [ModelSwitch(r.seq, r.version, bool(r.rollback), r.switched_at) for r in rows]

    # --- exposures and attributions ---
    def _put_timed(self, text: str, records, ttl_s: int, what: str) -> None:
        rows = [
            (int(at // 3600), zlib.crc32(key.encode()) % cql.TIMED_SLOTS, key, at, blob, int(ttl_s))
            for key, (at, blob) in records.items()
        ]
        # One statement per row: a row's partition is (hour, slot), so rows of one
        # flush spread over 16 partitions per hour; unlogged batches would not help.
        self._concurrent(text, rows, what)

    def _scan_timed(
        self, text: str, since: float, until: float, what: str
    ) -> Iterator[tuple[str, float, bytes]]:
        hours = range(int(since // 3600), int(until // 3600) + 1)
        for hour in hours:  # hour by hour: bounded memory, in time order per hour
            params = [(hour, slot) for slot in range(cql.TIMED_SLOTS)]
            for rows in self._concurrent(text, params, what):
                for key, at, blob in rows:
                    if since <= at <= until:
                        yield key, at, bytes(blob)

    def put_exposures(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        self._put_timed(cql.PUT_EXPOSURE, records, ttl_s, "write exposures")

    def scan_exposures(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        return self._scan_timed(cql.SCAN_EXPOSURES, since, until, "read exposures")

    def put_attributions(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        self._put_timed(cql.PUT_ATTRIBUTION, records, ttl_s, "write attributions")

    def scan_attributions(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        return self._scan_timed(cql.SCAN_ATTRIBUTIONS, since, until, "read attributions")

    # --- experiment log ---
    def append_experiment_change(self, seq: int, blob: bytes) -> None:
        with self._errors("change the experiment"):
            result = self._session.execute(
                self._stmt(cql.APPEND_EXPERIMENT_CHANGE), (cql.DEPLOYMENT, seq, time.time(), blob)
            )
        if not result.was_applied:
            raise VersionConflict(f"experiment log position {seq} is already taken")

    def get_experiment_changes(self) -> list[tuple[int, float, bytes]]:
        with self._errors("read the experiment log"):
            rows = self._session.execute(self._stmt(cql.GET_EXPERIMENT_CHANGES), (cql.DEPLOYMENT,))
            return [(r.seq, r.at, bytes(r.blob)) for r in rows]

    # --- tombstones ---
    def add_tombstones(self, deleted_at: Mapping[str, float]) -> None:
        self._write_many(cql.PUT_TOMBSTONE, list(deleted_at.items()), "write tombstones")

    def get_tombstones(self, user_ids: Iterable[str]) -> dict[str, float]:
        return self._get_many(cql.GET_TOMBSTONES, user_ids, "read tombstones")
