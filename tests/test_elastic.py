"""Elastic shards: live rebalancing under load, the zombie fence, and the resident cap."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import ray

from actors.fleet import Fleet
from actors.routing import partition_of, plan_moves
from persona.errors import ShardUnavailable, StaleEpoch
from tests.test_shards import assert_matches_reference, make_batch, reference_profiles

CASSANDRA = pytest.mark.parametrize("fresh_settings", ["cassandra"], indirect=True)


def test_plan_moves_balances_and_moves_little():
    owners = {p: f"s{p % 2}" for p in range(16)}
    grow = plan_moves(owners, ["s0", "s1", "s2", "s3"])
    assert len(grow) == 8 and all(src in ("s0", "s1") for _, src, _ in grow)
    after = dict(owners)
    for partition, _, target in grow:
        after[partition] = target
    assert sorted(list(after.values()).count(s) for s in ("s0", "s1", "s2", "s3")) == [4, 4, 4, 4]
    shrink = plan_moves(after, ["s0"])
    assert {target for _, _, target in shrink} == {"s0"} and len(shrink) == 12
    assert plan_moves(owners, ["s0", "s1"]) == []


@CASSANDRA
def test_scale_2_to_4_to_1_while_writing_and_reading(fleet, connect_fleet):
    settings = fleet.settings
    rng = random.Random(11)
    batches = [make_batch(rng, 100, users=400) for _ in range(150)]
    acked: list[list[dict]] = []
    read_errors: list[BaseException] = []
    stop = threading.Event()
    shrunk = threading.Event()

    def writer() -> None:
        own = connect_fleet(settings)
        for n, batch in enumerate(batches):
            if n == len(batches) - 10:
                shrunk.wait(120)  # the last batches go after both scales, whatever the speed
            for _attempt in range(20):
                try:
                    own.apply(f"live-{n}", batch)
                    acked.append(batch)
                    break
                except StaleEpoch:
                    time.sleep(0.2)
            time.sleep(0.03)

    def acked_at_least(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(acked) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def reader() -> None:
        own = connect_fleet(settings)
        users = [f"user-{u}" for u in range(400)]
        while not stop.is_set():
            try:
                own.get_profiles(random.sample(users, 20))
            except BaseException as exc:  # any failure of a read is what this test forbids
                read_errors.append(exc)
            time.sleep(0.01)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    acked_at_least(10)
    grown = fleet.scale(4)
    assert {m["to"] for m in grown} == {"persona-shard-2", "persona-shard-3"}
    during_growth = len(acked)
    acked_at_least(during_growth + 10)
    fleet.scale(1)
    during_shrink = len(acked)
    shrunk.set()
    # The moves happened while the writer was still writing.
    assert 10 <= during_growth < during_shrink < len(batches)
    threads[0].join()
    stop.set()
    threads[1].join()
    assert read_errors == []
    assert len(acked) == len(batches)
    assert sorted(fleet.shards) == ["persona-shard-0"]
    for removed in ("persona-shard-1", "persona-shard-2", "persona-shard-3"):
        with pytest.raises(ValueError):
            ray.get_actor(removed, namespace=settings.namespace)
    assert set(fleet.store.get_assignments()[p].owner for p in range(fleet.partitions)) == {
        "persona-shard-0"
    }
    assert_matches_reference(fleet, reference_profiles(settings, batches))


def test_a_retried_batch_stays_exactly_once_across_a_move(fleet):
    batch = make_batch(random.Random(5), 200)
    assert fleet.apply("moving-batch", batch)["applied"] == 200
    fleet.scale(3)
    again = fleet.apply("moving-batch", batch)
    assert again == {"applied": 0, "duplicate": 200, "rejected": 0, "errors": []}
    assert_matches_reference(fleet, reference_profiles(fleet.settings, [batch]))


@pytest.mark.parametrize("fresh_settings", ["sqlite", "cassandra"], indirect=True)
def test_zombie_owner_is_fenced_by_the_store(fleet):
    user = "zombie-target"
    fleet.apply("z1", [{"user_id": user, "item_id": "a", "action": "view", "ts": time.time()}])
    partition = partition_of(user, fleet.partitions)
    zombie = fleet.owners[partition]
    other = next(n for n in fleet.shards if n != zombie)
    # The move happens in the store only: the old owner never hears about it.
    epoch = fleet.store.get_assignments()[partition].epoch
    fleet.store.claim_partitions(other, {partition: epoch})
    event = {"user_id": user, "item_id": "b", "action": "click", "ts": time.time()}
    with pytest.raises(StaleEpoch, match="owned by"):
        ray.get(fleet.shards[zombie].apply_batch.remote("z2", [event]))


@pytest.mark.parametrize("fresh_settings", ["sqlite"], indirect=True)
def test_resident_cap_holds_and_every_user_reads_back_correctly(ray_session, fresh_settings):
    from dataclasses import replace

    settings = replace(fresh_settings, max_resident_profiles=1000, shards=1)
    fleet = Fleet.start(settings)
    try:
        rng = random.Random(2)
        users = [f"capped-{n}" for n in range(10_000)]
        batches = []
        for at in range(0, len(users), 500):
            batch = [
                {
                    "user_id": u,
                    "item_id": f"i{rng.randrange(50)}",
                    "action": "click",
                    "ts": time.time() - rng.uniform(0, 1000),
                    "topics": [f"t{rng.randrange(8)}"],
                }
                for u in users[at : at + 500]
                for _ in range(2)
            ]
            batches.append(batch)
            fleet.apply(f"cap-{at}", batch)
            assert fleet.stats()[0]["resident"] <= 1000
        reference = reference_profiles(settings, batches)
        for at in range(0, len(users), 500):
            chunk = users[at : at + 500]
            assert_matches_reference(fleet, {u: reference[u] for u in chunk})
            assert fleet.stats()[0]["resident"] <= 1000
        stats = fleet.stats()[0]
        assert stats["evicted"] >= 9_000 and stats["load_misses"] >= 9_000
        # A restart after thousands of evictions replays the journal tail onto what
        # eviction wrote, and every user still reads back exactly once.
        more = [{**e, "item_id": "after"} for e in batches[0][:200]]
        fleet.apply("cap-after", more)
        restart = fleet.shards["persona-shard-0"]
        os.kill(ray.get(restart.pid.remote()), signal.SIGKILL)
        reference = reference_profiles(settings, [*batches, more])
        for at in range(0, len(users), 500):
            chunk = users[at : at + 500]
            assert_matches_reference(fleet, {u: reference[u] for u in chunk})
    finally:
        fleet.shutdown()


def test_delete_reaches_the_new_owner_after_a_move(fleet, connect_fleet):
    names = [f"persona-shard-{i}" for i in range(3)]
    moving = {p for p, _, _ in plan_moves(fleet.owners, names)}
    user = next(
        f"deletee-{n}"
        for n in range(10_000)
        if partition_of(f"deletee-{n}", fleet.partitions) in moving
    )
    fleet.apply("d1", [{"user_id": user, "item_id": "a", "action": "save", "ts": time.time()}])
    stale = connect_fleet(fleet.settings)  # its owner map predates the move
    fleet.scale(3)
    # The new owner now holds the user in memory.
    fleet.apply("d2", [{"user_id": user, "item_id": "b", "action": "view", "ts": time.time()}])
    assert stale.delete_user(user) is True
    assert fleet.get_profiles([user]) == {}
    assert stale.get_profiles([user]) == {}


@pytest.mark.parametrize("fresh_settings", ["sqlite", "cassandra"], indirect=True)
def test_new_owner_killed_right_after_a_move_recognises_retries(fleet):
    batch = make_batch(random.Random(9), 200)
    assert fleet.apply("before-move", batch)["applied"] == 200
    fleet.scale(3)
    # The new owner has never checkpointed: what it knows of the moved partitions'
    # applied lines is in the store, written by the old owner's hand-over.
    newcomer = fleet.shards["persona-shard-2"]
    os.kill(ray.get(newcomer.pid.remote()), signal.SIGKILL)
    for _attempt in range(60):
        try:
            again = fleet.apply("before-move", batch)
            break
        except ray.exceptions.RayActorError:
            time.sleep(0.25)
    assert again == {"applied": 0, "duplicate": 200, "rejected": 0, "errors": []}
    assert_matches_reference(fleet, reference_profiles(fleet.settings, [batch]))


def test_a_write_to_a_shard_that_is_gone_fails_fast_naming_it(fleet, connect_fleet):
    """A partition whose owner, as the store names it, no longer runs (killed for good,
    or never started in this namespace) cannot be routed: the write fails at once with
    the shard and its partitions, and is not re-routed until the re-route deadline
    answers "partitions kept moving". Once the shard runs again, the same fleet object
    (a replica's) finds the new incarnation and the retry applies exactly once."""
    user = "orphaned-user"
    event = {"user_id": user, "item_id": "a", "action": "click", "ts": time.time()}
    partition = partition_of(user, fleet.partitions)
    owner = fleet.owners[partition]
    writer = connect_fleet(fleet.settings)  # holds a handle to the shard that dies
    assert writer.apply("before", [{**event, "item_id": "z"}])["applied"] == 1
    ray.kill(fleet.shards[owner], no_restart=True)
    with pytest.raises(ShardUnavailable) as refused:
        writer.apply("orphaned", [event])
    assert f"{owner}" in str(refused.value) and f"{partition}" in str(refused.value)
    with pytest.raises(ShardUnavailable):
        writer.get_profiles([user])
    with pytest.raises(ShardUnavailable):
        connect_fleet(fleet.settings)  # a replica starting now is told the same
    Fleet.start(fleet.settings, fleet.store)  # what `persona scale` and `up` run first
    # ray.kill is asynchronous: the refused write may have landed just before the end.
    first = writer.apply("orphaned", [event])
    assert first["applied"] + first["duplicate"] == 1, first
    assert writer.apply("orphaned", [event])["duplicate"] == 1
    assert user in writer.get_profiles([user])
