"""Exactly once, step by step: the shard actor's code driven in-process (no cluster), with
a store that can hold or fail a chosen call, so each interleaving the actor's event
loop allows is run on purpose rather than hoped for with sleeps.

Every test here failed on the commit before the dedup index (af41f01): see the
reproductions in ../shared/repro/ for the original defects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from actors.events import EventValidator, encode_columns
from actors.profile import Profile
from actors.routing import partition_of
from actors.shard import ProfileShard
from actors.shard_state import journal_row
from persona.errors import ConfigError, PersonaError, StaleEpoch, StoreUnavailable
from persona.settings import load_settings
from storage import codec, open_store

NOW = time.time()
P = 4


class Faulty:
    """A real store whose named calls can be made to fail, or to wait for the test."""

    def __init__(self, store):
        self._store = store
        self.fail: set[str] = set()
        self.unfenced = False  # journal appends skip the fence (a check that ran earlier)
        self.hold: dict[str, tuple[threading.Event, threading.Event]] = {}

    def hold_next(self, method: str) -> tuple[threading.Event, threading.Event]:
        entered, release = threading.Event(), threading.Event()
        self.hold[method] = (entered, release)
        return entered, release

    def __getattr__(self, name):
        real = getattr(self._store, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            if name in self.fail:
                raise StoreUnavailable(f"test: {name} fails")
            held = self.hold.pop(name, None)
            if held is not None:
                held[0].set()
                held[1].wait(10)
            if self.unfenced and name == "append_journal":
                kwargs.pop("fence", None)
            return real(*args, **kwargs)

        return call


@pytest.fixture
def settings(tmp_path):
    settings = load_settings(
        store_url=f"sqlite:///{tmp_path}/persona.db",
        partitions=P,
        checkpoint_interval_s=3600.0,
    )
    with open_store(settings=settings) as store:
        store.claim_partitions("A", {p: 0 for p in range(P)})
    return settings


def shard(settings, name: str = "A", **overrides) -> ProfileShard:
    return ProfileShard(name, dataclasses.asdict(dataclasses.replace(settings, **overrides)), P)


def event(user: str, item: str, ts: float = NOW, action: str = "click") -> dict:
    return {"user_id": user, "item_id": item, "action": action, "ts": ts, "topics": ["jazz"]}


def stored_events(settings, user: str) -> int:
    with open_store(settings=settings) as store:
        blob = store.get_profiles([user]).get(user)
    if blob is None:
        return 0
    return Profile.from_record(codec.decode(blob), shard_rules(settings)).events


def shard_rules(settings):
    from actors.profile import ProfileRules

    return ProfileRules.from_settings(settings)


async def held_events(node: ProfileShard, user: str) -> int:
    found = (await node.get_profiles([user]))["profiles"]
    return found[user].events if user in found else 0


def user_in(partition: int, prefix: str = "user") -> str:
    return next(
        f"{prefix}-{n}" for n in range(10_000) if partition_of(f"{prefix}-{n}", P) == partition
    )


# --- reruns and retries --------------------------------------------------------------


def test_rerun_with_another_batch_size_applies_nothing(settings):
    lines = [event(f"u{n % 5}", f"i{n}", NOW - 100 + n) for n in range(40)]

    async def scenario():
        node = shard(settings)
        applied = 0
        for at in range(0, 40, 7):
            ack = await node.apply_batch(
                "file-1",
                lines[at : at + 7],
                False,
                list(range(at, at + 7))[: len(lines[at : at + 7])],
            )
            applied += ack["applied"]
        again = {"applied": 0, "duplicate": 0}
        for at in range(0, 40, 3):
            part = lines[at : at + 3]
            ack = await node.apply_batch("file-1", part, False, list(range(at, at + len(part))))
            again["applied"] += ack["applied"]
            again["duplicate"] += ack["duplicate"]
        return applied, again, sum([await held_events(node, f"u{u}") for u in range(5)])

    applied, again, held = asyncio.run(scenario())
    assert applied == 40
    assert again == {"applied": 0, "duplicate": 40}
    assert held == 40


def test_retry_after_thousands_of_other_batches_is_still_a_duplicate(settings):
    async def scenario():
        # A small memory: the early keys are only in the store by the time of the retry.
        node = shard(settings, dedup_memory_entries=50)
        first = await node.apply_batch("client:req-0", [event("ann", "i0")])
        for n in range(1, 2_500):
            await node.apply_batch(f"client:req-{n}", [event("ann", f"i{n}")])
            if n == 1_200:
                await node.checkpoint()
        retry = await node.apply_batch("client:req-0", [event("ann", "i0")])
        return first, retry, await held_events(node, "ann")

    first, retry, held = asyncio.run(scenario())
    assert first["applied"] == 1
    assert (retry["applied"], retry["duplicate"]) == (0, 1)
    assert held == 2_500


def test_the_same_key_from_two_clients_is_two_batches(settings):
    async def scenario():
        node = shard(settings)
        one = await node.apply_batch("client-a:req-1", [event("ann", "x")])
        two = await node.apply_batch("client-b:req-1", [event("ann", "y")])
        return one["applied"], two["applied"], await held_events(node, "ann")

    assert asyncio.run(scenario()) == (1, 1, 2)


def test_a_restarted_new_owner_still_recognises_lines_applied_before_a_move(settings):
    user = user_in(0)

    async def scenario():
        old, new = shard(settings, "A"), shard(settings, "B")
        assert (await old.apply_batch("req-9", [event(user, "x")]))["applied"] == 1
        await old.release_partitions([0], "B")
        await new.acquire_partitions()
        restarted = shard(settings, "B")  # before B ever checkpoints
        retry = await restarted.apply_batch("req-9", [event(user, "x")])
        return retry, await held_events(restarted, user)

    retry, held = asyncio.run(scenario())
    assert (retry["applied"], retry["duplicate"]) == (0, 1)
    assert held == 1


# --- eviction and loads ----------------------------------------------------------------


def test_eviction_during_append_keeps_history(settings):
    async def scenario():
        node = shard(settings)
        for n in range(30):
            await node.apply_batch(f"old-{n}", [event("ann", f"i{n}", NOW - 1000 + n)])
        others = [f"other-{n}" for n in range(90)]
        stored = [f"stored-{n}" for n in range(20)]
        for user in others + stored:
            await node.apply_batch(f"first-{user}", [event(user, "i")])
        await node.checkpoint()
        for user in stored:
            node.state.forget_user(user)
        node.state.settings = dataclasses.replace(node.state.settings, max_resident_profiles=100)
        # ann is resident, clean and the least recently used of 91 users.
        faulty = node.state.store = Faulty(node.state.store)
        entered, release = faulty.hold_next("append_journal")
        applying = asyncio.ensure_future(node.apply_batch("new", [event("ann", "i99")]))
        await asyncio.to_thread(entered.wait, 10)
        # While the batch waits for its append, a read loads 20 users: past the cap,
        # passivation drops the least recently used.
        await node.get_profiles(stored)
        evicted = node.state.totals["evicted"]
        release.set()
        await applying
        await node.checkpoint()
        return evicted, await held_events(node, "ann")

    evicted, held = asyncio.run(scenario())
    assert evicted > 0
    assert held == 31
    assert stored_events(settings, "ann") == 31


def test_a_read_from_before_an_eviction_is_read_again(settings):
    async def scenario():
        node = shard(settings, max_resident_profiles=10)
        await node.apply_batch("b0", [event("ann", "i0")])
        await node.checkpoint()
        node.state.forget_user("ann")
        state = node.state
        since = state.removals
        stale = state.fetch_profiles(["ann"])  # a slow read of the old version...
        await node.apply_batch("b1", [event("ann", "i1")])  # ...meanwhile ann changes
        victims = ["ann"]
        blobs, positions = state.encode_for_eviction(victims)
        state.store.put_profiles(blobs)
        state.evict(victims, positions)  # ...and is evicted (written first)
        again = state.install(stale, since)  # the old read lands
        return again, "ann" in state.table, await held_events(node, "ann")

    again, resident, held = asyncio.run(scenario())
    assert again == ["ann"] and not resident
    assert held == 2


# --- moves ---------------------------------------------------------------------------


def test_an_append_that_landed_after_a_timeout_is_applied_once_across_a_move(settings):
    moved, stays = user_in(0), user_in(1)

    async def scenario():
        old = shard(settings, "A")
        for n in range(20):
            await old.apply_batch(f"b{n}", [event(moved, f"song-{n}", NOW - 100 + n)])
        # An append that timed out for the client but landed: at A's next position.
        state = old.state
        batch = state.check([event(moved, "orphan")], None, validated=False)
        await state.load_dedup(state.dedup_keys("Y", batch.events))
        prepared = state.prepare("Y", batch)
        state.store.append_journal("A", prepared.seq, prepared.blob, fence=prepared.fence)
        # The hand-over's seal finds that position taken: A catches up with the row
        # and checkpoints it before the store names B.
        await old.release_partitions([0], "B")
        new = shard(settings, "B")
        await new.acquire_partitions()
        retry = await new.apply_batch("Y", [event(moved, "orphan")])
        await new.apply_batch("b-new", [event(moved, "song-new", NOW + 1)])
        await new.checkpoint()
        await old.apply_batch("other", [event(stays, "x")])
        await old.checkpoint()
        restarted = shard(settings, "A")
        await restarted.checkpoint()
        return retry, moved in old.state.table, moved in restarted.state.table

    retry, in_old, in_restarted = asyncio.run(scenario())
    assert (retry["applied"], retry["duplicate"]) == (0, 1)
    assert not in_old and not in_restarted
    assert stored_events(settings, moved) == 22


def test_replay_applies_nothing_into_a_partition_taken_without_a_hand_over(settings):
    moved = user_in(0)

    async def scenario():
        old = shard(settings, "A")
        await old.apply_batch("b0", [event(moved, "x")])
        await old.checkpoint()
        state = old.state
        batch = state.check([event(moved, "late")], None, validated=False)
        await state.load_dedup(state.dedup_keys("late", batch.events))
        prepared = state.prepare("late", batch)
        # The partition is taken in the store behind A's back (no seal), and B writes.
        epoch = state.store.get_assignments()[0].epoch
        state.store.claim_partitions("B", {0: epoch})
        new = shard(settings, "B")
        await new.apply_batch("b1", [event(moved, "y")])
        await new.checkpoint()
        # Then a row fenced with A's old epoch shows up at A's next position.
        state.store.append_journal("A", prepared.seq, prepared.blob)
        restarted = shard(settings, "A")
        await restarted.checkpoint()
        return moved in restarted.state.table

    assert asyncio.run(scenario()) is False
    assert stored_events(settings, moved) == 2


def test_a_second_incarnation_cannot_write_past_a_hand_over(settings):
    user = user_in(0)

    async def scenario():
        zombie, current = shard(settings, "A"), shard(settings, "A")
        await current.release_partitions([0], "B")
        # The zombie still believes it owns partition 0 at the old epoch, and its
        # fence check ran before the move (Cassandra checks, then appends): its next
        # append must take the position the seal holds, so it reads the seal first.
        zombie.state.store = Faulty(zombie.state.store)
        zombie.state.store.unfenced = True
        with pytest.raises(StaleEpoch):
            await zombie.apply_batch("z", [event(user, "x")])
        return 0 in zombie.state.owned

    assert asyncio.run(scenario()) is False
    assert stored_events(settings, user) == 0


def test_a_failed_release_checkpoint_keeps_the_partitions(settings):
    user = user_in(0)

    async def scenario():
        node = shard(settings)
        await node.apply_batch("b1", [event(user, "x")])
        faulty = node.state.store = Faulty(node.state.store)
        faulty.fail.add("put_checkpoint")
        with pytest.raises(StoreUnavailable):
            await node.release_partitions([0], "B")
        faulty.fail.clear()
        after = await node.apply_batch("b2", [event(user, "y")])
        await node.checkpoint()
        return 0 in node.state.owned, after["applied"]

    owned, applied = asyncio.run(scenario())
    assert owned and applied == 1
    assert stored_events(settings, user) == 2
    with open_store(settings=settings) as store:
        assert store.get_assignments()[0].owner == "A"


def test_a_mover_that_dies_after_the_hand_over_leaves_the_new_owner_to_adopt(settings):
    user = user_in(0)

    async def scenario():
        old, new = shard(settings, "A"), shard(settings, "B")
        await old.apply_batch("b1", [event(user, "x")])
        await old.release_partitions([0], "B")  # the mover dies before acquire
        ack = await new.apply_batch("b2", [event(user, "y")])
        return ack["applied"], await held_events(new, user)

    assert asyncio.run(scenario()) == (1, 2)


# --- settings that differ, rows that cannot be applied ---------------------------------


def test_a_sender_with_other_settings_is_refused_before_the_journal(settings):
    other = EventValidator([*settings.action_weights, "comment"])
    valid, _ = other.validate([event("ann", "x", action="comment")])

    async def scenario():
        node = shard(settings)
        with pytest.raises(ConfigError, match="other"):
            await node.apply_batch("b1", valid, True)
        with pytest.raises(ConfigError, match="other settings"):
            await node.apply_batch("b2", [event("ann", "x")], False, None, "not-ours")
        ok = await node.apply_batch("b3", [event("ann", "y")])
        return ok["applied"], list(node.state.store.read_journal("A", 0))

    applied, rows = asyncio.run(scenario())
    assert applied == 1 and len(rows) == 1


def test_an_unappliable_journal_row_is_quarantined_and_recovery_goes_on(settings):
    async def scenario():
        node = shard(settings)
        await node.apply_batch("b1", [event("ann", "x")])
        poison = codec.encode(
            {"source": "bad", "events": [["bob", "i", "comment", NOW, [], 1.0]], "lines": [0]}
        )
        node.state.store.append_journal("A", 2, poison)
        node.state.store.append_journal("A", 3, b"not a record at all")
        restarted = shard(settings)  # does not crash-loop
        ack = await restarted.apply_batch("b4", [event("ann", "y")])
        stats = await restarted.stats()
        return ack["applied"], stats, await held_events(restarted, "ann")

    applied, stats, held = asyncio.run(scenario())
    assert applied == 1 and held == 2
    assert [row["seq"] for row in stats["quarantined_rows"]] == [2, 3]
    assert stats["quarantined"] == 2


# --- deletes -------------------------------------------------------------------------


def test_a_failed_store_delete_never_brings_the_user_back(settings):
    async def scenario():
        node = shard(settings)
        await node.apply_batch("b1", [event("gone", "x", NOW - 10)])
        await node.checkpoint()
        faulty = node.state.store = Faulty(node.state.store)
        faulty.fail.add("delete_profiles")
        assert await node.delete_user("gone") is True
        with pytest.raises(StoreUnavailable):
            await node.checkpoint()  # the store still refuses: the journal is not trimmed
        first = await held_events(node, "gone")
        faulty.fail.clear()
        await node.checkpoint()
        restarted = shard(settings)
        return first, await held_events(restarted, "gone")

    assert asyncio.run(scenario()) == (0, 0)
    assert stored_events(settings, "gone") == 0


def test_events_older_than_a_delete_are_dropped_on_ingest_and_replay(settings):
    async def scenario():
        node = shard(settings)
        await node.apply_batch("file:1", [event("gone", "x", NOW - 100)], False, [1])
        await node.checkpoint()
        await node.delete_user("gone")
        fresh = shard(settings)  # nothing of the user in memory: the tombstone decides
        old = await fresh.apply_batch("file:2", [event("gone", "y", NOW - 50)], False, [1])
        new = await fresh.apply_batch("live", [event("gone", "z", time.time() + 1)])
        late = await fresh.apply_batch("file:3", [event("gone", "w", NOW - 40)], False, [1])
        await fresh.checkpoint()
        evicted = shard(settings)  # the returning user's record keeps its delete time
        later = await evicted.apply_batch("file:4", [event("gone", "v", NOW - 30)], False, [1])
        return old, new, late, later, await held_events(evicted, "gone")

    old, new, late, later, held = asyncio.run(scenario())
    assert (old["applied"], old["rejected"]) == (0, 1)
    assert "deleted" in old["errors"][0]["reason"]
    assert new["applied"] == 1
    assert late["rejected"] == 1 and later["rejected"] == 1
    assert held == 1


def test_checkpoint_meta_does_not_grow_with_the_number_of_batches(settings):
    async def scenario():
        node = shard(settings)
        sizes = []
        for round_ in range(3):
            for n in range(500):
                await node.apply_batch(f"r{round_}-{n}", [event(f"u{n % 7}", f"i{n % 9}")])
            await node.checkpoint()
            sizes.append(len(node.state.store.get_checkpoint("A").meta))
        return sizes

    sizes = asyncio.run(scenario())
    assert max(sizes) - min(sizes) < 512, sizes


def test_write_path_refuses_a_batch_when_lines_do_not_match_events(settings):
    async def scenario():
        node = shard(settings)
        with pytest.raises(PersonaError):
            await node.apply_batch("f", [event("a", "x")], False, [1, 2])

    asyncio.run(scenario())


def test_lines_caught_up_during_a_hand_over_keep_the_source_history(settings):
    user = user_in(0)

    async def scenario():
        node = shard(settings, "A")
        first = [event(user, f"i{n}", NOW - 100 + n) for n in range(10)]
        await node.apply_batch("file-f", first, False, list(range(10)))
        await node.checkpoint()
        # The entry leaves memory (LRU), and another incarnation of A journals lines
        # 10-19 of the same file at A's next position.
        node.state.dedup.entries.clear()
        node.state.dedup.partition_of.clear()
        other_incarnation = shard(settings, "A")
        second = [event(user, f"i{n}", NOW - 50 + n) for n in range(10, 20)]
        await other_incarnation.apply_batch("file-f", second, False, list(range(10, 20)))
        # A hands the partition over: its seal catches up with that row first.
        await node.release_partitions([0], "B")
        new = shard(settings, "B")
        rerun = await new.apply_batch("file-f", first + second, False, list(range(20)))
        return rerun, await held_events(new, user)

    rerun, held = asyncio.run(scenario())
    assert (rerun["applied"], rerun["duplicate"]) == (0, 20)
    assert held == 20


def test_an_incarnation_behind_the_checkpoint_cannot_append_into_the_trimmed_journal(settings):
    """A second incarnation whose position lags behind the checkpoint (a process Ray
    replaced, still answering a stale handle) must not write at a journal position
    that was trimmed: no reader would ever replay it, and its ack would be a loss."""
    user = user_in(0)

    async def scenario():
        lagging, current = shard(settings, "A"), shard(settings, "A")
        for n in range(3):
            await current.apply_batch(f"b{n}", [event(user, f"i{n}", NOW - 10 + n)])
        await current.checkpoint()  # position 3 checkpointed, rows 1-3 trimmed
        late = await lagging.apply_batch("late", [event(user, "late", NOW)])
        restarted = shard(settings, "A")
        return late, await held_events(restarted, user)

    late, held = asyncio.run(scenario())
    assert late["applied"] == 1
    assert held == 4  # the late batch was acknowledged, so it must be there


def test_a_sender_pointed_at_another_store_is_refused_at_once(settings, tmp_path):
    elsewhere = dataclasses.replace(settings, store_url=f"sqlite:///{tmp_path}/other.db")
    tuned = dataclasses.replace(settings, store_url=settings.store_url + "?ignored=1")

    async def scenario():
        node = shard(settings)
        with pytest.raises(ConfigError, match="same store"):
            await node.apply_batch(
                "b", [event("ann", "x")], False, None, elsewhere.model_fingerprint()
            )
        return settings.model_fingerprint() == tuned.model_fingerprint()

    assert asyncio.run(scenario()) is True


def test_dedup_entries_of_a_batch_in_flight_stay_while_others_churn_the_memory(settings):
    """A tiny dedup memory: while a batch waits for its append, other batches' reads
    push entries out; the waiting batch's entry must still be there at its commit,
    or its lines would be applied without being remembered (a retry doubles them)."""
    validator = EventValidator(list(settings.action_weights))

    def valid(user: str, item: str) -> list:
        return validator.validate([event(user, item)])[0]

    async def scenario():
        node = shard(settings, dedup_memory_entries=2)
        faulty = node.state.store = Faulty(node.state.store)
        entered, release = faulty.hold_next("append_journal")
        first = asyncio.ensure_future(node.apply_batch("req-first", valid("ann", "x"), True))
        await asyncio.to_thread(entered.wait, 10)
        others = [
            asyncio.ensure_future(node.apply_batch(f"req-{n}", valid(f"u{n}", "y"), True))
            for n in range(6)
        ]
        await asyncio.sleep(0.5)  # their reads run (outside the write lock) meanwhile
        release.set()
        acks = await asyncio.gather(first, *others)
        retry = await node.apply_batch("req-first", valid("ann", "x"), True)
        return acks[0], retry, await held_events(node, "ann")

    first, retry, held = asyncio.run(scenario())
    assert first["applied"] == 1
    assert (retry["applied"], retry["duplicate"]) == (0, 1)
    assert held == 1


def test_a_file_ingested_in_batches_is_one_interval_per_partition(settings):
    lines = [event(f"user-{n % 40}", f"i{n}", NOW - 3000 + n) for n in range(2000)]

    async def scenario():
        node = shard(settings)
        for at in range(0, 2000, 50):
            await node.apply_batch("big-file", lines[at : at + 50], False, list(range(at, at + 50)))
        entries = {
            key: entry.intervals()
            for key, entry in node.state.dedup.entries.items()
            if key.endswith("/big-file")
        }
        rerun = {"applied": 0, "duplicate": 0}
        for at in range(0, 2000, 333):
            part = lines[at : at + 333]
            ack = await node.apply_batch("big-file", part, False, list(range(at, at + len(part))))
            rerun["applied"] += ack["applied"]
            rerun["duplicate"] += ack["duplicate"]
        return entries, rerun

    entries, rerun = asyncio.run(scenario())
    assert len(entries) == P and set(map(tuple, entries.values())) == {((0, 1999),)}
    assert rerun == {"applied": 0, "duplicate": 2000}


# --- the journal's format ------------------------------------------------------------


def test_journal_rows_written_before_the_columnar_format_still_replay(settings):
    async def scenario():
        node = shard(settings)
        await node.apply_batch("b1", [event("ann", "x")])
        fence = {partition_of("bob", P): node.state.owned[partition_of("bob", P)]}
        old = {"source": "old", "events": [["bob", "i", "click", NOW, ["jazz"], 1.0]]}
        node.state.store.append_journal("A", 2, codec.encode({**old, "fence": fence}), fence=fence)
        restarted = shard(settings)
        again = await restarted.apply_batch("old", [event("bob", "i")])  # its line 0
        return await held_events(restarted, "bob"), again

    held, again = asyncio.run(scenario())
    assert held == 1
    assert (again["applied"], again["duplicate"]) == (0, 1)


def test_a_part_with_duplicates_journals_only_its_new_events(settings):
    validator = EventValidator(["view", "click", "hide", "comment"])
    valid = validator.validate([event("ann", "x"), event("bob", "y")])[0]

    async def scenario():
        node = shard(settings)
        first = await node.apply_part("src", encode_columns(valid[:1], [0]))
        both = await node.apply_part("src", encode_columns(valid, [0, 1]))
        rows = [journal_row(codec.decode(b)) for _, b in node.state.store.read_journal("A", 0)]
        restarted = shard(settings)  # replays both rows
        held = [await held_events(restarted, u) for u in ("ann", "bob")]
        return first, both, rows, held

    first, both, rows, held = asyncio.run(scenario())
    assert first["applied"] == 1 and (both["applied"], both["duplicate"]) == (1, 1)
    assert [(r.events, r.lines) for r in rows] == [(valid[:1], [0]), (valid[1:], [1])]
    assert held == [1, 1]


def test_a_part_that_cannot_be_decoded_is_refused_and_nothing_is_journaled(settings):
    async def scenario():
        node = shard(settings)
        with pytest.raises(ValueError):
            await node.apply_part("src", b"not an encoded part")
        return list(node.state.store.read_journal("A", 0))

    assert asyncio.run(scenario()) == []
