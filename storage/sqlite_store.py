"""SqliteStore: the embedded default store, one file in WAL mode, same contract as Cassandra.

Several processes (shard actors, Serve replicas, jobs) may open the same file: WAL
lets readers run beside the one writer, and busy_timeout makes writers queue
instead of failing. Every contract operation is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from persona.errors import (
    ConfigError,
    JournalConflict,
    StaleEpoch,
    StoreUnavailable,
    VersionConflict,
)
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (user_id TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS journal (
    journal_id TEXT NOT NULL, seq INTEGER NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (journal_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    journal_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, meta BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    partition INTEGER PRIMARY KEY, owner TEXT NOT NULL, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (user_id TEXT PRIMARY KEY, deleted_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dedup (
    key TEXT PRIMARY KEY, blob BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_expiry ON dedup (expires_at);
CREATE TABLE IF NOT EXISTS signals (
    journal_id TEXT NOT NULL, slot INTEGER NOT NULL, chunk INTEGER NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (journal_id, slot, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    journal_id TEXT NOT NULL, seq INTEGER NOT NULL, blob BLOB NOT NULL, reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL, PRIMARY KEY (journal_id, seq));
CREATE TABLE IF NOT EXISTS models (
    version TEXT PRIMARY KEY, chunks INTEGER NOT NULL, info BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS model_chunks (
    version TEXT NOT NULL, chunk INTEGER NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (version, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS exposures (
    rec_id TEXT PRIMARY KEY, at REAL NOT NULL, expires_at REAL NOT NULL, blob BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS exposures_at ON exposures (at);
CREATE INDEX IF NOT EXISTS exposures_expiry ON exposures (expires_at);
CREATE TABLE IF NOT EXISTS attributions (
    key TEXT PRIMARY KEY, at REAL NOT NULL, expires_at REAL NOT NULL, blob BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS attributions_at ON attributions (at);
CREATE INDEX IF NOT EXISTS attributions_expiry ON attributions (expires_at);
CREATE TABLE IF NOT EXISTS experiment_changes (
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS model_switches (
    seq INTEGER PRIMARY KEY, version TEXT NOT NULL, rollback INTEGER NOT NULL,
    switched_at REAL NOT NULL);
"""

# SQLite limits host parameters per statement (32766 in modern builds); stay well below.
_CHUNK = 500


def _chunks(values: list, size: int = _CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# PRAGMA synchronous per durability mode (settings.durability). In WAL mode NORMAL
# fsyncs only when the WAL is checkpointed: a commit survives a process crash, but an
# OS crash or power loss may roll back the last commits. FULL fsyncs the WAL on every
# commit, so a commit survives those too.
_SYNCHRONOUS = {"normal": "NORMAL", "strict": "FULL"}


class SqliteStore(Store):
    def __init__(self, path: str | Path, *, timeout_s: float = 30.0, durability: str = "normal"):
        if durability not in _SYNCHRONOUS:
            raise ConfigError(f"durability {durability!r} is not one of {sorted(_SYNCHRONOUS)}")
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # Per connection: every process sets it from the settings it was handed.
            self._db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[durability]}")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:  # OSError: the folder cannot be made
            raise StoreUnavailable(f"cannot open SQLite store at {self.path}: {exc}") from exc
        # One connection shared by this process's threads; SQLite has one writer anyway.
        self._lock = threading.RLock()

    # --- plumbing ---
    def _run(self, fn):
        with self._lock:
            try:
                return fn(self._db)
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc

    def _transaction(self, fn):
        def wrapped(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return self._run(wrapped)

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- meta ---
    def get_meta(self, key: str) -> str | None:
        row = self._run(
            lambda db: db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        )
        return row[0] if row else None

    def put_meta_if_absent(self, key: str, value: str) -> str:
        def op(db):
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

        return self._transaction(op)

    # --- profiles ---
    def _get_many(
        self,
        table: str,
        key: str,
        ids: Iterable[str],
        *,
        value: str = "blob",
        also: str = "",
        params: tuple = (),
    ) -> dict:
        """``{key: value}`` of the rows whose key is in ``ids`` (and ``also`` holds)."""
        wanted = list(dict.fromkeys(ids))

        def op(db):
            found = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {key}, {value} FROM {table} WHERE {key} IN ({marks}){also}"
                found.update(db.execute(sql, [*chunk, *params]).fetchall())
            return found

        return self._run(op)

    def get_profiles(self, user_ids: Iterable[str]) -> dict[str, bytes]:
        return self._get_many("profiles", "user_id", user_ids)

    def put_profiles(self, profiles: Mapping[str, bytes]) -> None:
        rows = list(profiles.items())
        self._transaction(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO profiles (user_id, blob) VALUES (?, ?)", rows
            )
        )

    def delete_profiles(self, user_ids: Iterable[str]) -> None:
        rows = [(u,) for u in user_ids]
        self._transaction(lambda db: db.executemany("DELETE FROM profiles WHERE user_id=?", rows))

    def _scan(self, table: str, key: str, page: int = 1000) -> Iterator[tuple[str, bytes]]:
        last = ""
        while True:
            rows = self._run(
                lambda db, last=last: db.execute(
                    f"SELECT {key}, blob FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?",
                    (last, page),
                ).fetchall()
            )
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1][0]

    def scan_profiles(self) -> Iterator[tuple[str, bytes]]:
        return self._scan("profiles", "user_id")

    # --- journal ---
    def append_journal(
        self, journal_id: str, seq: int, blob: bytes, fence: Mapping[int, int] | None = None
    ) -> None:
        def op(db):
            checkpoint = db.execute(
                "SELECT seq FROM checkpoints WHERE journal_id=?", (journal_id,)
            ).fetchone()
            if checkpoint is not None and seq <= checkpoint[0]:
                # Trimmed positions are not free: a writer that lags behind the
                # checkpoint would write where no reader ever looks.
                raise JournalConflict(
                    f"journal {journal_id} position {seq} is at or below its checkpoint "
                    f"{checkpoint[0]}"
                )
            if fence:
                current = self._assignments(db, list(fence))
                problems = fence_violations(journal_id, fence, current)
                if problems:
                    raise StaleEpoch(f"{journal_id} may not write: " + "; ".join(problems))
            try:
                db.execute(
                    "INSERT INTO journal (journal_id, seq, blob) VALUES (?, ?, ?)",
                    (journal_id, seq, blob),
                )
            except sqlite3.IntegrityError as exc:
                raise JournalConflict(
                    f"journal {journal_id} position {seq} is already written"
                ) from exc

        self._transaction(op)

    def read_journal(
        self, journal_id: str, after_seq: int, limit: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        remaining = limit if limit is not None else -1
        cursor = after_seq
        page = 200
        while remaining != 0:
            take = page if remaining < 0 else min(page, remaining)
            rows = self._run(
                lambda db, cursor=cursor, take=take: db.execute(
                    "SELECT seq, blob FROM journal WHERE journal_id=? AND seq>? "
                    "ORDER BY seq LIMIT ?",
                    (journal_id, cursor, take),
                ).fetchall()
            )
            yield from rows
            if len(rows) < take:
                return
            cursor = rows[-1][0]
            if remaining > 0:
                remaining -= len(rows)

    def trim_journal(self, journal_id: str, up_to_seq: int) -> None:
        self._transaction(
            lambda db: db.execute(
                "DELETE FROM journal WHERE journal_id=? AND seq<=?", (journal_id, up_to_seq)
            )
        )

    # --- checkpoints ---
    def get_checkpoint(self, journal_id: str) -> Checkpoint | None:
        row = self._run(
            lambda db: db.execute(
                "SELECT seq, meta FROM checkpoints WHERE journal_id=?", (journal_id,)
            ).fetchone()
        )
        return Checkpoint(seq=row[0], meta=bytes(row[1])) if row else None

    def put_checkpoint(self, journal_id: str, checkpoint: Checkpoint) -> None:
        self._transaction(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO checkpoints (journal_id, seq, meta) VALUES (?, ?, ?)",
                (journal_id, checkpoint.seq, checkpoint.meta),
            )
        )

    # --- assignments ---
    @staticmethod
    def _assignments(db, partitions: list[int] | None = None) -> dict[int, Assignment]:
        if partitions is None:
            rows = db.execute("SELECT partition, owner, epoch FROM assignments").fetchall()
        else:
            rows = []
            for chunk in _chunks(partitions):
                marks = ",".join("?" * len(chunk))
                rows += db.execute(
                    f"SELECT partition, owner, epoch FROM assignments WHERE partition IN ({marks})",
                    chunk,
                ).fetchall()
        return {p: Assignment(owner=o, epoch=e) for p, o, e in rows}

    def get_assignments(self) -> dict[int, Assignment]:
        return self._run(self._assignments)

    def claim_partitions(self, owner: str, expected_epochs: Mapping[int, int]) -> dict[int, int]:
        def op(db):
            current = self._assignments(db, list(expected_epochs))
            stale = stale_claims(expected_epochs, current)
            if stale:
                raise StaleEpoch(f"{owner} cannot claim: " + "; ".join(stale))
            new = {p: want + 1 for p, want in expected_epochs.items()}
            db.executemany(
                "INSERT OR REPLACE INTO assignments (partition, owner, epoch) VALUES (?, ?, ?)",
                [(p, owner, e) for p, e in new.items()],
            )
            return new

        return self._transaction(op)

    # --- catalog ---
    def upsert_items(self, items: Mapping[str, bytes]) -> None:
        rows = list(items.items())
        self._transaction(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO items (item_id, blob) VALUES (?, ?)", rows
            )
        )

    def get_items(self, item_ids: Iterable[str]) -> dict[str, bytes]:
        return self._get_many("items", "item_id", item_ids)

    def scan_items(self) -> Iterator[tuple[str, bytes]]:
        return self._scan("items", "item_id")

    # --- dedup records ---
    def get_dedup(self, keys: Iterable[str]) -> dict[str, bytes]:
        expiry = (time.time(),)
        return self._get_many("dedup", "key", keys, also=" AND expires_at > ?", params=expiry)

    def put_dedup(self, records: Mapping[str, bytes], ttl_s: int) -> None:
        now = time.time()
        rows = [(k, v, now + ttl_s) for k, v in records.items()]

        def op(db):
            db.executemany(
                "INSERT OR REPLACE INTO dedup (key, blob, expires_at) VALUES (?, ?, ?)", rows
            )
            # Expired records go with the next write (the index keeps this cheap).
            db.execute("DELETE FROM dedup WHERE expires_at <= ?", (now,))

        self._transaction(op)

    # --- item signals ---
    def put_signals(self, journal_id: str, slot: int, chunks: list[bytes]) -> None:
        rows = [(journal_id, slot, n, blob) for n, blob in enumerate(chunks)]
        self._transaction(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO signals (journal_id, slot, chunk, blob) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
        )

    def get_signals(self, journal_id: str, slot: int, count: int) -> list[bytes]:
        rows = dict(
            self._run(
                lambda db: db.execute(
                    "SELECT chunk, blob FROM signals WHERE journal_id=? AND slot=? AND chunk<?",
                    (journal_id, slot, count),
                ).fetchall()
            )
        )
        return signal_chunks(journal_id, slot, count, rows)

    # --- quarantine ---
    def quarantine(self, journal_id: str, seq: int, blob: bytes, reason: str) -> None:
        self._transaction(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO quarantine "
                "(journal_id, seq, blob, reason, quarantined_at) VALUES (?, ?, ?, ?, ?)",
                (journal_id, seq, blob, reason, time.time()),
            )
        )

    def get_quarantine(self, journal_id: str) -> list[tuple[int, str]]:
        return self._run(
            lambda db: db.execute(
                "SELECT seq, reason FROM quarantine WHERE journal_id=? ORDER BY seq", (journal_id,)
            ).fetchall()
        )

    # --- model versions ---
    def put_model(self, version: str, info: bytes, chunks: list[bytes]) -> None:
        def op(db):
            if db.execute("SELECT 1 FROM models WHERE version=?", (version,)).fetchone():
                raise VersionConflict(f"model version {version!r} is already published")
            db.executemany(
                "INSERT OR REPLACE INTO model_chunks (version, chunk, blob) VALUES (?, ?, ?)",
                [(version, n, blob) for n, blob in enumerate(chunks)],
            )
            db.execute(
                "INSERT INTO models (version, chunks, info) VALUES (?, ?, ?)",
                (version, len(chunks), info),
            )

        self._transaction(op)

    def get_models(self) -> dict[str, bytes]:
        rows = self._run(lambda db: db.execute("SELECT version, info FROM models").fetchall())
        return {version: bytes(info) for version, info in rows}

    def get_model_chunks(self, version: str) -> list[bytes]:
        def op(db):
            row = db.execute("SELECT chunks FROM models WHERE version=?", (version,)).fetchone()
            if row is None:
                raise ConfigError(f"no model version {version!r} is published")
            found = db.execute(
                "SELECT chunk, blob FROM model_chunks WHERE version=? AND chunk<?",
                (version, row[0]),
            ).fetchall()
            return row[0], dict(found)

        count, found = self._run(op)
        return model_chunks(version, count, found)

    def append_model_switch(self, seq: int, version: str, rollback: bool) -> None:
        def op(db):
            try:
                db.execute(
                    "INSERT INTO model_switches (seq, version, rollback, switched_at) "
                    "VALUES (?, ?, ?, ?)",
                    (seq, version, int(rollback), time.time()),
                )
            except sqlite3.IntegrityError as exc:
                raise VersionConflict(f"model log position {seq} is already taken") from exc

        self._transaction(op)

    def get_model_switches(self) -> list[ModelSwitch]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT seq, version, rollback, switched_at FROM model_switches ORDER BY seq"
            ).fetchall()
        )
        return [ModelSwitch(seq, version, bool(rb), at) for seq, version, rb, at in rows]

    # --- exposures and attributions ---
    def _put_timed(self, table: str, key: str, records, ttl_s: int) -> None:
        now = time.time()
        rows = [(k, at, now + ttl_s, blob) for k, (at, blob) in records.items()]

        def op(db):
            db.executemany(
                f"INSERT OR REPLACE INTO {table} ({key}, at, expires_at, blob) VALUES (?, ?, ?, ?)",
                rows,
            )
            # The retention: expired records go with the next write (indexed).
            db.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))

        self._transaction(op)

    def _scan_timed(
        self, table: str, key: str, since: float, until: float, page: int = 5000
    ) -> Iterator[tuple[str, float, bytes]]:
        # Keyset pagination on (at, key), from (since, "") (no key is empty).
        last: tuple[float, str] = (since, "")
        while True:
            rows = self._run(
                lambda db, last=last: db.execute(
                    f"SELECT {key}, at, blob FROM {table} WHERE (at, {key}) > (?, ?) "
                    f"AND at <= ? AND expires_at > ? ORDER BY at, {key} LIMIT ?",
                    (*last, until, time.time(), page),
                ).fetchall()
            )
            yield from ((k, at, bytes(blob)) for k, at, blob in rows)
            if len(rows) < page:
                return
            last = (rows[-1][1], rows[-1][0])

    def put_exposures(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        self._put_timed("exposures", "rec_id", records, ttl_s)

    def scan_exposures(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        return self._scan_timed("exposures", "rec_id", since, until)

    def put_attributions(self, records: Mapping[str, tuple[float, bytes]], ttl_s: int) -> None:
        self._put_timed("attributions", "key", records, ttl_s)

    def scan_attributions(self, since: float, until: float) -> Iterator[tuple[str, float, bytes]]:
        return self._scan_timed("attributions", "key", since, until)

    # --- experiment log ---
    def append_experiment_change(self, seq: int, blob: bytes) -> None:
        def op(db):
            try:
                db.execute(
                    "INSERT INTO experiment_changes (seq, at, blob) VALUES (?, ?, ?)",
                    (seq, time.time(), blob),
                )
            except sqlite3.IntegrityError as exc:
                raise VersionConflict(f"experiment log position {seq} is already taken") from exc

        self._transaction(op)

    def get_experiment_changes(self) -> list[tuple[int, float, bytes]]:
        rows = self._run(
            lambda db: db.execute(
                "SELECT seq, at, blob FROM experiment_changes ORDER BY seq"
            ).fetchall()
        )
        return [(seq, at, bytes(blob)) for seq, at, blob in rows]

    # --- tombstones ---
    def add_tombstones(self, deleted_at: Mapping[str, float]) -> None:
        rows = list(deleted_at.items())
        self._transaction(
            lambda db: db.executemany(
                "INSERT OR REPLACE INTO tombstones (user_id, deleted_at) VALUES (?, ?)", rows
            )
        )

    def get_tombstones(self, user_ids: Iterable[str]) -> dict[str, float]:
        return self._get_many("tombstones", "user_id", user_ids, value="deleted_at")
