"""Experiment statistics and bucketing, without a cluster: the always-valid test keeps
its false-positive rate under daily peeking, intervals cover the truth, and changing
shares keeps users in their variant."""

from __future__ import annotations

import numpy as np
import pytest

from actors.attribution import Attribution, Exposure, ExposureIndex, decide
from persona.errors import ConfigError
from serving import experiments, stats
from serving.ranking import assign_variant


def _aa_looks(rng, replicates: int, users: int, looks: int):
    """Per-user engagement rates of two identical arms, and the (d, v, sd) of their
    difference at each of ``looks`` equally spaced looks (users arrive over time)."""
    exposures = rng.poisson(4, size=(replicates, 2, users)) + 1
    p = rng.beta(2, 18, size=(replicates, 2, users))
    rate = rng.binomial(exposures, p) / exposures
    at = np.linspace(users / looks, users, looks).astype(int)
    out = []
    for n in at:
        r = rate[:, :, :n]
        mean, var = r.mean(axis=2), r.var(axis=2, ddof=1)
        d = mean[:, 1] - mean[:, 0]
        v = var[:, 1] / n + var[:, 0] / n
        sd = np.sqrt((var[:, 0] + var[:, 1]) / 2)
        out.append((d, v, sd))
    return out


def test_an_aa_test_peeked_at_every_day_is_significant_about_5_percent_of_the_time():
    """30 daily looks at 2,000 A/A experiments: the mSPRT declares a difference in at
    most ~5% of them (Ville's inequality), where a fixed-horizon z-test read every
    day does in several times that."""
    rng = np.random.default_rng(14)
    looks = _aa_looks(rng, replicates=2000, users=3000, looks=30)
    ever_msprt = np.zeros(2000, bool)
    ever_naive = np.zeros(2000, bool)
    for d, v, sd in looks:
        lam, _half = stats.msprt(d, v, sd)
        ever_msprt |= lam >= 1 / stats.ALPHA
        ever_naive |= stats.z_test_p(d, v) < 0.05
    msprt_rate, naive_rate = ever_msprt.mean(), ever_naive.mean()
    print(f"A/A ever significant over 30 looks: mSPRT {msprt_rate:.3f}, z-test {naive_rate:.3f}")
    assert msprt_rate <= 0.06
    assert naive_rate >= 0.15


def test_the_always_valid_interval_covers_a_true_difference_at_every_look():
    rng = np.random.default_rng(7)
    replicates, users, truth = 1000, 2000, 0.01
    exposures = rng.poisson(4, size=(replicates, 2, users)) + 1
    p = rng.beta(2, 18, size=(replicates, 2, users))
    p[:, 1] += truth
    rate = rng.binomial(exposures, p) / exposures
    true_d = truth
    missed = np.zeros(replicates, bool)
    for n in np.linspace(100, users, 20).astype(int):
        r = rate[:, :, :n]
        mean, var = r.mean(axis=2), r.var(axis=2, ddof=1)
        d = mean[:, 1] - mean[:, 0]
        v = (var[:, 0] + var[:, 1]) / n
        _lam, half = stats.msprt(d, v, np.sqrt((var[:, 0] + var[:, 1]) / 2))
        missed |= np.abs(d - true_d) > half
    assert missed.mean() <= 0.06


def test_results_join_exposures_and_attributions_per_user():
    shown = [
        Exposure("r1", "ann", 10.0, "e", "control", ("a", "b")),
        Exposure("r2", "ann", 20.0, "e", "control", ("c",)),
        Exposure("r3", "bob", 10.0, "e", "b", ("a",)),
        Exposure("r4", "cid", 10.0, "other", "b", ("a",)),
    ]
    events = [
        Attribution("r1", "ann", "b", "click", 11.0, 1),
        Attribution("r3", "bob", "a", "save", 12.0, 0),
        Attribution("r3", "bob", "a", "hide", 13.0, 0),
        Attribution("r3", "bob", "zzz", "click", 13.0, -1),  # not shown: unmatched
        Attribution("r4", "cid", "a", "click", 12.0, 0),  # another experiment's
    ]
    joined = stats.join("e", shown, events)
    assert joined.unmatched == 1
    table = stats.results(joined, ["control", "b"], "control")
    assert table["control"]["users"] == 1 and table["control"]["exposures"] == 2
    assert table["control"]["clicks_per_exposure"]["mean"] == 0.5
    assert table["b"]["engagement_rate"]["mean"] == 1.0  # the save; a hide is no engagement
    assert table["b"]["hides_per_exposure"]["mean"] == 1.0


def test_the_first_bucketing_is_kept_for_persona_experiments():
    config = {"a": {"share": 80, "blend": {}}, "b": {"share": 20, "blend": {}}}
    experiment = experiments.from_settings(config)
    users = [f"user-{n}" for n in range(5000)]
    assert [experiment.assign(u) for u in users] == [assign_variant(u, config) for u in users]


def test_changing_shares_or_adding_a_variant_keeps_users_in_place():
    start = experiments.from_settings(
        {"name": "e", "variants": {"control": {"share": 50}, "b": {"share": 50}}}
    )
    users = [f"u{n}" for n in range(20_000)]
    before = {u: start.assign(u) for u in users}
    grown, what = experiments.change(start, {"control": 40, "b": 40, "c": 20}, {"c": {"co": 1.0}})
    assert what == "b 50% -> 40%; added c at 20%; control 50% -> 40%"
    after = {u: grown.assign(u) for u in users}
    moved = [u for u in users if after[u] != before[u]]
    assert all(after[u] == "c" for u in moved)  # only users the new variant took moved
    assert abs(len(moved) / len(users) - 0.2) < 0.02
    # Back to 50/50: c's users return, the others stay where they are.
    back, _ = experiments.change(grown, {"control": 50, "b": 50})
    assert all(back.assign(u) == after[u] for u in users if after[u] != "c")
    assert back.shares() == {"control": 50.0, "b": 50.0}


def test_a_new_salt_is_a_new_experiment_and_a_new_variant_needs_a_blend():
    start = experiments.from_settings({"a": {"share": 100, "blend": {}}})
    with pytest.raises(ConfigError, match="new experiment"):
        experiments.change(start, {"a": 100}, salt="other")
    with pytest.raises(ConfigError, match="blend"):
        experiments.change(start, {"a": 50, "new": 50})
    with pytest.raises(ConfigError, match="at most 100"):
        experiments.change(start, {"a": 80, "new": 30}, {"new": {}})


def test_events_without_rec_id_go_to_the_latest_exposure_of_the_item_in_the_window():
    index = ExposureIndex(window_s=100, max_users=10)
    index.note(
        [
            Exposure("old", "ann", 0.0, "e", "a", ("x", "y")),
            Exposure("new", "ann", 50.0, "e", "a", ("y", "x")),
            Exposure("bob", "bob", 50.0, "e", "a", ("x",)),
        ]
    )
    events = [
        ("ann", "x", "click", 60.0),  # latest exposure showing x: "new", position 1
        ("ann", "x", "click", 40.0),  # before "new": "old"
        ("ann", "x", "click", 155.0),  # "new" is 105 s old: outside the window
        ("ann", "z", "click", 60.0),  # never shown
        ("ann", "x", "view", 60.0),  # views are not attributed without a rec_id
        ("ann", "q", "click", 60.0),  # its own rec_id wins
    ]
    decided = decide(index, events, range(6), {5: ("given", 3)})
    assert decided == {0: ("new", 1), 1: ("old", 0), 5: ("given", 3)}
