"""Ranking on merged item signals: cosine co-engagement, the recent sequence, hides. No services."""

from __future__ import annotations

import pytest

from actors.profile import Profile, ProfileRules, ProfileView, apply_events
from persona.settings import load_settings
from serving.ranking import (
    DEFAULT_SEEDS,
    Catalog,
    Seeds,
    Signals,
    cosine_graph,
    nearest_items,
    recommend,
)

T = 1_700_000_000.0
RULES = ProfileRules.from_settings(load_settings())
CATALOG = Catalog.from_records(
    [{"item_id": i, "topics": [f"t-{i}"]} for i in ("film", "sequel", "pop", "a", "b", "c", "x")]
)


def profile(*recent: tuple[str, str]) -> ProfileView:
    """The view a shard returns for a user whose actions were ``(item, action)``, oldest
    first, with no topics."""
    user = Profile("u", len(RULES.actions))
    events = [("u", item, action, T + n, (), 1.0) for n, (item, action) in enumerate(recent)]
    apply_events(user, events, RULES)
    return user.view(RULES)


def ids(items: list[dict]) -> list[str]:
    return [i["item_id"] for i in items]


def test_cosine_prefers_a_specific_co_engaged_item_over_a_globally_popular_one():
    # "pop" is engaged with 1,000 times and co-engaged with "film" 30 times (chance);
    # "sequel" is engaged with 20 times, 15 of them next to "film".
    merged = {
        "counts": {"film": 100.0, "sequel": 20.0, "pop": 1_000.0},
        "graph": {
            "film": {"pop": 30.0, "sequel": 15.0},
            "sequel": {"film": 15.0},
            "pop": {"film": 30.0},
        },
    }
    signals = Signals.build(merged, CATALOG)
    assert signals.graph["film"]["sequel"] == pytest.approx(15 / (100 * 20) ** 0.5)
    assert signals.graph["film"]["sequel"] > signals.graph["film"]["pop"]
    ranked = recommend(profile(("film", "click")), CATALOG, signals, {"co": 1.0}, k=2)
    assert ids(ranked) == ["sequel", "pop"]
    assert "film" in ranked[0]["reason"]


def test_similarities_add_up_over_the_recent_sequence_the_latest_weighing_most():
    graph = {"a": {"x": 0.5, "c": 0.6}, "b": {"x": 0.5}, "c": {}}
    signals = Signals(graph=graph)
    # x is similar to both recent items; c only to the older one, if more strongly.
    ranked = recommend(profile(("a", "view"), ("b", "save")), CATALOG, signals, {"co": 1.0}, k=2)
    assert ids(ranked) == ["x", "c"]
    assert ranked[0]["score"] == pytest.approx(1.0)  # normalised within the source
    latest, before = DEFAULT_SEEDS.weights(2)
    assert ranked[1]["score"] == pytest.approx(before * 0.6 / (latest * 0.5 + before * 0.5))


def test_what_resembles_a_hidden_item_is_pushed_down():
    graph = {"a": {"x": 0.5, "c": 0.45}, "b": {"x": 0.9}}
    signals = Signals(graph=graph)
    seen = profile(("a", "click"), ("b", "hide"))
    assert ids(recommend(seen, CATALOG, signals, {"co": 1.0}, k=2)) == ["x", "c"]
    avoiding = recommend(seen, CATALOG, signals, {"co": 1.0, "hidden": 0.5}, k=2)
    assert ids(avoiding) == ["c", "x"]
    # A hide is never a seed for candidates of its own.
    only_hidden = recommend(profile(("b", "hide")), CATALOG, signals, {"co": 1.0}, k=1)
    assert "x" not in ids(only_hidden)


def test_signals_rebuilt_for_a_new_catalog_are_normalised_once():
    merged = {"counts": {"a": 4.0, "b": 9.0}, "graph": {"a": {"b": 3.0}, "b": {"a": 3.0}}}
    signals = Signals.build(merged, CATALOG)
    again = Signals.build(signals.merged, CATALOG)
    assert again.graph == signals.graph == cosine_graph(merged["graph"], merged["counts"])
    assert signals.graph["a"]["b"] == pytest.approx(3 / 6)


def test_popular_is_engagement_over_the_graph_half_life():
    merged = {"counts": {"a": 1.0, "b": 5.0, "c": 3.0}, "trending": {"a": 9.0}}
    signals = Signals.build(merged, CATALOG)
    ranked = recommend(None, CATALOG, signals, {"popular": 1.0}, k=3)
    assert ids(ranked) == ["b", "c", "a"]
    assert ranked[0]["reason"] == "popular with people lately"


def test_top_topics_and_the_interest_vector_bring_their_own_candidates():
    import numpy as np

    catalog = Catalog.from_records(
        [
            {"item_id": "jazz-1", "topics": ["jazz"], "embedding": [1.0, 0.0]},
            {"item_id": "rock-1", "topics": ["rock"], "embedding": [0.0, 1.0]},
            {"item_id": "seen", "topics": ["jazz"], "embedding": [1.0, 0.0]},
        ]
    )
    signals = Signals.build({"trending": {"jazz-1": 2.0, "rock-1": 1.0}}, catalog)
    user = Profile("u", len(RULES.actions))
    events = [("u", "seen", "click", T, ("jazz",), 1.0)]
    apply_events(user, events, RULES, embeddings={"seen": np.array([1.0, 0.0])})
    view = user.view(RULES)
    by_topic = recommend(view, catalog, signals, {"topic": 1.0}, k=1)
    assert ids(by_topic) == ["jazz-1"] and "jazz" in by_topic[0]["reason"]
    nearest = recommend(view, catalog, signals, {"embedding": 1.0}, k=1)
    assert ids(nearest) == ["jazz-1"] and nearest[0]["reason"] == "similar to what you engage with"


def test_each_recommendation_says_what_every_source_added_and_they_sum_to_its_score():
    merged = {
        "counts": {"film": 10.0, "sequel": 5.0, "pop": 50.0, "x": 5.0},
        "graph": {"film": {"sequel": 4.0, "x": 1.0}, "x": {"film": 1.0}},
        "trending": {"pop": 3.0, "sequel": 1.0},
    }
    signals = Signals.build(merged, CATALOG)
    blend = {"co": 1.0, "trending": 0.5, "popular": 0.2, "hidden": 0.5}
    ranked = recommend(profile(("film", "click"), ("x", "hide")), CATALOG, signals, blend, k=3)
    assert ranked
    for item in ranked:
        assert set(item["sources"]) <= {"co", "trending", "popular", "hidden"}
        assert sum(item["sources"].values()) == pytest.approx(item["score"], abs=1e-5)
    sequel = next(i for i in ranked if i["item_id"] == "sequel")
    assert sequel["sources"]["co"] > 0 and sequel["sources"]["trending"] > 0


def test_nearest_items_are_found_in_the_interest_embedding_and_in_the_model():
    import numpy as np

    catalog = Catalog.from_records(
        [
            {"item_id": "jazz-1", "topics": ["jazz"], "embedding": [1.0, 0.1]},
            {"item_id": "jazz-2", "topics": ["jazz"], "embedding": [1.0, 0.3]},
            {"item_id": "rock-1", "topics": ["rock"], "embedding": [0.0, 1.0]},
        ]
    )
    user = Profile("u", len(RULES.actions))
    events = [("u", "jazz-1", "click", T, ("jazz",), 1.0)]
    apply_events(user, events, RULES, embeddings={"jazz-1": np.array([1.0, 0.1])})
    view = user.view(RULES)
    assert nearest_items(view, catalog, k=2) == {
        "embedding": [
            {"item_id": "jazz-1", "similarity": pytest.approx(1.0), "topics": ["jazz"]},
            {"item_id": "jazz-2", "similarity": pytest.approx(0.981, abs=1e-3), "topics": ["jazz"]},
        ],
        "model": [],  # no model version serves yet
    }
    model = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    trained = catalog.with_model("v1", ["jazz-1", "rock-1", "jazz-2"], model)
    found = nearest_items(view, trained, k=2)["model"]
    assert [i["item_id"] for i in found] == ["jazz-1", "rock-1"]
    assert found[0]["similarity"] == pytest.approx(1.0)


def test_seed_weights_fade_with_each_step_back():
    seeds = Seeds(items=3, recency=0.5, model_recency=1.0)
    assert seeds.weights(3).tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert seeds.model_weights(2).tolist() == [1.0, 1.0]
    assert seeds.weights(0).tolist() == []
    settings = load_settings(seed_items=7, seed_recency=0.6)
    assert Seeds.from_settings(settings) == Seeds(7, 0.6, settings.seed_model_recency)


def test_only_the_latest_seed_items_seed_candidates_each_weighing_less_than_the_next():
    graph = {"a": {"x": 1.0}, "b": {"c": 1.0}, "film": {"pop": 1.0}}
    signals = Signals(graph=graph)
    user = profile(("a", "view"), ("b", "view"), ("film", "view"))  # film is the latest

    def scored(recency: float, items: int = 3) -> dict[str, float]:
        seeds = Seeds(items, recency, model_recency=0.5)
        ranked = recommend(user, CATALOG, signals, {"co": 1.0}, seeds=seeds)
        return {i["item_id"]: i["score"] for i in ranked if i["score"] > 0}  # not the fill

    assert scored(0.5, items=1) == {"pop": 1.0}
    assert scored(0.5) == pytest.approx({"pop": 1.0, "c": 0.5, "x": 0.25})
    assert scored(1.0) == pytest.approx({"pop": 1.0, "c": 1.0, "x": 1.0})


def test_items_met_before_the_recent_actions_are_not_recommended_again():
    from actors.profile import ProfileRules

    rules = ProfileRules.from_settings(load_settings(recent_actions=2))
    user = Profile("u", len(rules.actions))
    events = [("u", item, "view", T + n, (), 1.0) for n, item in enumerate(["x", "a", "b"])]
    apply_events(user, events, rules)  # x left the recent bag
    view = user.view(rules)
    assert [item for _, item, _ in view.recent] == ["b", "a"] and view.saw_earlier("x")
    signals = Signals(graph={"b": {"x": 0.9, "c": 0.5}})
    assert ids(recommend(view, CATALOG, signals, {"co": 1.0}, k=1)) == ["c"]
    again = recommend(view, CATALOG, signals, {"co": 1.0}, k=1, exclude_seen=False)
    assert ids(again) == ["x"]
