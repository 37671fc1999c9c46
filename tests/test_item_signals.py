"""Item signals and ranking: pure logic, no services."""

from __future__ import annotations

import pytest

from actors.item_stats import CONTEXT, ItemStats, merge_snapshots
from actors.profile import Profile, ProfileRules, apply_events
from persona.settings import load_settings
from serving.ranking import Catalog, Signals, assign_variant, recommend

T = 1_700_000_000.0
SETTINGS = load_settings(co_engagement_neighbours=3)


def ev(item, ts, action="click", user="u"):
    return (user, item, action, ts, (), 1.0)


def stats_with(*sessions):
    stats = ItemStats(SETTINGS, SETTINGS.action_weights)
    for events in sessions:
        stats.observe(events, [])
    return stats


def test_trending_decays_with_its_half_life():
    stats = stats_with([ev("a", T)])
    half_life = SETTINGS.trending_half_life_days * 86_400
    weight = SETTINGS.action_weights["click"]
    assert stats.snapshot(T + half_life)["trending"]["a"] == pytest.approx(weight / 2)


def test_hides_are_not_engagement():
    stats = stats_with([ev("a", T, "hide")])
    assert stats.snapshot(T)["trending"] == {}


def test_co_engagement_links_items_close_in_time_only():
    window = SETTINGS.co_engagement_window_s
    stats = stats_with([ev("a", T), ev("b", T + 10), ev("c", T + 10 + window + 1)])
    graph = stats.snapshot(T)["graph"]
    assert set(graph["a"]) == {"b"} and set(graph["b"]) == {"a"}
    assert "c" not in graph


def test_pairs_span_batches_through_the_previous_sequence():
    stats = ItemStats(SETTINGS, SETTINGS.action_weights)
    stats.observe([ev("b", T + 5)], [(T, "a", 1)])
    assert "a" in stats.snapshot(T)["graph"]["b"]


def test_an_engagement_pairs_with_the_whole_context_not_only_the_last_three():
    window = SETTINGS.co_engagement_window_s
    session = [ev(f"x{n}", T + n * window / (2 * CONTEXT)) for n in range(CONTEXT + 1)]
    roomy = load_settings(co_engagement_neighbours=2 * CONTEXT)
    stats = ItemStats(roomy, roomy.action_weights)
    stats.observe([*session, ev("late", T + window / 2 + 1)], [])
    assert set(stats.graph[f"x{CONTEXT}"]) == {f"x{n}" for n in range(CONTEXT)} | {"late"}
    assert set(stats.graph["late"]) == {f"x{n}" for n in range(1, CONTEXT + 1)}


def test_a_hide_is_never_paired_and_never_breaks_the_chain():
    stats = stats_with([ev("a", T), ev("bad", T + 1, "hide"), ev("b", T + 2)])
    assert "bad" not in stats.graph and set(stats.graph["b"]) == {"a"}
    # Across batches: a hide in the previous sequence is not context either.
    later = ItemStats(SETTINGS, SETTINGS.action_weights)
    click, hide = (list(SETTINGS.action_weights).index(a) for a in ("click", "hide"))
    later.observe([ev("c", T + 5)], [(T, "a", click), (T + 1, "bad", hide)])
    assert set(later.graph["c"]) == {"a"}


def test_snapshots_carry_engagement_counts_with_the_graph_half_life():
    stats = stats_with([ev("a", T), ev("b", T + 1)], [ev("a", T + 2, "view")])
    half_life = SETTINGS.co_engagement_half_life_days * 86_400
    counts = stats.snapshot(T + 2 + half_life)["counts"]
    assert counts["a"] == pytest.approx(2 / 2, rel=1e-6)  # engagements, not action weights
    assert counts["b"] == pytest.approx(1 / 2, rel=1e-6)


def test_neighbours_stay_bounded():
    stats = stats_with(*[[ev("hub", T + n), ev(f"x{n}", T + n + 1)] for n in range(50)])
    assert len(stats.graph["hub"]) <= 2 * SETTINGS.co_engagement_neighbours
    assert len(stats.snapshot(T)["graph"]["hub"]) == SETTINGS.co_engagement_neighbours


def test_snapshots_from_shards_add_up():
    one, two = stats_with([ev("a", T)]), stats_with([ev("a", T), ev("b", T + 1)])
    merged = merge_snapshots([one.snapshot(T), two.snapshot(T)])
    assert merged["trending"]["a"] == pytest.approx(2 * SETTINGS.action_weights["click"], rel=1e-6)
    assert merged["counts"]["a"] == pytest.approx(2.0, rel=1e-6)
    assert "a" in merged["graph"]["b"]


def test_a_snapshot_offers_the_most_similar_neighbours_not_the_most_popular():
    stats = ItemStats(SETTINGS, SETTINGS.action_weights)  # M = 3 neighbours
    for n in range(40):  # "pop" is engaged with by everyone, next to anything
        stats.observe([ev("pop", T + n, user=f"u{n}")], [])
    for n in range(4):  # "film" and "sequel" go together, rarely
        stats.observe([ev("film", T + 100 + n), ev("sequel", T + 101 + n)], [])
    for n in range(6):
        stats.observe([ev(f"other{n % 3}", T + 200 + n), ev("film", T + 201 + n)], [])
    for n in range(8):
        stats.observe([ev("pop", T + 300 + n), ev("film", T + 301 + n)], [])
    raw = stats.graph["film"]
    assert max(raw, key=raw.get) == "pop"  # the biggest raw co-count
    offered = stats.snapshot(T)["graph"]["film"]
    assert "sequel" in offered and "pop" not in offered


def test_variants_are_deterministic_and_follow_the_shares():
    experiments = {"a": {"share": 80}, "b": {"share": 20}}
    picks = [assign_variant(f"user-{n}", experiments) for n in range(5000)]
    assert picks == [assign_variant(f"user-{n}", experiments) for n in range(5000)]
    assert 0.75 < picks.count("a") / len(picks) < 0.85


def test_ranking_caps_topics_and_drops_hidden_and_seen():
    catalog = Catalog.from_records(
        [{"item_id": f"{t}-{n}", "topics": [t], "created_at": n} for t in "xy" for n in range(6)]
    )
    signals = Signals.build({"trending": {f"x-{n}": 10 - n for n in range(6)}}, catalog)
    rules = ProfileRules.from_settings(SETTINGS)
    user = Profile("u", len(rules.actions))
    apply_events(user, [("u", "x-0", "view", T, (), 1.0), ("u", "x-1", "hide", T, (), 1.0)], rules)
    profile = user.view(rules)
    items = recommend(profile, catalog, signals, {"trending": 1.0}, k=6, max_per_topic=2)
    ids = [i["item_id"] for i in items]
    assert ids[:2] == ["x-2", "x-3"]
    assert "x-0" not in ids and "x-1" not in ids
    assert sum(i.startswith("x-") for i in ids) == 2
    assert all(i["reason"] for i in items)


def test_signals_are_stored_in_chunks_that_do_not_grow_with_the_catalog():
    from storage import codec

    stats = ItemStats(load_settings(), load_settings().action_weights)
    stats.t0 = 0.0
    for item in range(30_000):
        stats.trending[f"item-{item}"] = float(item)
        stats.counts[f"item-{item}"] = float(item) / 3
        stats.graph[f"item-{item}"] = {f"item-{(item + k) % 30_000}": 1.0 / k for k in range(1, 21)}
    chunks = [codec.encode(chunk) for chunk in stats.chunks(max_bytes=256 * 1024)]
    assert len(chunks) > 10
    assert max(len(c) for c in chunks) < 2 * 256 * 1024
    again = ItemStats(load_settings(), load_settings().action_weights)
    again.restore_chunks(codec.decode(c) for c in chunks)
    assert again.trending == stats.trending and again.graph == stats.graph
    assert again.counts == stats.counts


def test_signals_checkpointed_before_counts_were_kept_still_restore():
    stats = ItemStats(SETTINGS, SETTINGS.action_weights)
    stats.restore_chunks([{"t0": T, "entries": [["a", 3.0, {"b": 2.0}], ["b", 1.0, {"a": 2.0}]]}])
    assert stats.trending == {"a": 3.0, "b": 1.0} and stats.graph["a"] == {"b": 2.0}
    assert stats.counts["a"] > 0 and "b" in stats.snapshot(T)["graph"]["a"]
