"""The column-wise profile table against the reference model: pure numpy, no services.

Every batch is applied both ways (``ProfileTable.apply`` and ``apply_events`` per
user) and every profile must come out the same, on batches built to hit each
path: late events, equal timestamps, full recent bags, more topics than slots,
hides, rebases, replays, embeddings.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from actors.item_stats import ItemStats
from actors.profile import Profile, ProfileRules, apply_events
from actors.profile_table import ProfileTable
from persona.settings import load_settings
from storage import codec

T = 1_700_000_000.0
DAY = 86_400.0
SMALL = load_settings(top_k_topics=5, recent_actions=7, hidden_items=3)
# Room for every topic: only the recent bag overflows, so rows stay on the fast path.
ROOMY = load_settings(top_k_topics=20, recent_actions=7, hidden_items=3)
ACTIONS = ["view"] * 6 + ["click", "click", "save", "hide"]


def random_batch(rng: random.Random, size: int, *, users: int, spread: float, ties: bool):
    topics = [f"t{n}" for n in range(12)]
    return [
        (
            f"u{rng.randrange(users)}",
            f"i{rng.randrange(40)}",
            rng.choice(ACTIONS),
            T + (rng.randrange(20) * 60.0 if ties else rng.uniform(0, spread)),
            tuple(rng.sample(topics, rng.randint(0, 3))),
            rng.choice([1.0, 0.5, 2.0]),
        )
        for _ in range(size)
    ]


def reference_apply(profiles: dict, rules, batch, seq, embeddings=None):
    by_user: dict[str, list] = {}
    for event in batch:
        by_user.setdefault(event[0], []).append(event)
    for user, events in by_user.items():
        profile = profiles.setdefault(user, Profile(user, len(rules.actions)))
        if profile.journal == "j" and profile.position >= seq:
            continue
        apply_events(profile, events, rules, embeddings=embeddings)
        profile.journal, profile.position = "j", seq


def assert_same(table: ProfileTable, profiles: dict, rules) -> None:
    assert set(table) == set(profiles)
    for user, expected in profiles.items():
        got = table.get(user)
        assert got.counts == expected.counts, user
        assert (got.events, got.version, got.position) == (
            expected.events,
            expected.version,
            expected.position,
        ), user
        assert (got.first_seen, got.last_seen, got.t0) == (
            expected.first_seen,
            expected.last_seen,
            expected.t0,
        ), user
        assert got.recent == expected.recent, user
        assert got.hidden == expected.hidden, user
        assert got.seen == expected.seen, user
        assert got.topics.keys() == expected.topics.keys(), user
        for topic, score in expected.topics.items():
            assert got.topics[topic] == pytest.approx(score, rel=1e-12, abs=1e-300), user
        assert got.embedding_weight == pytest.approx(expected.embedding_weight), user


@pytest.mark.parametrize("settings", [SMALL, ROOMY], ids=["few-topic-slots", "roomy"])
@pytest.mark.parametrize(
    ("spread", "ties", "users"),
    [(30 * DAY, False, 50), (600.0, True, 8), (12 * 365 * DAY, False, 5), (30 * DAY, False, 400)],
    ids=["late-events", "equal-times", "rebases", "many-users"],
)
def test_table_matches_reference_model(settings, spread, ties, users):
    rules = ProfileRules.from_settings(settings)
    rng = random.Random(7)
    table, profiles = ProfileTable(rules, capacity=16), {}
    for seq in range(1, 40):
        batch = random_batch(rng, rng.randint(1, 120), users=users, spread=spread, ties=ties)
        table.apply(batch, seq, "j")
        reference_apply(profiles, rules, batch, seq)
    assert_same(table, profiles, rules)


def test_replayed_rows_are_skipped_and_removed_users_start_over():
    rules = ProfileRules.from_settings(SMALL)
    rng = random.Random(3)
    table, profiles = ProfileTable(rules), {}
    batches = [random_batch(rng, 60, users=20, spread=DAY, ties=False) for _ in range(6)]
    for seq, batch in enumerate(batches, 1):
        table.apply(batch, seq, "j")
        reference_apply(profiles, rules, batch, seq)
    applied = table.apply(batches[-1], len(batches), "j")  # the same row again: skipped
    assert applied == 0
    table.remove("u3")
    profiles.pop("u3", None)
    assert "u3" not in table
    extra = [("u3", "i1", "click", T, ("t1",), 1.0)]
    table.apply(extra, 99, "j")
    reference_apply(profiles, rules, extra, 99)
    assert_same(table, profiles, rules)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-times", "equal-times"])
def test_round_trip_through_both_record_forms(ties):
    """The stored (columnar) blob and the list record both give back the same profile."""
    rules = ProfileRules.from_settings(SMALL)
    rng = random.Random(5)
    table = ProfileTable(rules)
    for seq in range(1, 6):
        table.apply(random_batch(rng, 300, users=30, spread=DAY, ties=ties), seq, "j")
    blobs = table.encode([*table, "not-resident"])
    assert set(blobs) == set(table)
    from_blobs, from_lists = ProfileTable(rules), ProfileTable(rules)
    for user in table:
        record = codec.decode(blobs[user])
        from_blobs.put(Profile.from_record(record, rules))
        from_lists.put(Profile.from_record(table.get(user).to_record(rules), rules))
    for user in table:
        want = table.get(user).to_record(rules)
        assert from_blobs.get(user).to_record(rules) == want
        assert from_lists.get(user).to_record(rules) == want
        assert table.get(user).recent == sorted(table.get(user).recent)


def test_bulk_loading_records_equals_loading_them_one_by_one():
    rules = ProfileRules.from_settings(SMALL)
    rng = random.Random(17)
    table = ProfileTable(rules)
    vectors = {f"i{n}": np.array([1.0, float(n)]) for n in range(0, 40, 3)}
    for seq in range(1, 8):
        batch = random_batch(rng, 200, users=40, spread=DAY, ties=seq % 2 == 0)
        table.apply(batch, seq, "j", embeddings=vectors)
    table.apply([("fresh", "i1", "view", T, (), 1.0)], 9, "j")
    records = [codec.decode(blob) for blob in table.encode(list(table)).values()]
    # Other shapes go one by one: the list form, and a record from a bigger config.
    records.append(table.get("u1").to_record(rules) | {"u": "listed"})
    bigger = ProfileTable(ProfileRules.from_settings(load_settings(recent_actions=30)))
    bigger.apply([("big", f"i{n}", "view", T + n, (), 1.0) for n in range(20)], 1, "j")
    records.append(codec.decode(bigger.encode(["big"])["big"]))
    bulk, single = ProfileTable(rules), ProfileTable(rules)
    bulk.put(Profile.from_record(records[0], rules))  # replaced by the bulk load
    bulk.put_records(records)
    for record in records:
        single.put(Profile.from_record(record, rules))
    assert set(bulk) == set(single)
    for user in single:
        assert bulk.get(user).to_record(rules) == single.get(user).to_record(rules), user
    assert len(bulk.get("big").recent) == rules.recent_n

    # The co-engagement context is the last three recent actions, as after a batch.
    def context(t: ProfileTable, user: str) -> list[str]:
        return [t.items.names[i] for i in t.context_of([t.rows[user]])[1][0].tolist()]

    for user in table:
        assert context(bulk, user) == context(table, user), user


def test_stored_counters_follow_action_names_when_the_config_changes():
    rules = ProfileRules.from_settings(SMALL)
    table = ProfileTable(rules)
    table.apply([("u", "i", "click", T, (), 1.0), ("u", "i", "hide", T + 1, (), 1.0)], 1, "j")
    record = codec.decode(table.encode(["u"])["u"])
    fewer = ProfileRules.from_settings(load_settings(action_weights={"click": 1.0, "view": 0.5}))
    profile = Profile.from_record(record, fewer)
    assert profile.counts[fewer.code("click")] == 1
    assert [r[1:] for r in profile.recent] == [("i", fewer.code("click"))]


def test_embeddings_follow_the_reference():
    rules = ProfileRules.from_settings(SMALL)
    vectors = {f"i{n}": np.array([float(n), 1.0]) for n in range(0, 40, 2)}
    rng = random.Random(11)
    table, profiles = ProfileTable(rules), {}
    for seq in range(1, 10):
        batch = random_batch(rng, 80, users=10, spread=DAY, ties=False)
        table.apply(batch, seq, "j", embeddings=vectors)
        reference_apply(profiles, rules, batch, seq, embeddings=vectors)
    assert_same(table, profiles, rules)
    for user, expected in profiles.items():
        got = table.get(user).interest_vector()
        want = expected.interest_vector()
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want)


def test_item_signals_match_the_per_user_observer():
    """The batched observer links the same pairs with the same weights as ``observe``."""
    settings = load_settings(co_engagement_neighbours=50)
    rules = ProfileRules.from_settings(settings)
    rng = random.Random(13)
    table = ProfileTable(rules)
    batched = ItemStats(settings, settings.action_weights)
    reference = ItemStats(settings, settings.action_weights)
    profiles: dict[str, Profile] = {}
    for seq in range(1, 30):
        batch = random_batch(rng, 100, users=15, spread=2 * DAY, ties=False)
        table.apply(batch, seq, "j", stats=batched)
        by_user: dict[str, list] = {}
        for event in batch:
            by_user.setdefault(event[0], []).append(event)
        for user, events in by_user.items():
            profile = profiles.setdefault(user, Profile(user, len(rules.actions)))
            reference.observe(events, profile.recent)
            apply_events(profile, events, rules)
    now = T + 3 * DAY
    got, want = batched.snapshot(now), reference.snapshot(now)
    assert got["trending"].keys() == want["trending"].keys()
    for item, score in want["trending"].items():
        assert got["trending"][item] == pytest.approx(score, rel=1e-9)
    assert got["graph"].keys() == want["graph"].keys()
    for item, neighbours in want["graph"].items():
        assert got["graph"][item] == pytest.approx(neighbours, rel=1e-9)


def test_least_recent_users_come_first():
    rules = ProfileRules.from_settings(SMALL)
    table = ProfileTable(rules)
    for n, user in enumerate(["a", "b", "c", "d"]):
        table.apply([(user, "i", "view", T + n, (), 1.0)], n + 1, "j")
    table.touch(["a"])
    assert table.least_recent(2) == ["b", "c"]
    assert table.least_recent(10) == ["b", "c", "d", "a"]


def test_items_that_leave_the_recent_bag_are_remembered_as_met_earlier():
    rules = ProfileRules.from_settings(ROOMY)  # 7 recent actions
    table, profiles = ProfileTable(rules, capacity=4), {}
    films = [f"film-{n}" for n in range(30)]
    for seq, at in enumerate(range(0, 30, 3), start=1):  # three a batch, in time order
        batch = [("u", films[n], "view", T + n, (), 1.0) for n in range(at, at + 3)]
        if at < 15:  # v stays within 7
            batch.append(("v", films[at], "click", T + at, (), 1.0))
        table.apply(batch, seq, "j")
        reference_apply(profiles, rules, batch, seq)
    assert_same(table, profiles, rules)
    view = table.view("u")
    assert [item for _, item, _ in view.recent] == films[:-8:-1]  # the last 7
    assert all(view.saw_earlier(film) for film in films[:23])
    assert sum(view.saw_earlier(f"never-{n}") for n in range(1_000)) <= 5
    assert table.view("v").earlier is None
    # A late event older than a full bag never enters it: it is met earlier at once.
    table.apply([("u", "old-film", "view", T - DAY, (), 1.0)], 99, "j")
    assert table.view("u").saw_earlier("old-film")
    # The filter is stored and read back, through both record forms.
    record = codec.decode(table.encode(["u"])["u"])
    again = ProfileTable(rules)
    again.put_records([record])
    assert again.view("u").earlier == table.view("u").earlier
    listed = Profile.from_record(table.get("u").to_record(rules), rules)
    assert listed.view(rules).earlier == table.view("u").earlier


def test_compacting_the_pools_between_batches_changes_no_profile(monkeypatch):
    """Rows grow into larger extents and leave the old ones behind; compacting after
    every batch (the threshold at nothing) keeps every row equal to the reference."""
    monkeypatch.setattr("actors.extents.MIN_IDLE", 0)
    monkeypatch.setattr("actors.extents.IDLE_SHARE", 0.0)
    rules = ProfileRules.from_settings(ROOMY)
    rng = random.Random(23)
    table, profiles = ProfileTable(rules, capacity=8), {}
    for seq in range(1, 30):
        batch = random_batch(rng, rng.randint(1, 150), users=60, spread=30 * DAY, ties=False)
        table.apply(batch, seq, "j")
        reference_apply(profiles, rules, batch, seq)
        if seq % 7 == 0:
            table.remove(f"u{seq}")
            profiles.pop(f"u{seq}", None)
    assert table.recent.idle == 0
    assert_same(table, profiles, rules)
