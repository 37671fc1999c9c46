"""The fleet: creates or finds the shard actors, routes batches and reads to their owners.

Used by the Serve ingress, the jobs and the CLI. A batch is validated once here,
split by owning shard, and each part is sent under the batch's source with each
event's line; shards remember applied (source, partition, line), so a client that
retries a whole batch, or a job that reruns a file with another batch size, is
applied exactly once, even when partitions moved in between. Requests that reach
a shard which no longer owns a partition are re-routed after re-reading the
assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping

import ray

from actors.attribution import Exposure
from actors.events import EventValidator, ValidEvent, encode_columns, references
from actors.profile import ProfileRules, ProfileView
from actors.routing import (
    group_users,
    initial_assignment,
    partition_of,
    plan_moves,
    shard_name,
    split_by_owner,
)
from actors.shard import shard_actor
from persona.errors import ConfigError, InvalidEvents, ShardUnavailable, StaleEpoch
from persona.settings import Settings
from storage import Assignment, Store, open_store

log = logging.getLogger(__name__)

# How long a request keeps re-routing while partitions move before it gives up.
REROUTE_SECONDS = 30.0


def stored_partition_count(store: Store, settings: Settings) -> int:
    """P is fixed at creation: the first deployment stores it, later ones read it."""
    stored = int(store.put_meta_if_absent("partitions", str(settings.partitions)))
    if stored != settings.partitions:
        log.warning(
            "this deployment has %d partitions (fixed at creation); ignoring PERSONA_PARTITIONS=%d",
            stored,
            settings.partitions,
        )
    return stored


def ensure_assignment(store: Store, partitions: int, shards: int) -> dict[int, str]:
    """Assign unassigned partitions round-robin over ``shards``; keep existing ones."""
    current = store.get_assignments()
    wanted: dict[str, dict[int, int]] = {}
    for partition, owner in initial_assignment(partitions, shards).items():
        if partition not in current:
            wanted.setdefault(owner, {})[partition] = 0
    for owner, expected in wanted.items():
        # Another process may have assigned them first; theirs stands.
        with contextlib.suppress(StaleEpoch):
            store.claim_partitions(owner, expected)
    return {p: a.owner for p, a in store.get_assignments().items()}


class Fleet:
    """One process's handle on the shards. Without a ``store`` it opens a store session
    of its own and closes it in ``close`` (or ``shutdown``, or leaving a ``with``
    block); a store passed in stays open, its caller's to close."""

    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        self._owns_store = store is None
        self.store = store or open_store(settings=settings)
        with self._closed_on_error():
            self.partitions = stored_partition_count(self.store, settings)
        self.validator = EventValidator(
            ProfileRules.from_settings(settings).actions, settings.max_future_seconds
        )
        self.fingerprint = settings.model_fingerprint()
        self.owners: dict[int, str] = {}
        self.shards: dict[str, ray.actor.ActorHandle] = {}

    # --- lifecycle ---
    @classmethod
    def start(cls, settings: Settings, store: Store | None = None) -> Fleet:
        """Create the shards (or find the running ones) and wait until they answer."""
        fleet = cls(settings, store)
        with fleet._closed_on_error():
            fleet.owners = ensure_assignment(fleet.store, fleet.partitions, settings.shards)
            fleet._bind_shards(create=True)
            ray.get([s.ping.remote() for s in fleet.shards.values()])
        return fleet

    @classmethod
    def connect(cls, settings: Settings, store: Store | None = None) -> Fleet:
        """Find an already running fleet (e.g. from a Serve replica or a job)."""
        fleet = cls(settings, store)
        with fleet._closed_on_error():
            fleet.refresh()
        return fleet

    def refresh(self) -> None:
        self.adopt(self.store.get_assignments())

    async def refresh_async(self) -> None:
        """refresh() with the store read off the event loop (the map changes on it)."""
        self.adopt(await asyncio.to_thread(self.store.get_assignments))

    def adopt(self, assignments: Mapping[int, Assignment]) -> None:
        """Take a freshly read assignment: owners, and handles for the shards in it."""
        self.owners = {p: a.owner for p, a in assignments.items()}
        for gone in set(self.shards) - set(self.owners.values()):
            del self.shards[gone]
        if len(self.owners) != self.partitions:
            raise ConfigError(
                f"only {len(self.owners)} of {self.partitions} partitions are assigned: "
                "start the fleet first (persona up)"
            )
        self._bind_shards(create=False)

    def _bind_shards(self, create: bool) -> None:
        for name in sorted(set(self.owners.values())):
            if name in self.shards:
                continue
            if create:
                self.shards[name] = shard_actor(self.settings, name, self.partitions)
                continue
            try:
                self.shards[name] = ray.get_actor(name, namespace=self.settings.namespace)
            except ValueError:  # no live actor of that name
                owned = sorted(p for p, owner in self.owners.items() if owner == name)
                raise ShardUnavailable(
                    f"{name} owns partition(s) {owned[:10]}{' ...' if len(owned) > 10 else ''} "
                    f"in the store but is not running in Ray namespace "
                    f"{self.settings.namespace!r}: requests for them cannot be routed until it "
                    "runs again (`persona scale --shards N` starts the fleet's missing shards)"
                ) from None

    def _handle(self, name: str) -> ray.actor.ActorHandle:
        """The shard's handle; one forgotten (it died) is looked up again, or the
        request fails at once with ShardUnavailable."""
        handle = self.shards.get(name)
        if handle is None:
            self._bind_shards(create=False)
            handle = self.shards[name]
        return handle

    def forget_if_dead(self, name: str, error: BaseException) -> None:
        """Drop the handle of a shard that died for good, so the next refresh looks the
        name up again: it finds a new incarnation, or says the shard is gone."""
        if isinstance(error, ray.exceptions.ActorDiedError):
            self.shards.pop(name, None)

    def shutdown(self) -> None:
        """Kill the shard actors (their state is in the store; a later start recovers),
        then close the store session the fleet opened."""
        for handle in self.shards.values():
            ray.kill(handle, no_restart=True)
        self.shards.clear()
        self.close()

    def close(self) -> None:
        """Leave the fleet running and close the store session this handle opened (not
        a store it was given). Idempotent."""
        if self._owns_store:
            self._owns_store = False
            self.store.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _closed_on_error(self):
        """A fleet that fails to start or connect does not leave its store open."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    # --- writes ---
    def validate(self, events) -> tuple[list[ValidEvent], list[dict]]:
        return self.validator.validate(events)

    async def apply_async(
        self,
        source: str,
        events,
        *,
        lines: list[int] | None = None,
        all_or_nothing: bool = False,
    ) -> dict:
        """Validate, split by owning shard and apply a batch from ``source``.

        ``lines`` gives each event's line in its source (a file's line number; by
        default its index in the batch); shards remember applied (source, partition,
        line) for the dedup retention, so sending the same lines again, in any
        batches, applies nothing twice. A batch is a range of its source: no other
        batch of the same source may hold a line between its first and last (each
        partition records the whole range as applied)."""
        arrived_at = time.time()  # the batch's arrival, for the shards' freshness delays
        valid, errors = self.validate(events)
        refs = references(events, lines if lines is not None else range(len(events)))
        if errors and all_or_nothing:
            raise InvalidEvents(errors)
        if lines is None:
            lines = list(range(len(events)))
        elif len(lines) != len(events):
            raise ConfigError(f"{len(lines)} lines given for {len(events)} events")
        bad = {e["index"] for e in errors}
        valid_lines = [line for n, line in enumerate(lines) if n not in bad]
        # The whole batch's range of lines (invalid ones included): each shard records
        # it for its partitions, so consecutive batches of a file merge into one interval.
        span = (min(lines), max(lines)) if len(lines) else None
        total = {"applied": 0, "duplicate": 0, "rejected": len(errors), "errors": errors}
        pending = self._split(valid, valid_lines)
        deadline = time.monotonic() + REROUTE_SECONDS
        attempt = 0
        while pending:
            names = list(pending)
            # Every part goes under the batch's own source and lines: shards dedupe per
            # (source, partition, line), so a retry stays exactly once even when
            # partitions moved in between.
            # Each part crosses to its shard as one compressed columnar blob, which the
            # shard journals as it is (Ray would otherwise serialize a tuple per event).
            results = await asyncio.gather(
                *(
                    self._handle(n).apply_part.remote(
                        source,
                        encode_columns(*pending[n]),
                        self.fingerprint,
                        span,
                        arrived_at,
                        {line: refs[line] for line in pending[n][1] if line in refs}
                        if refs
                        else None,
                    )
                    for n in names
                ),
                return_exceptions=True,
            )
            rerouted_events, rerouted_lines = [], []
            for name, result in zip(names, results, strict=True):
                if _is_moved(result):
                    self.forget_if_dead(name, result)
                    rerouted_events += pending[name][0]
                    rerouted_lines += pending[name][1]
                    continue
                if isinstance(result, BaseException):
                    raise _unwrap(result)
                for key in ("applied", "duplicate", "rejected"):
                    total[key] += result[key]
                total["errors"] += result["errors"]
            if not rerouted_events:
                break
            attempt += 1
            await self._before_reroute(attempt, deadline, "the batch was routed")
            pending = self._split(rerouted_events, rerouted_lines)
        return total

    async def note_exposures_async(self, exposures: list[Exposure]) -> int:
        """Send exposures to the shards that own their users (one call per shard), for
        attributing later events that name no rec_id; returns how many were new. A
        shard that cannot take them is skipped: attribution by rec_id does not need
        them, and a restarted shard reads them back from the store."""
        groups: dict[str, list[bytes]] = {}
        for exposure in exposures:
            owner = self.owners[partition_of(exposure.user_id, self.partitions)]
            groups.setdefault(owner, []).append(exposure.encode())
        names = list(groups)
        results = await asyncio.gather(
            *(self._handle(n).note_exposures.remote(groups[n]) for n in names),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("exposures not sent to %s: %s", name, result)
        return sum(r for r in results if isinstance(r, int))

    def _split(self, events: list, lines: list[int]) -> dict[str, tuple[list, list[int]]]:
        return split_by_owner(events, lines, self.owners, self.partitions)

    async def _before_reroute(self, attempt: int, deadline: float, what: str) -> None:
        """Back off briefly, then re-read the assignment; give up past the deadline."""
        if time.monotonic() > deadline:
            raise StaleEpoch(f"partitions kept moving while {what}; retry")
        await asyncio.sleep(min(0.5, 0.02 * attempt))
        await self.refresh_async()

    def apply(self, source: str, events, *, lines: list[int] | None = None) -> dict:
        return _run(self.apply_async(source, events, lines=lines))

    # --- reads ---
    async def get_profiles_async(self, user_ids: Iterable[str]) -> dict[str, ProfileView]:
        """The profiles of the users that exist (absent users are left out)."""
        wanted = list(dict.fromkeys(user_ids))
        merged: dict[str, ProfileView] = {}
        deadline = time.monotonic() + REROUTE_SECONDS
        attempt = 0
        while wanted:
            groups = group_users(wanted, self.owners, self.partitions)
            names = list(groups)
            parts = await asyncio.gather(
                *(self._handle(n).get_profiles.remote(groups[n]) for n in names),
                return_exceptions=True,
            )
            wanted = []
            for name, part in zip(names, parts, strict=True):
                if _is_moved(part):
                    self.forget_if_dead(name, part)
                    wanted += groups[name]
                elif isinstance(part, BaseException):
                    raise _unwrap(part)
                else:
                    merged.update(part["profiles"])
                    wanted += part["moved"]
            if wanted:
                attempt += 1
                await self._before_reroute(attempt, deadline, "reading")
        return merged

    def get_profiles(self, user_ids: Iterable[str]) -> dict[str, ProfileView]:
        return _run(self.get_profiles_async(user_ids))

    def owner_of(self, user_id: str) -> ray.actor.ActorHandle:
        return self._handle(self.owners[partition_of(user_id, self.partitions)])

    async def delete_user_async(self, user_id: str) -> bool:
        deadline = time.monotonic() + REROUTE_SECONDS
        attempt = 0
        while True:
            owner = self.owners[partition_of(user_id, self.partitions)]
            try:
                return await self._handle(owner).delete_user.remote(user_id)
            except Exception as exc:  # only a moved partition is retried
                if not _is_moved(exc):
                    raise _unwrap(exc) from None
                self.forget_if_dead(owner, exc)
            attempt += 1
            await self._before_reroute(attempt, deadline, "deleting")

    def delete_user(self, user_id: str) -> bool:
        return _run(self.delete_user_async(user_id))

    # --- scaling ---
    def scale(self, shards: int) -> list[dict]:
        """Grow or shrink the shard set while traffic continues, moving whole partitions.

        Per move: the old owner stops writes to the partition, checkpoints, advances
        the store's epoch to the new owner (compare-and-set) and forgets its users;
        the new owner adopts the partition (its applied lines are in the store).
        Requests that reach the old owner
        in between are refused with StaleEpoch and re-routed by their fleet."""
        if shards < 1:
            raise ConfigError("a fleet needs at least one shard")
        self.refresh()
        names = [shard_name(i) for i in range(shards)]
        for name in names:
            if name not in self.shards:
                self.shards[name] = shard_actor(self.settings, name, self.partitions)
        ray.get([self.shards[n].ping.remote() for n in names])
        leaving = {n: h for n, h in self.shards.items() if n not in names}
        report = self.move_partitions(plan_moves(self.owners, names))
        for handle in leaving.values():
            ray.kill(handle, no_restart=True)
        for name in names:
            self.shards.setdefault(name, ray.get_actor(name, namespace=self.settings.namespace))
        return report

    def move_partitions(self, moves: Iterable[tuple[int, str, str]]) -> list[dict]:
        """Carry out (partition, from, to) moves, grouped by shard pair."""
        by_pair: dict[tuple[str, str], list[int]] = {}
        for partition, source, target in moves:
            by_pair.setdefault((source, target), []).append(partition)
        report = []
        for (source, target), partitions in sorted(by_pair.items()):
            started = time.monotonic()
            # The old owner advances the epochs itself once its checkpoint is written,
            # so no step of a move leaves a partition owned by nobody in the store.
            ray.get(self.shards[source].release_partitions.remote(partitions, target))
            ray.get(self.shards[target].acquire_partitions.remote())
            report.append(
                {
                    "from": source,
                    "to": target,
                    "partitions": len(partitions),
                    "seconds": time.monotonic() - started,
                }
            )
        self.refresh()
        return report

    # --- operations ---
    def checkpoint(self) -> list[dict]:
        return ray.get([s.checkpoint.remote() for s in self.shards.values()])

    def stats(self) -> list[dict]:
        return ray.get([s.stats.remote() for s in self.shards.values()])


def _is_moved(result) -> bool:
    """The shard no longer owns (some of) the request's partitions, or it was removed
    by a scale-in: re-read the assignment and resend."""
    if isinstance(result, ray.exceptions.RayTaskError) and isinstance(result.cause, StaleEpoch):
        return True
    return isinstance(result, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError)


def _unwrap(error: BaseException) -> BaseException:
    """A shard's own exception, not Ray's wrapper, so callers can map it (e.g. to 503)."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        return error.cause
    return error


def _run(coroutine):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    raise RuntimeError("call the *_async method from async code")
