"""The profile model against closed-form expectations and hypothesis properties (no Ray)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.profile import Profile, ProfileRules, apply_events
from persona.settings import load_settings
from storage import codec

DAY = 86_400.0
RULES = ProfileRules.from_settings(load_settings())
T = 1_700_000_000.0


def event(item="i1", action="view", ts=T, topics=("jazz",), weight=1.0, user="u"):
    return (user, item, action, ts, tuple(topics), weight)


def build(events, rules=RULES):
    profile = Profile("u", len(rules.actions))
    apply_events(profile, events, rules)
    return profile


def score_at(profile, topic, at):
    return dict(profile.interests_at(RULES, at))[topic]


def test_single_event_decays_by_half_life():
    profile = build([event(action="click", ts=T)])
    w = RULES.weights[RULES.code("click")]
    for days in (0, 1, 7, 14, 30):
        expected = w * 2 ** (-(days * DAY) / RULES.half_life_s)
        assert score_at(profile, "jazz", T + days * DAY) == pytest.approx(expected, rel=1e-12)


def test_scores_add_with_their_own_ages():
    profile = build([event(action="view", ts=T), event(action="save", ts=T + 3 * DAY)])
    at = T + 10 * DAY
    hl = RULES.half_life_s
    expected = RULES.weights[RULES.code("view")] * 2 ** (-(10 * DAY) / hl) + RULES.weights[
        RULES.code("save")
    ] * 2 ** (-(7 * DAY) / hl)
    assert score_at(profile, "jazz", at) == pytest.approx(expected, rel=1e-12)


def test_counters_seen_times_and_version():
    profile = build([event(action="view", ts=T + 5), event(action="click", ts=T), event(ts=T + 2)])
    assert profile.counts[RULES.code("view")] == 2 and profile.counts[RULES.code("click")] == 1
    assert (profile.first_seen, profile.last_seen, profile.events) == (T, T + 5, 3)
    assert profile.version == 1
    apply_events(profile, [event(ts=T + 9)], RULES)
    assert profile.version == 2 and profile.events == 4


def test_late_event_is_applied_at_its_own_time():
    profile = build([event(ts=T + 10 * DAY, topics=("new",)), event(ts=T, topics=("old",))])
    at = T + 10 * DAY
    assert score_at(profile, "old", at) == pytest.approx(2 ** (-10 * DAY / RULES.half_life_s))
    assert score_at(profile, "new", at) == pytest.approx(1.0)
    assert [r[0] for r in profile.recent] == [T, T + 10 * DAY]


def test_hide_lowers_the_topic_and_remembers_the_item():
    profile = build(
        [event(action="click", item="a", ts=T), event(action="hide", item="b", ts=T + 1)]
    )
    assert (
        score_at(profile, "jazz", T + 1) < 0 < score_at(build([event(action="click")]), "jazz", T)
    )
    assert profile.is_hidden("b") and not profile.is_hidden("a")


def test_topics_recent_and_hidden_are_bounded():
    rules = ProfileRules.from_settings(
        load_settings(top_k_topics=5, recent_actions=7, hidden_items=3)
    )
    events = [
        event(item=f"i{n}", action="hide" if n % 2 else "view", ts=T + n, topics=(f"t{n}",))
        for n in range(50)
    ]
    profile = build(events, rules)
    assert len(profile.topics) == 5 and len(profile.recent) == 7 and len(profile.hidden) == 3
    assert [r[1] for r in profile.recent] == [f"i{n}" for n in range(43, 50)]
    assert set(profile.hidden) == {"i45", "i47", "i49"}


def test_ten_year_old_history_still_orders_topics():
    start = T - 10 * 365 * DAY
    events = [event(ts=start + d * DAY, topics=("daily",)) for d in range(0, 3650, 3)]
    events += [event(ts=start + 100 * DAY, action="purchase", topics=("once-long-ago",))]
    events += [event(ts=start + 3649 * DAY, topics=("yesterday",), action="view")]
    profile = build(events)
    ranked = [t for t, _ in profile.ranked_topics()]
    assert ranked == ["daily", "yesterday", "once-long-ago"]
    assert all(math.isfinite(s) for s in profile.topics.values())
    # Viewed from today the scores are tiny, but ranking never uses those numbers.
    assert [t for t, _ in profile.interests_at(RULES, T)][:2] == ["daily", "yesterday"]


def test_record_round_trip_through_the_codec():
    profile = build(
        [event(action="hide", item="x", ts=T), event(ts=T + 1, topics=("a", "b"), weight=2.5)]
    )
    again = Profile.from_record(codec.decode(codec.encode(profile.to_record(RULES))), RULES)
    assert again.to_record(RULES) == profile.to_record(RULES)


def test_a_read_sees_the_profile_by_field_name_and_survives_pickling():
    import pickle

    import numpy as np

    profile = Profile("u", len(RULES.actions))
    apply_events(
        profile,
        [
            event(item="x", action="hide", ts=T, topics=()),
            event(item="a", action="click", ts=T + 1, topics=("b", "a")),
            event(item="a", action="view", ts=T + 2, topics=()),
        ],
        RULES,
        embeddings={"a": np.array([2.0, 0.0])},
    )
    view = profile.view(RULES)
    assert (view.user_id, view.events, view.version) == ("u", 3, 1)
    assert view.counters == {"view": 1, "click": 1, "hide": 1}
    assert (view.first_seen, view.last_seen, view.t0) == (T, T + 2, T)
    # Equal scores rank by name; recent actions are newest first, by action name.
    assert view.topics == tuple(profile.ranked_topics())
    assert [t for t, _ in view.topics] == ["a", "b"] and view.topics[0][1] == view.topics[1][1]
    assert view.recent == ((T + 2, "a", "view"), (T + 1, "a", "click"), (T, "x", "hide"))
    assert view.hidden == {"x"}
    assert view.interest_vector == pytest.approx([2.0, 0.0])
    assert view.interests_at(RULES, T + DAY) == profile.interests_at(RULES, T + DAY)
    assert pickle.loads(pickle.dumps(view, protocol=5)) == view
    with pytest.raises(AttributeError):
        view.events = 4  # frozen


def test_a_profile_without_events_reads_as_empty():
    view = Profile("new", len(RULES.actions)).view(RULES)
    assert (view.first_seen, view.last_seen, view.t0) == (None, None, None)
    assert view.counters == {} and view.topics == () and view.recent == ()
    assert view.hidden == frozenset() and view.interest_vector is None
    assert view.interests_at(RULES, T) == []


def test_embedding_is_the_decayed_weighted_mean():
    import numpy as np

    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    profile = Profile("u", len(RULES.actions))
    apply_events(
        profile,
        [event(item="a", action="view", ts=T), event(item="b", action="view", ts=T)],
        RULES,
        embeddings=vectors,
    )
    assert profile.interest_vector() == pytest.approx([0.5, 0.5])


event_strategy = st.builds(
    lambda item, action, dt, topics, weight: event(
        item=item, action=action, ts=T + dt, topics=topics, weight=weight
    ),
    st.sampled_from([f"i{n}" for n in range(30)]),
    st.sampled_from(RULES.actions),
    st.floats(-400 * DAY, 400 * DAY),
    st.lists(st.sampled_from([f"t{n}" for n in range(100)]), max_size=4, unique=True).map(tuple),
    st.floats(0.01, 10.0),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(event_strategy, max_size=40), max_size=8))
def test_profile_stays_bounded_whatever_the_input(batches):
    profile = Profile("u", len(RULES.actions))
    for batch in batches:
        apply_events(profile, batch, RULES)
    assert len(profile.topics) <= RULES.top_k
    assert len(profile.recent) <= RULES.recent_n
    assert not profile.hidden or len(profile.hidden) <= RULES.hidden_n
    assert all(math.isfinite(s) for s in profile.topics.values())
    assert profile.events == sum(len(b) for b in batches)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_strategy, min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_equal_timestamps_in_any_order_give_the_same_profile(events, rng: random.Random):
    same_time = [(*e[:3], T, *e[4:]) for e in events]
    shuffled = list(same_time)
    rng.shuffle(shuffled)
    a, b = build(same_time), build(shuffled)
    assert a.counts == b.counts and a.recent == b.recent and a.hidden == b.hidden
    assert a.topics.keys() == b.topics.keys()
    for topic, score in a.topics.items():
        assert b.topics[topic] == pytest.approx(score, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5, 10.0), st.floats(0, 60 * DAY), st.floats(0, 60 * DAY))
def test_decay_matches_the_closed_form(weight, event_offset, query_gap):
    profile = build([event(action="view", ts=T + event_offset, weight=weight)])
    at = T + event_offset + query_gap
    expected = weight * 2 ** (-query_gap / RULES.half_life_s)
    assert score_at(profile, "jazz", at) == pytest.approx(expected, rel=1e-9)
