"""ProfileShard: the Ray actor that owns a set of partitions and their users' profiles.

A named, detached, restartable async actor. Memory changes happen on the event
loop (so they are atomic between awaits); store I/O runs in threads, so reads are
served while a batch is being journaled or a checkpoint is being written. One
asyncio lock orders writers (journal positions are contiguous); reads take no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time

import ray
from ray.util.metrics import Counter, Gauge

from actors.attribution import Exposure
from actors.events import decode_columns
from actors.shard_state import Ack, ShardState
from persona.errors import (
    ConfigError,
    JournalConflict,
    PersonaError,
    StaleEpoch,
    StoreUnavailable,
)
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
        self.name, self.partitions = name, partitions
        self._state: ShardState | None = None
        self.recovery_s = 0.0
        self._recover_lock = asyncio.Lock()
        try:
            self._recover()
        except StoreUnavailable as exc:
            # Ray never restarts an actor whose constructor raised: a shard restarted
            # while its store is down waits for the store instead (see _ready).
            log.warning("%s cannot recover yet (%s); it will on its next call", name, exc)
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
                ("quarantined_rows", "journal rows that could not be applied (kept aside)"),
            )
        }
        # Engagement per variant (README, "Experiments"): attributed events applied,
        # exported as the increase since the last report.
        self._attributed = Counter(
            "persona_attributed_events",
            description="events attributed to a recommendation, by experiment, variant, action",
            tag_keys=("experiment", "variant", "action"),
        )
        self._attributed_reported: dict[tuple[str, str, str], int] = {}
        # Freshness as a Prometheus histogram (cumulative le buckets, count, sum) of
        # events, from the shard's own bucketed counts: a Ray Histogram costs ~2.5 us
        # per observe and takes no count, so one per event would tax every batch.
        freshness = "delay from event time (delay=event) or arrival (delay=arrival) to applied"
        self._freshness = {
            part: Gauge(
                f"persona_shard_freshness_seconds_{part}",
                description=f"{freshness}: {what}",
                tag_keys=("shard", "delay", "le") if part == "bucket" else ("shard", "delay"),
            )
            for part, what in (
                ("bucket", "events applied within le seconds (since start)"),
                ("count", "events applied (since start)"),
                ("sum", "sum of the delays in seconds (since start)"),
            )
        }

    def _recover(self) -> None:
        """Open the store, read the checkpoint and replay the journal after it."""
        started = time.monotonic()
        store = open_store(settings=self.settings)
        try:
            state = ShardState(self.name, store, self.settings, self.partitions)
            replayed = state.recover()
        except BaseException:
            store.close()
            raise
        self.recovery_s = time.monotonic() - started
        log.info("%s recovered: %d journal rows in %.2fs", self.name, replayed, self.recovery_s)
        self._state = state

    async def _ready(self) -> None:
        """Recover now if the constructor could not; until the store answers, every
        call fails with StoreUnavailable (a 503 to HTTP clients)."""
        if self._state is None:
            async with self._recover_lock:
                if self._state is None:
                    await asyncio.to_thread(self._recover)

    @property
    def state(self) -> ShardState:
        if self._state is None:
            raise StoreUnavailable(f"{self.name} has not recovered yet: its store is unavailable")
        return self._state

    def _report(self) -> None:
        tags = {"shard": self.state.name}
        self._gauges["resident_profiles"].set(len(self.state.table), tags=tags)
        self._gauges["dirty_profiles"].set(self.state.table.dirty_count(), tags=tags)
        self._gauges["pending_writes"].set(self._pending_writes, tags=tags)
        self._gauges["evictions"].set(self.state.totals["evicted"], tags=tags)
        self._gauges["load_misses"].set(self.state.totals["load_misses"], tags=tags)
        self._gauges["quarantined_rows"].set(self.state.totals["quarantined"], tags=tags)
        for arm, count in self.state.attributed.items():
            reported = self._attributed_reported.get(arm, 0)
            # A state read again from the store counts from zero again.
            increase = count - reported if count >= reported else count
            if increase:
                experiment, variant, action = arm
                self._attributed.inc(
                    increase, tags={"experiment": experiment, "variant": variant, "action": action}
                )
                self._attributed_reported[arm] = count
        for delay, histogram in self.state.freshness.lifetime.items():
            if not histogram.count:
                continue
            of_delay = {**tags, "delay": delay}
            for le, count in histogram.exported():
                self._freshness["bucket"].set(count, tags={**of_delay, "le": le})
            self._freshness["count"].set(histogram.count, tags=of_delay)
            self._freshness["sum"].set(histogram.total_s, tags=of_delay)

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Checkpoint on the interval or when enough profiles are dirty; back off on errors."""
        while True:
            await asyncio.sleep(1.0)
            if self._state is None:
                continue  # recovers on the next call that needs the store
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
    async def apply_batch(
        self,
        source: str,
        events,
        validated: bool = False,
        lines: list[int] | None = None,
        fingerprint: str | None = None,
        span: tuple[int, int] | None = None,
        arrived_at: float | None = None,
        refs: dict[int, tuple] | None = None,
        *,
        encoded: bytes | None = None,
    ) -> dict:
        """Journal then apply a batch; lines of ``source`` applied before (within the
        dedup retention) are acknowledged as duplicates. ``arrived_at`` is when the
        batch reached its sender (wall clock; default: now), for the freshness delays.
        ``refs`` are the recommendations events name, by line (``events.references``).
        ``encoded`` is the validated events and lines as ``events.encode_columns``
        made them (see apply_part)."""
        if arrived_at is None:
            arrived_at = time.time()
        self._ensure_ticker()
        await self._ready()
        self._pending_writes += 1
        try:
            if fingerprint is not None and fingerprint != self.state.fingerprint:
                raise ConfigError(
                    f"{self.state.name} runs with other settings ({self.state.fingerprint}) "
                    f"than the sender ({fingerprint}): start every process of a deployment "
                    "with the same store and PERSONA_* profile settings"
                )
            return await self._apply_batch(
                source, events, validated, lines, span, arrived_at, refs, encoded
            )
        finally:
            self._pending_writes -= 1

    async def apply_part(
        self,
        source: str,
        part: bytes,
        fingerprint: str | None = None,
        span: tuple[int, int] | None = None,
        arrived_at: float | None = None,
        refs: dict[int, tuple] | None = None,
    ) -> dict:
        """apply_batch for a part the fleet validated and encoded with
        ``events.encode_columns``: one bytes object crosses the actor boundary instead
        of a pickled tuple per event, and is journaled as it came when every event in
        it is new."""
        events, lines = decode_columns(part)
        return await self.apply_batch(
            source, events, True, lines, fingerprint, span, arrived_at, refs, encoded=part
        )

    async def _apply_batch(
        self,
        source: str,
        events,
        validated: bool,
        lines,
        span,
        arrived_at: float,
        refs=None,
        encoded: bytes | None = None,
    ) -> dict:
        state = self.state
        batch = state.check(
            events, lines, validated=validated, span=span, arrived_at=arrived_at, refs=refs
        )
        batch.encoded = encoded if validated else None
        users = batch.users()
        keys = state.dedup_keys(source, batch)  # computed once per batch
        # The batch's users and dedup entries are held against eviction from their
        # first load until the batch is applied (or refused).
        held = state.pin(users)
        state.dedup.pin(list(keys))
        try:
            looked_up = await self._prefetch(batch, keys) if validated else None
            async with self._write_lock:
                ack = await self._apply_locked(source, batch, keys, looked_up)
        finally:
            state.unpin(held)
            state.dedup.unpin(list(keys))
        await self._passivate()
        if (
            state.table.dirty_count() >= self.settings.checkpoint_dirty_threshold
            or state.dedup.over_capacity()
        ):
            asyncio.get_running_loop().create_task(self._checkpoint_quietly())
        return ack.as_dict()

    async def _apply_locked(self, source, batch, keys, looked_up: Prefetched | None) -> Ack:
        state = self.state
        adopted = False
        for attempt in range(3):
            await self._load_for(batch, looked_up)
            await state.load_dedup(keys)
            try:
                prepared = state.prepare(source, batch)
            except StaleEpoch:
                if adopted:
                    raise
                # The store may have given us partitions (a move whose mover did not
                # reach us, or a hand-over of ours that failed): adopt them, once.
                state.sync_ownership(await asyncio.to_thread(state.store.get_assignments))
                adopted = True
                continue
            if isinstance(prepared, Ack):
                return prepared
            try:
                await asyncio.to_thread(state.append, prepared)
            except StaleEpoch:
                # The store fenced us out: stop believing we own what we do not.
                with contextlib.suppress(PersonaError):
                    state.sync_ownership(await asyncio.to_thread(state.store.get_assignments))
                raise
            except JournalConflict:
                if attempt == 2:
                    raise
                # Someone else wrote our next position: take their rows, then retry.
                await asyncio.to_thread(state.catch_up)
                continue
            return state.commit(prepared)
        raise StaleEpoch(f"{state.name}: the batch kept conflicting; resend")

    async def _load_for(self, batch, looked_up: Prefetched | None) -> None:
        state = self.state
        owned, partitions = state.owned, batch.partitions(state.partitions)
        users = [u for u, p in partitions.items() if p in owned]
        if looked_up is not None and looked_up.evicted == state.totals["evicted"]:
            # Users the prefetch found absent from the store are still absent if their
            # partition has not changed hands since (only the owner writes them) and
            # nothing was evicted (eviction writes users and drops them from memory).
            epochs, absent = looked_up.epochs, looked_up.absent
            users = [
                u
                for u in users
                if u not in absent or owned.get(partitions[u]) != epochs.get(partitions[u])
            ]
        await state.load(users)
        await state.load_item_vectors(batch.items())

    async def _prefetch(self, batch, keys: dict[str, int]) -> Prefetched:
        """Before queueing for the write lock, read what a pre-validated batch needs
        from the store (users, dedup entries, item vectors), so that the next batch's
        reads overlap this one's journal append. Whatever is still missing under the
        lock is read there."""
        state = self.state
        epochs, evicted = dict(state.owned), state.totals["evicted"]
        users = [u for u, p in batch.partitions(state.partitions).items() if p in epochs]
        absent = await state.load(users)
        await state.load_dedup(keys)
        await state.load_item_vectors(batch.items())
        return Prefetched(absent=set(absent), epochs=epochs, evicted=evicted)

    async def note_exposures(self, blobs: list[bytes]) -> int:
        """Remember what recommendations showed this shard's users (encoded
        actors.attribution.Exposure), for attributing events that name no rec_id."""
        await self._ready()
        return self.state.note_exposures(Exposure.decode(b) for b in blobs)

    async def delete_user(self, user_id: str) -> bool:
        """Privacy delete: journal it, drop it from memory, then from the store with a
        tombstone. Once journaled the delete holds: should the store call fail, no
        load brings the user back and the next checkpoint (or a replay) redoes it."""
        await self._ready()
        state = self.state
        async with self._write_lock, self._checkpoint_lock:
            stored = await asyncio.to_thread(state.fetch_profiles, [user_id])
            deleted_at = time.time()
            await asyncio.to_thread(state.journal_delete, user_id, deleted_at)
            held = state.forget_deleted(user_id, deleted_at)
            try:
                await asyncio.to_thread(state.finish_deletes, {user_id: deleted_at})
            except PersonaError as exc:
                log.warning("%s: delete of %s left to the checkpoint: %s", state.name, user_id, exc)
            return held or any("deleted_at" not in r for r in stored.values())

    # --- reads ---
    async def get_profiles(self, user_ids: list[str]) -> dict:
        """``{"profiles": a ProfileView per user that exists, "moved": users whose
        partition this shard does not own (the caller re-reads the assignment and asks
        again)}``."""
        self._ensure_ticker()
        await self._ready()
        state = self.state
        partition = {u: state.partition(u) for u in user_ids}
        if any(p not in state.owned and p not in state.releasing for p in partition.values()):
            # The store may have given us partitions a mover did not tell us about
            # (partitions being handed over are answered as moved without waiting).
            async with self._write_lock:
                state.sync_ownership(await asyncio.to_thread(state.store.get_assignments))
        missing = state.missing_users(u for u in user_ids if partition[u] in state.owned)
        if missing:
            await state.load(missing)
        # Ownership is read after the load: a partition handed over while the store was
        # read is the new owner's to answer.
        moved = [u for u in user_ids if partition[u] not in state.owned]
        wanted = [u for u in user_ids if partition[u] in state.owned]
        state.touch(wanted)
        found = {u: v for u in wanted if (v := state.table.view(u)) is not None}
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
    async def release_partitions(self, partitions: list[int], target: str) -> dict[int, int]:
        """Hand partitions to ``target``: stop writes to them, checkpoint, then advance
        their epochs in the store to ``target`` (compare-and-set), and forget their
        users. Should any step fail, the shard owns again whatever the store still
        says it owns, as it was. Returns the new epochs."""
        await self._ready()
        state = self.state
        async with self._write_lock:
            epochs = state.stop_owning(partitions)
            try:
                await self._checkpoint_and_seal(epochs, target)
                new = await asyncio.to_thread(state.store.claim_partitions, target, epochs)
            except BaseException:
                with contextlib.suppress(PersonaError):
                    state.sync_ownership(await asyncio.to_thread(state.store.get_assignments))
                raise
            state.handed_over(epochs)
        return new

    async def _checkpoint_and_seal(self, epochs: dict[int, int], target: str) -> None:
        """Checkpoint, then seal the journal; a position taken meanwhile (another
        incarnation, or an append that landed after a timeout) is caught up with and
        checkpointed too, so the store holds every row before the seal."""
        state = self.state
        for _attempt in range(3):
            await self.checkpoint()
            if not epochs:
                return
            try:
                await asyncio.to_thread(state.seal_release, epochs, target)
                return
            except JournalConflict:
                await asyncio.to_thread(state.catch_up)
        raise StaleEpoch(f"{state.name}: its journal kept moving while sealing a hand-over")

    async def acquire_partitions(self) -> int:
        """Own what the store says this shard owns (idempotent: a mover that died
        before calling this leaves the shard to adopt on its first write)."""
        await self._ready()
        async with self._write_lock:
            assignments = await asyncio.to_thread(self.state.store.get_assignments)
            return len(self.state.sync_ownership(assignments))

    async def item_signals(self, now: float) -> dict:
        """Trending and co-engagement snapshot decayed to ``now`` (for the recommender)."""
        await self._ready()
        return self.state.item_stats.snapshot(now)

    async def stats(self) -> dict:
        """Counters, plus the journal rows kept aside in the store (from any incarnation)."""
        await self._ready()
        try:
            quarantined = await asyncio.to_thread(self.state.store.get_quarantine, self.state.name)
        except PersonaError as exc:
            quarantined = f"unknown ({exc})"
        else:
            quarantined = [{"seq": seq, "reason": reason} for seq, reason in quarantined]
        return {
            **self.state.stats(),
            "recovery_s": self.recovery_s,
            "quarantined_rows": quarantined,
        }

    async def ping(self) -> str:
        """Answers once the shard has recovered (readiness)."""
        await self._ready()
        return self.state.name

    def pid(self) -> int:
        """The worker process id (operations and failure tests)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    # --- checkpoints ---
    async def checkpoint(self) -> dict:
        """Redo pending store deletes, write dirty profiles and changed dedup entries,
        record the journal position, then trim the journal."""
        await self._ready()
        state = self.state
        async with self._checkpoint_lock:
            started = time.monotonic()
            plan = state.begin_checkpoint()
            try:
                await asyncio.to_thread(state.finish_deletes, plan.deletes)
                await state.write_profiles(plan.users)
                await asyncio.to_thread(state.finish_checkpoint, plan)
            except BaseException:
                state.abort_checkpoint(plan)
                raise
            return {
                "shard": state.name,
                "seq": plan.seq,
                "profiles": len(plan.users),
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
        # (source, line) dedup makes that safe.
        max_task_retries=-1,
        max_concurrency=1000,
        num_cpus=settings.shard_cpus,
        resources=settings.shard_resources,
        scheduling_strategy="SPREAD",
    ).remote(name, dataclasses.asdict(settings.public()), partitions)
