"""Offline evaluation: the MovieLens loader, the chronological split, the metrics, the
baselines, and one whole run through shards, the recommender and HTTP on small data."""

from __future__ import annotations

import hashlib
import math
import zipfile

import pytest

from jobs import datasets
from jobs.datasets import extract_movielens, fetch_movielens_100k, read_movielens
from jobs.evaluate import (
    als,
    evaluate,
    item_knn,
    mrr_at,
    ndcg_at,
    popularity,
    recall_at,
    score,
    split,
    split_tuned,
    tune_blend,
    tune_worst_ratio,
)
from persona.errors import ConfigError

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
1\t10\t5\t881250949
1\t11\t4\t881250950
2\t10\t3\t881250951
2\t12\t1\t881250952
2\t13\t2\t881250953
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Children's Comedy
11\tGoldenEye\t1995\tAction Adventure Thriller
12\tFour Rooms\t1995\tThriller
13\tUntitled\t1995\t
"""


def write_movielens(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.inter").write_text(INTER)
    (directory / "ml-100k.item").write_text(ITEM)
    return directory


def event(user, item, ts, action="click"):
    return {"user_id": user, "item_id": item, "action": action, "ts": float(ts), "topics": []}


# --- the loader ---
def test_ratings_become_events_and_genres_topics(tmp_path):
    data = read_movielens(write_movielens(tmp_path))
    actions = {(e["user_id"], e["item_id"]): e["action"] for e in data.events}
    assert actions == {
        ("1", "10"): "save",
        ("1", "11"): "click",
        ("2", "10"): "view",
        ("2", "12"): "hide",
        ("2", "13"): "hide",
    }
    assert [e["ts"] for e in data.events] == sorted(e["ts"] for e in data.events)
    first = next(e for e in data.events if e["item_id"] == "10")
    assert first["topics"] == ["Animation", "Children's", "Comedy"]
    assert {i["item_id"]: i["topics"] for i in data.items}["13"] == []
    assert data.is_relevant("save") and data.is_relevant("click")
    assert not data.is_relevant("view") and not data.is_relevant("hide")


def test_the_two_files_are_taken_from_the_wheel_only_if_its_digest_matches(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(datasets.MEMBERS["ml-100k.inter"], INTER)
        archive.writestr(datasets.MEMBERS["ml-100k.item"], ITEM)
        archive.writestr("recbole/__init__.py", "")
    with pytest.raises(ConfigError, match="SHA-256"):
        extract_movielens(wheel, tmp_path / "refused")
    assert not (tmp_path / "refused" / "ml-100k.inter").exists()
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "cache").mkdir()
    extract_movielens(wheel, tmp_path / "cache", sha256=digest)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(datasets.MEMBERS)
    assert len(read_movielens(tmp_path / "cache").events) == 5


def test_a_cached_copy_is_used_without_fetching(tmp_path, monkeypatch):
    cached = write_movielens(tmp_path / "datasets" / "ml-100k")

    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although the files are cached")

    monkeypatch.setattr(datasets.subprocess, "run", no_network)
    assert fetch_movielens_100k(cached) == cached
    assert datasets.load(datasets.MOVIELENS_100K, tmp_path).name == datasets.MOVIELENS_100K


def test_an_events_file_is_read_with_the_catalog_beside_it(tmp_path):
    (tmp_path / "events.jsonl").write_text(
        '{"user_id": "u", "item_id": "b", "action": "view", "ts": 2}\n'
        '{"user_id": "u", "item_id": "a", "action": "hide", "ts": 1}\n'
    )
    (tmp_path / "items.jsonl").write_text('{"item_id": "a", "topics": ["x"]}\n')
    data = datasets.load(str(tmp_path / "events.jsonl"), tmp_path)
    assert [e["item_id"] for e in data.events] == ["a", "b"] and data.items[0]["item_id"] == "a"
    assert data.is_relevant("view") and not data.is_relevant("hide")
    with pytest.raises(ConfigError, match="no such events file"):
        datasets.load(str(tmp_path / "missing.jsonl"), tmp_path)


# --- the split ---
def test_the_last_events_of_each_user_are_held_out_and_validation_comes_from_training():
    history = [event("u", f"i{n}", 100 + n, "click" if n % 2 else "view") for n in range(12)]
    short = [event("s", f"i{n}", n) for n in range(4)]  # too few to evaluate
    relevant = {"click"}.__contains__
    test = split([*reversed(history), *short], 3, relevant)
    assert [e["item_id"] for e in test.train if e["user_id"] == "u"] == [f"i{n}" for n in range(9)]
    assert test.relevant == {"u": {"i9", "i11"}}  # i10 is a view: held out, not relevant
    assert len([e for e in test.train if e["user_id"] == "s"]) == 4 and "s" not in test.relevant
    valid = split(test.train, 3, relevant)
    assert valid.relevant == {"u": {"i7"}}
    assert max(e["ts"] for e in valid.train if e["user_id"] == "u") == 105
    assert valid.seen["u"] == {f"i{n}" for n in range(6)}


def test_a_fraction_holds_out_that_share_and_an_item_seen_in_training_is_not_relevant():
    history = [event("u", f"i{n}", n) for n in range(9)] + [event("u", "i0", 9)]
    test = split(history, 0.2, lambda action: True)
    assert test.relevant == {"u": {"i8"}}  # i0 again is no discovery


# --- the metrics, by hand ---
def test_metrics_match_hand_computed_values():
    ranked = ["a", "x", "b", "y"]
    relevant = {"a", "b", "c"}
    assert recall_at(ranked, relevant, 2) == pytest.approx(1 / 2)  # 1 hit / min(3, 2)
    assert recall_at(ranked, relevant, 4) == pytest.approx(2 / 3)
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    ideal = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranked, relevant, 4) == pytest.approx(dcg / ideal)
    assert mrr_at(["x", "y", "b"], relevant, 4) == pytest.approx(1 / 3)
    assert mrr_at(["x", "y", "b"], relevant, 2) == 0.0


def test_scores_average_over_users_and_coverage_counts_distinct_items():
    recommended = {"u": ["a", "b"], "v": ["a", "c"]}  # "w" got nothing: scores 0
    relevant = {"u": {"a"}, "v": {"z"}, "w": {"a"}}
    result = score(recommended, relevant, catalog_size=10, ks=(1, 2))
    assert result["recall@1"] == pytest.approx(1 / 3)
    assert result["mrr@2"] == pytest.approx(1 / 3)
    assert result["coverage@1"] == pytest.approx(1 / 10)
    assert result["coverage@2"] == pytest.approx(3 / 10)


# --- the baselines ---
TRAIN = [
    *(event(f"fan{n}", "pop", n) for n in range(6)),
    *(event(f"pair{n}", item, 10 + n) for n in range(3) for item in ("film", "sequel")),
    event("me", "pop", 30),
    event("me", "film", 31),
    event("me", "bad", 32, "hide"),
    *(event(f"h{n}", "bad", 40 + n, "hide") for n in range(9)),
]


def test_popularity_recommends_the_most_engaged_items_minus_the_users_own():
    ranked = popularity(TRAIN, ["me", "new"], {"me": {"pop", "film", "bad"}}, 2)
    assert ranked["me"] == ["sequel"]
    assert ranked["new"] == ["pop", "film"]  # hides are not engagement


def test_item_knn_recommends_what_goes_with_the_users_recent_items():
    ranked = item_knn(TRAIN, ["me"], {"me": {"pop", "film", "bad"}}, 1)
    assert ranked["me"] == ["sequel"]


def test_als_from_implicit_ranks_unseen_items_for_known_users():
    ranked = als(TRAIN, ["me", "new"], {"me": {"pop", "film", "bad"}}, 3, weights={}, factors=4)
    assert ranked["new"] == [] and set(ranked["me"]) <= {"sequel"}


def test_blend_tuning_keeps_only_changes_that_improve_the_validation_metric():
    def metric(blend):
        return -abs(blend.get("popular", 0) - 0.2) - blend.get("trending", 0)

    blend, best = tune_blend(metric, ("popular", "trending"), {"co": 1.0})
    assert blend == {"co": 1.0, "popular": 0.2} and best == pytest.approx(0.0)


def test_horizon_tuning_maximises_the_worst_ratio_to_the_baseline_not_the_mean():
    baseline = {1: 0.2, 10: 0.1}

    def recalls(params):  # a long seed list helps the long horizon, hurts the short one
        n = params["seed_items"]
        return {1: 0.3 - 0.002 * n, 10: 0.1 + 0.001 * n}

    grid = {"seed_items": (10, 20, 40, 80)}
    params, worst = tune_worst_ratio(recalls, baseline, grid, {"seed_items": 10})
    # worst ratios: 10 -> 1.10, 20 -> 1.20, 40 -> 1.10, 80 -> 0.70 (the mean prefers 80)
    assert params == {"seed_items": 20} and worst == pytest.approx(1.2)
    assert split_tuned({"seed_items": 20, "blend:model": 0.2}) == (
        {"model": 0.2},
        {"seed_items": 20},
    )


# --- a whole run ---
def test_a_run_goes_through_the_shards_the_recommender_and_http(ray_session, tmp_path):
    from jobs.generate import generate
    from persona.settings import load_settings
    from tests.conftest import SERVE_PORT

    generate(tmp_path, users=60, items=80, events=3_000, seed=3)
    data = datasets.load(str(tmp_path / "events.jsonl"), tmp_path)
    result = evaluate(
        data,
        holdout=0.2,
        tune=True,
        tune_horizons=(1.0, 0.2),
        http=True,
        http_port=SERVE_PORT,
        settings=load_settings(data_dir=str(tmp_path), partitions=16),
    )
    test, validation = result["test"], result["validation"]
    assert set(test) == {
        "persona-before",
        "persona",
        "persona-tuned",
        "persona-http",
        "popularity",
        "item-knn",
        "als",
    }
    assert {"persona", "persona-tuned", "item-knn"} <= set(validation)
    # Over HTTP the served ranking is the one RecommenderCore gives.
    assert test["persona-http"] == pytest.approx(test["persona"])
    assert test["persona"]["recall@10"] > test["popularity"]["recall@10"]
    # The training job ran between the two Persona rows, and serving switched to it.
    assert result["model"]["serving"] == result["model"]["version"]
    assert "persona-before" in validation
    assert result["chosen"]["blend"]["co"] == 1.0
    assert 0 < test["persona"]["coverage@20"] <= 1
    # Ranking settings chosen for the worst ratio to item-kNN over both horizons.
    horizons = result["horizons"]
    assert set(horizons["item_knn"]) == set(horizons["tuned"]) == {1.0, 0.2}
    assert horizons["worst_ratio"] >= horizons["default_worst_ratio"]
    assert set(result["chosen"]["ranking"]) <= set(load_settings().__dataclass_fields__)


@pytest.mark.parametrize("items", [3, 10, 1000])
def test_the_generator_writes_the_events_it_was_asked_for(tmp_path, items):
    """A catalog smaller than the topic count leaves topics without items; the events
    meant for them go elsewhere instead of vanishing (100 asked, 38 written before)."""
    from jobs.generate import generate

    summary = generate(tmp_path, users=20, items=items, events=100, seed=1)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert summary["events"] == len(lines) == 100
