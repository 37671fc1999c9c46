"""Profile shards on a real Ray: exactly-once ingestion, restarts, checkpoints, deletes.

Durability tests run against both stores; the reference profile for each user is
computed in-process from the same acknowledged events.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import pytest
import ray

from actors.fleet import Fleet
from actors.profile import Profile, ProfileRules, apply_events
from actors.routing import partition_of
from actors.shard_state import journal_row
from persona.errors import StaleEpoch, StoreUnavailable
from storage import codec, open_store

NOW = time.time()
BOTH = pytest.mark.parametrize("fresh_settings", ["sqlite", "cassandra"], indirect=True)


def make_batch(rng: random.Random, size: int, users: int = 300, items: int = 200) -> list[dict]:
    actions = ["view"] * 6 + ["click"] * 2 + ["save", "hide"]
    return [
        {
            "user_id": f"user-{rng.randrange(users)}",
            "item_id": f"item-{rng.randrange(items)}",
            "action": rng.choice(actions),
            "ts": NOW - rng.uniform(0, 30 * 86_400),
            "topics": rng.sample([f"topic-{t}" for t in range(40)], rng.randint(0, 3)),
        }
        for _ in range(size)
    ]


def reference_profiles(settings, batches: list[list[dict]]) -> dict[str, Profile]:
    """What every profile must be: the acknowledged batches applied in order, in-process."""
    rules = ProfileRules.from_settings(settings)
    profiles: dict[str, Profile] = {}
    for batch in batches:
        by_user: dict[str, list] = {}
        for e in batch:
            by_user.setdefault(e["user_id"], []).append(
                (e["user_id"], e["item_id"], e["action"], float(e["ts"]), tuple(e["topics"]), 1.0)
            )
        for user, events in by_user.items():
            profile = profiles.setdefault(user, Profile(user, len(rules.actions)))
            apply_events(profile, events, rules)
    return profiles


def assert_matches_reference(fleet: Fleet, reference: dict[str, Profile]) -> None:
    rules = ProfileRules.from_settings(fleet.settings)
    stored = fleet.get_profiles(list(reference))
    assert set(stored) == set(reference)
    for user, expected in reference.items():
        got, want_view = stored[user], expected.view(rules)
        assert got.counters == want_view.counters, user
        assert got.events == want_view.events, user
        assert [r[:2] for r in got.recent] == [r[:2] for r in want_view.recent], user
        want = dict(expected.interests_at(rules, NOW))
        have = dict(got.interests_at(rules, NOW))
        assert have.keys() == want.keys(), user
        for topic, score in want.items():
            assert have[topic] == pytest.approx(score, rel=1e-9, abs=1e-12), (user, topic)


def apply_with_retries(fleet: Fleet, batch_id: str, events: list[dict], attempts: int = 30):
    for attempt in range(attempts):
        try:
            return fleet.apply(batch_id, events)
        except (ray.exceptions.RayActorError, StoreUnavailable):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    return None


def restart_shard(fleet: Fleet, name: str, how: str) -> None:
    handle = fleet.shards[name]
    if how == "ray.kill":
        ray.kill(handle, no_restart=False)
    else:
        os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)


def test_events_are_readable_in_the_next_call(fleet):
    ack = fleet.apply("b1", [{"user_id": "ann", "item_id": "x", "action": "click", "ts": NOW}])
    assert ack == {"applied": 1, "duplicate": 0, "rejected": 0, "errors": []}
    record = fleet.get_profiles(["ann", "nobody"])
    assert list(record) == ["ann"] and record["ann"].counters == {"click": 1}


def test_invalid_events_are_rejected_with_index_and_reason(fleet):
    ack = fleet.apply(
        "b1",
        [
            {"user_id": "ann", "item_id": "x", "action": "click", "ts": NOW},
            {"user_id": "ann", "item_id": "x", "action": "teleport", "ts": NOW},
        ],
    )
    assert ack["applied"] == 1 and ack["rejected"] == 1
    assert ack["errors"][0]["index"] == 1 and "unknown action" in ack["errors"][0]["reason"]


@BOTH
def test_retried_batch_is_applied_once_even_after_a_restart(fleet):
    batch = make_batch(random.Random(1), 200)
    first = fleet.apply("batch-A", batch)
    assert first["applied"] == 200
    assert fleet.apply("batch-A", batch)["duplicate"] == 200
    for name in fleet.shards:
        restart_shard(fleet, name, "ray.kill")
    again = apply_with_retries(fleet, "batch-A", batch)
    assert again["duplicate"] == 200 and again["applied"] == 0
    assert_matches_reference(fleet, reference_profiles(fleet.settings, [batch]))


@BOTH
def test_a_refused_journal_write_is_neither_acknowledged_nor_applied(fleet):
    user = "victim"
    fleet.apply("before", [{"user_id": user, "item_id": "a", "action": "view", "ts": NOW}])
    partition = partition_of(user, fleet.partitions)
    owner = fleet.owners[partition]
    # The partition is taken away in the store, behind the shard's back: its next
    # journal append is fenced by the store itself.
    store = open_store(settings=fleet.settings)
    epoch = store.get_assignments()[partition].epoch
    store.claim_partitions("someone-else", {partition: epoch})
    event = {"user_id": user, "item_id": "b", "action": "save", "ts": NOW}
    applied_before = ray.get(fleet.shards[owner].stats.remote())["applied"]
    with pytest.raises(StaleEpoch):
        ray.get(fleet.shards[owner].apply_batch.remote("fenced", [event]))
    # Nothing of it reached the journal or memory, and the shard stopped believing
    # it owns the partition.
    journaled = [codec.decode(blob) for _, blob in store.read_journal(owner, 0)]
    assert not any(row.get("source") == "fenced" for row in journaled)
    after = ray.get(fleet.shards[owner].stats.remote())
    assert after["applied"] == applied_before
    assert ray.get(fleet.shards[owner].get_profiles.remote([user]))["moved"] == [user]
    store.close()


@BOTH
@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_killing_a_shard_mid_ingestion_loses_and_doubles_nothing(fleet, how):
    rng = random.Random(7)
    batches = [make_batch(rng, 150) for _ in range(24)]
    victim = sorted(fleet.shards)[0]
    for n, batch in enumerate(batches):
        if n in (6, 15):
            restart_shard(fleet, victim, how)
        if n == 10:
            fleet.checkpoint()
        ack = apply_with_retries(fleet, f"batch-{n}", batch)
        assert ack["applied"] + ack["duplicate"] == len(batch)
    assert_matches_reference(fleet, reference_profiles(fleet.settings, batches))


@BOTH
def test_checkpoint_while_ingesting_then_restart(fleet):
    rng = random.Random(3)
    batches = [make_batch(rng, 200) for _ in range(12)]
    pending = []
    for n, batch in enumerate(batches):
        for shard in fleet.shards.values():
            if n % 3 == 1:
                pending.append(shard.checkpoint.remote())
        fleet.apply(f"b{n}", batch)
    ray.get(pending)
    stats = {s["name"]: s for s in fleet.stats()}
    assert all(s["checkpoint_seq"] > 0 for s in stats.values())
    # What recovery must replay: the journal rows after each shard's last checkpoint.
    store = open_store(settings=fleet.settings)
    tail_users = {}
    for name in fleet.shards:
        rows = store.read_journal(name, store.get_checkpoint(name).seq)
        tail_users[name] = {
            e[0] for _, blob in rows for e in journal_row(codec.decode(blob)).events
        }
    store.close()
    assert any(tail_users.values()), "the last batches must come after the last checkpoint"
    for name in fleet.shards:
        restart_shard(fleet, name, "SIGKILL")
    # Right after recovery, exactly the users of the journal tail are in memory...
    after = {s["name"]: s for s in stats_when_back(fleet)}
    assert {n: after[n]["resident"] for n in after} == {n: len(u) for n, u in tail_users.items()}
    # ...and everyone else loads from the checkpoint, exactly as acknowledged.
    assert_matches_reference(fleet, reference_profiles(fleet.settings, batches))


def stats_when_back(fleet: Fleet, attempts: int = 120) -> list[dict]:
    """Shard statistics once every shard answers again after a kill."""
    for _ in range(attempts):
        try:
            return fleet.stats()
        except ray.exceptions.RayActorError:
            time.sleep(0.25)
    return fleet.stats()


@BOTH
def test_killing_a_shard_with_calls_in_flight_loses_and_doubles_nothing(fleet):
    """SIGKILL lands while batches are queued and being journaled on the shard: some
    calls die before the append, some after it and before their ack. Ray re-sends
    calls in flight to the restarted shard (max_task_retries=-1); whatever still
    fails is resent by the client under the same source. Either way: once."""
    rng = random.Random(17)
    batches = [make_batch(rng, 400) for _ in range(30)]
    name = sorted(fleet.shards)[0]
    handle = fleet.shards[name]
    validated = [fleet.validate(b)[0] for b in batches]
    for round_ in range(3):
        sent = {}
        for n in range(round_ * 10, round_ * 10 + 10):
            # The victim's part of batch n, each event under its line in the batch (as
            # the fleet sends it, so the client's resend below names the same lines).
            mine = [
                (line, e)
                for line, e in enumerate(validated[n])
                if fleet.owners[partition_of(e[0], fleet.partitions)] == name
            ]
            sent[n] = handle.apply_batch.remote(
                f"inflight-{n}", [e for _, e in mine], True, [line for line, _ in mine]
            )
        os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)
        for ref in sent.values():
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)  # what failed is resent below, as a client would
    for n, batch in enumerate(batches):
        ack = apply_with_retries(fleet, f"inflight-{n}", batch)
        assert ack["applied"] + ack["duplicate"] == len(batch)
    assert_matches_reference(fleet, reference_profiles(fleet.settings, batches))


@BOTH
def test_deleted_user_stays_deleted_after_replay(fleet):
    events = [
        {"user_id": "gone", "item_id": "a", "action": "click", "ts": NOW},
        {"user_id": "kept", "item_id": "a", "action": "click", "ts": NOW},
    ]
    fleet.apply("b1", events)
    fleet.checkpoint()
    fleet.apply("b2", events)  # journaled after the checkpoint: replayed on restart
    assert fleet.delete_user("gone") is True
    assert fleet.get_profiles(["gone"]) == {}
    for name in fleet.shards:
        restart_shard(fleet, name, "SIGKILL")
    assert apply_with_retries(fleet, "b3", events[1:])["applied"] == 1
    profiles = fleet.get_profiles(["gone", "kept"])
    assert list(profiles) == ["kept"] and profiles["kept"].counters == {"click": 3}
    store = open_store(settings=fleet.settings)
    assert store.get_profiles(["gone"]) == {} and "gone" in store.get_tombstones(["gone"])
    store.close()
    # Events from before the delete are dropped (re-ingesting an old file)...
    old = fleet.apply("b4", events[:1])
    assert (old["applied"], old["rejected"]) == (0, 1)
    assert fleet.get_profiles(["gone"]) == {}
    # ...and coming back after the delete starts a new profile.
    fleet.apply("b5", [{**events[0], "ts": time.time() + 1}])
    assert fleet.get_profiles(["gone"])["gone"].counters == {"click": 1}


def test_evicted_or_restarted_users_load_from_the_store_on_read(fleet):
    fleet.apply("b1", [{"user_id": "lazy", "item_id": "a", "action": "save", "ts": NOW}])
    fleet.checkpoint()
    name = fleet.owners[partition_of("lazy", fleet.partitions)]
    restart_shard(fleet, name, "SIGKILL")
    stats = next(s for s in stats_when_back(fleet) if s["name"] == name)
    assert stats["resident"] == 0  # nothing replayed: the checkpoint covered it
    assert fleet.get_profiles(["lazy"])["lazy"].counters == {"save": 1}
    assert ray.get(fleet.shards[name].stats.remote())["loaded"] == 1


def test_a_fleet_closes_the_store_it_opened_and_never_one_it_was_given(fleet):
    import sqlite3

    borrowed = Fleet.connect(fleet.settings, fleet.store)
    borrowed.close()
    assert len(fleet.store.get_assignments()) == fleet.partitions  # the caller's, still open
    with Fleet.connect(fleet.settings) as own:
        assert own.get_profiles(["nobody"]) == {}
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        own.store.get_assignments()
    own.close()  # idempotent


def test_a_fleet_that_cannot_connect_closes_the_store_it_opened(tmp_path, monkeypatch):
    import sqlite3

    import actors.fleet
    from persona.errors import ConfigError
    from persona.settings import load_settings

    opened = []

    def recording_open_store(**options):
        opened.append(open_store(**options))
        return opened[-1]

    monkeypatch.setattr(actors.fleet, "open_store", recording_open_store)
    settings = load_settings(store_url=f"sqlite:///{tmp_path}/persona.db", partitions=4)
    with pytest.raises(ConfigError, match="start the fleet first"):
        Fleet.connect(settings)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].get_assignments()
