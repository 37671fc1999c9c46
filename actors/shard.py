"""ProfileShard: the Ray actor that owns a set of partitions and their users' profiles.

A named, detached, restartable async actor. Memory changes happen on the event
loop (so they are atomic between awaits); store I/O runs in threads, so reads are
served while a batch is being journaled or a checkpoint is being written. One
asyncio lock orders writers (journal positions are contiguous); reads take no lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

import ray
from ray.util.metrics import Gauge

from actors.shard_state import Ack, PreparedBatch, ShardState
from persona.errors import JournalConflict, PersonaError
from persona.settings import Settings
from storage import open_store

log = logging.getLogger(__name__)

CHECKPOINT_RETRY_MAX_S = 30.0


@dataclasses.dataclass
class Prefetched:
    """What a batch's prefetch learnt: users the store did not hold, as of these
    partition epochs and this many evictions."""

    absent: set[str]
    epochs: dict[int, int]
    evicted: int


class ProfileShard:
    def __init__(self, name: str, settings: dict, partitions: int):
        self.settings = Settings(**settings)
        self.state = ShardState(name, open_store(settings=self.settings), self.settings, partitions)
        started = time.monotonic()
        replayed = self.state.recover()
        self.recovery_s = time.monotonic() - started
        log.info("%s recovered: %d journal rows in %.2fs", name, replayed, self.recovery_s)
        self._write_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()
        self._ticker: asyncio.Task | None = None
        self._checkpoint_failures = 0
        self._pending_writes = 0
        self._gauges = {
            key: Gauge(f"persona_shard_{key}", description=text, tag_keys=("shard",))
            for key, text in (
                ("resident_profiles", "profiles held in memory"),
                ("dirty_profiles", "profiles changed since the last checkpoint"),
                ("pending_writes", "batches queued for this shard's journal"),
                ("evictions", "profiles passivated under the resident cap (since start)"),
                ("load_misses", "reads of users not resident, loaded from the store"),
            )
        }

    def _report(self) -> None:
        tags = {"shard": self.state.name}
        self._gauges["resident_profiles"].set(len(self.state.table), tags=tags)
        self._gauges["dirty_profiles"].set(self.state.table.dirty_count(), tags=tags)
        self._gauges["pending_writes"].set(self._pending_writes, tags=tags)
        self._gauges["evictions"].set(self.state.totals["evicted"], tags=tags)
        self._gauges["load_misses"].set(self.state.totals["load_misses"], tags=tags)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Checkpoint on the interval or when enough profiles are dirty; back off on errors."""
        while True:
            await asyncio.sleep(1.0)
            self._report()
            state = self.state
            due = time.monotonic() - state.last_checkpoint_at >= self.settings.checkpoint_interval_s
            dirty = state.table.dirty_count()
            if dirty and (due or dirty >= self.settings.checkpoint_dirty_threshold):
                try:
                    await self.checkpoint()
                    self._checkpoint_failures = 0
                except PersonaError as exc:
                    self._checkpoint_failures += 1
                    delay = min(CHECKPOINT_RETRY_MAX_S, 2.0**self._checkpoint_failures)
                    log.warning(
                        "%s checkpoint failed (%s); retrying in %.0fs", state.name, exc, delay
                    )
                    await asyncio.sleep(delay)

    # --- writes ---
    async def apply_batch(self, batch_id: str, events, validated: bool = False) -> dict:
        """Journal then apply a batch; a batch id seen before is acknowledged as duplicate."""
        self._ensure_ticker()
        self._pending_writes += 1
        try:
            return await self._apply_batch(batch_id, events, validated)
        finally:
            self._pending_writes -= 1

    async def _apply_batch(self, batch_id: str, events, validated: bool) -> dict:
        looked_up = await self._prefetch(events) if validated else None
        async with self._write_lock:
            for attempt in range(2):
                prepared = self.state.prepare(batch_id, events, validated=validated)
                if isinstance(prepared, Ack):
                    return prepared.as_dict()
                await self._load_for(prepared, looked_up)
                try:
                    await asyncio.to_thread(self.state.append, prepared)
                except JournalConflict:
                    if attempt:
                        raise
                    # Someone else wrote our next position: take their rows, then retry.
                    self.state.catch_up()
                    continue
                ack = self.state.commit(prepared)
                break
        await self._passivate()
        if self.state.table.dirty_count() >= self.settings.checkpoint_dirty_threshold:
            asyncio.get_running_loop().create_task(self._checkpoint_quietly())
        return ack.as_dict()

    async def _load_for(self, batch: PreparedBatch, looked_up: Prefetched | None) -> None:
        state = self.state
        users = list(batch.users)
        if looked_up is not None and looked_up.evicted == state.totals["evicted"]:
            # Users the prefetch found absent from the store are still absent if their
            # partition has not changed hands since (only the owner writes them) and
            # nothing was evicted (eviction writes users and drops them from memory).
            owned, epochs = state.owned, looked_up.epochs
            users = [
                u
                for u, p in batch.users.items()
                if u not in looked_up.absent or owned.get(p) != epochs.get(p)
            ]
        await state.load(users)
        await state.load_item_vectors(e[1] for e in batch.events)

    async def _prefetch(self, events) -> Prefetched:
        """Before queueing for the write lock, read what a pre-validated batch needs
        from the store, so that the next batch's reads overlap this one's journal
        append. Whatever is still missing under the lock is read there."""
        state = self.state
        epochs, evicted = dict(state.owned), state.totals["evicted"]
        users = {e[0] for e in events}
        absent = await state.load([u for u in users if state.partition(u) in epochs])
        await state.load_item_vectors(e[1] for e in events)
        return Prefetched(absent=set(absent), epochs=epochs, evicted=evicted)

    async def delete_user(self, user_id: str) -> bool:
        """Privacy delete: journal it, drop it from memory and store, leave a tombstone."""
        async with self._write_lock, self._checkpoint_lock:
            await asyncio.to_thread(self.state.journal_delete, user_id)
            stored = await asyncio.to_thread(self.state.store.get_profiles, [user_id])
            await asyncio.to_thread(self.state.store.delete_profiles, [user_id])
            await asyncio.to_thread(self.state.store.add_tombstones, {user_id: time.time()})
            # Forgotten after the store delete: a load that read the old row is either
            # installed before this (and dropped here) or after it (and refused).
            return self.state.forget_deleted(user_id) or bool(stored)

    # --- reads ---
    async def get_profiles(self, user_ids: list[str]) -> dict:
        """``{"profiles": records of the users that exist, "moved": users whose partition
        this shard does not own (the caller re-reads the assignment and asks again)}``."""
        self._ensure_ticker()
        state = self.state
        partition = {u: state.partition(u) for u in user_ids}
        missing = state.missing_users(u for u in user_ids if partition[u] in state.owned)
        if missing:
            await state.load(missing)
        # Ownership is read after the load: a partition handed over while the store was
        # read is the new owner's to answer.
        moved = [u for u in user_ids if partition[u] not in state.owned]
        wanted = [u for u in user_ids if partition[u] in state.owned]
        state.touch(wanted)
        found = {u: r for u in wanted if (r := state.table.record(u)) is not None}
        await self._passivate()
        return {"profiles": found, "moved": moved}

    # --- passivation ---
    async def _passivate(self) -> None:
        """Keep resident profiles under the cap: write dirty victims, then drop them.
        Holds the checkpoint lock so a checkpoint never skips a profile evicted under it."""
        if not self.state.eviction_candidates():
            return
        async with self._checkpoint_lock:
            victims = self.state.eviction_candidates()
            blobs, positions = self.state.encode_for_eviction(victims)
            if blobs:
                await asyncio.to_thread(self.state.store.put_profiles, blobs)
            self.state.evict(victims, positions)

    # --- partition hand-over ---
    async def release_partitions(self, partitions: list[int]) -> dict[int, int]:
        """Stop writes to the partitions, checkpoint, forget their users; return the
        epochs they were held at (the mover advances them in the store)."""
        async with self._write_lock:
            epochs = self.state.stop_owning(partitions)
            await self.checkpoint()
            self.state.forget_partitions(epochs)
        return epochs

    async def acquire_partitions(self, epochs: dict[int, int], previous_owner: str) -> int:
        """Own partitions at their new epochs, taking over their remembered batch ids."""
        async with self._write_lock:
            ids = await asyncio.to_thread(
                self.state.previous_owner_batch_ids, previous_owner, list(epochs)
            )
            self.state.acquire(epochs, ids)
        return len(epochs)

    async def item_signals(self, now: float) -> dict:
        """Trending and co-engagement snapshot decayed to ``now`` (for the recommender)."""
        return self.state.item_stats.snapshot(now)

    async def stats(self) -> dict:
        return {**self.state.stats(), "recovery_s": self.recovery_s}

    async def ping(self) -> str:
        return self.state.name

    def pid(self) -> int:
        """The worker process id (operations and failure tests)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    # --- checkpoints ---
    async def checkpoint(self) -> dict:
        """Write dirty profiles and the journal position, then trim the journal."""
        state = self.state
        async with self._checkpoint_lock:
            started = time.monotonic()
            seq, users, meta = state.begin_checkpoint()
            try:
                await state.write_profiles(users)
                await asyncio.to_thread(state.finish_checkpoint, seq, meta)
            except BaseException:
                state.table.mark_dirty(users)
                raise
            return {
                "shard": state.name,
                "seq": seq,
                "profiles": len(users),
                "seconds": time.monotonic() - started,
            }

    async def _checkpoint_quietly(self) -> None:
        try:
            await self.checkpoint()
        except PersonaError as exc:
            log.warning("%s checkpoint failed: %s", self.state.name, exc)


def shard_actor(settings: Settings, name: str, partitions: int):
    """Create or find the named shard actor (idempotent)."""
    remote_cls = ray.remote(ProfileShard)
    return remote_cls.options(
        name=name,
        namespace=settings.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        # Calls in flight when the actor dies are re-sent to the restarted actor;
        # batch ids make that safe.
        max_task_retries=-1,
        max_concurrency=1000,
        num_cpus=settings.shard_cpus,
        resources=settings.shard_resources,
        scheduling_strategy="SPREAD",
    ).remote(name, dataclasses.asdict(settings), partitions)
