"""Experiment results: per-variant metrics with 95% intervals and an always-valid test of
each variant against the control. Pure numpy, no Ray.

The unit is the user (users are what is randomised): each user has exposures ``x``
and attributed engagements ``e`` (clicks, likes, saves, shares, purchases; views and
hides are not engagement, hides are reported on their own). A variant's *engagement
rate* is the mean over its users of ``e / x``; rates per exposure (clicks per
exposure, ...) are ratios of sums, with intervals by the delta method over users.

The difference to the control is tested with a mixture sequential probability ratio
test (mSPRT; Johari, Pekelis & Walsh, "Always valid inference", 2017) on the normal
approximation of the difference of means: with ``V`` its variance and a normal
mixture N(0, tau^2) over the effect,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

and the difference is significant once Lambda >= 1/alpha. Ville's inequality bounds
the chance that an A/A test is *ever* declared significant, however often it is
looked at, by alpha; the matching confidence sequence
``d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))`` covers
the true difference at every look at once. ``tau`` is MIXTURE_SD standard deviations
of the per-user rate: the test is most sensitive to effects of about that size.
tests/test_experiment_stats.py simulates daily peeking at A/A tests.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
ALPHA = 0.05
# The mixture's spread, in standard deviations of the per-user rate.
MIXTURE_SD = 0.2
# Attributed actions that are not engagement.
NOT_ENGAGEMENT = frozenset({"view", "hide"})


def msprt(d, v, sd, alpha: float = ALPHA, mixture_sd: float = MIXTURE_SD):
    """(Lambda, half-width of the always-valid interval) for differences ``d`` with
    variances ``v`` and per-user standard deviations ``sd`` (numpy arrays or floats)."""
    d, v, sd = np.asarray(d, float), np.asarray(v, float), np.asarray(sd, float)
    tau2 = np.maximum((mixture_sd * sd) ** 2, 1e-18)
    v = np.maximum(v, 1e-18)
    log_lambda = 0.5 * np.log(v / (v + tau2)) + tau2 * d**2 / (2 * v * (v + tau2))
    half = np.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + np.log((v + tau2) / v)))
    return np.exp(np.minimum(log_lambda, 700.0)), half


def z_test_p(d, v):
    """Two-sided p-value of a fixed-horizon z-test (for contrast: invalid under peeking)."""
    z = np.abs(np.asarray(d, float)) / np.sqrt(np.maximum(np.asarray(v, float), 1e-18))
    return np.vectorize(lambda x: math.erfc(x / math.sqrt(2)))(z)


@dataclass(frozen=True)
class UserCounts:
    """One variant's users: exposures, engagements and counts per action (arrays)."""

    exposures: np.ndarray
    engaged: np.ndarray
    actions: dict[str, np.ndarray]


def summarize(counts: UserCounts, actions: Iterable[str] = ("click", "save", "hide")) -> dict:
    x, e = counts.exposures.astype(float), counts.engaged.astype(float)
    n = len(x)
    out: dict = {"users": n, "exposures": int(x.sum()), "engaged": int(e.sum())}
    if n == 0:
        out["engagement_rate"] = {"mean": None, "ci95": None}
        for action in actions:
            out[f"{action}s_per_exposure"] = {"mean": None, "ci95": None}
        return out
    rate = e / x
    mean, sd = float(rate.mean()), float(rate.std(ddof=1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n)
    out["engagement_rate"] = {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd}
    for action in actions:
        a = counts.actions.get(action, np.zeros(n)).astype(float)
        ratio = float(a.sum() / x.sum())
        # Delta method over users: var(sum a - R sum x) / (sum x)^2.
        resid = a - ratio * x
        se = math.sqrt(n * float(resid.var(ddof=1)) if n > 1 else 0.0) / float(x.sum())
        out[f"{action}s_per_exposure"] = {
            "mean": ratio,
            "ci95": [ratio - Z95 * se, ratio + Z95 * se],
        }
    return out


def compare(variant: dict, control: dict, alpha: float = ALPHA) -> dict | None:
    """The variant's engagement rate minus the control's: the difference, its
    always-valid (1 - alpha) interval, the mSPRT's always-valid p-value, and whether
    it is significant at this look (an A/A test is ever significant with probability
    at most alpha, however often it is looked at)."""
    a, b = variant["engagement_rate"], control["engagement_rate"]
    n1, n0 = variant["users"], control["users"]
    if n1 < 2 or n0 < 2:
        return None
    d = a["mean"] - b["mean"]
    v = a["sd"] ** 2 / n1 + b["sd"] ** 2 / n0
    pooled = math.sqrt((a["sd"] ** 2 * (n1 - 1) + b["sd"] ** 2 * (n0 - 1)) / (n1 + n0 - 2))
    lam, half = msprt(d, v, pooled, alpha)
    lam, half = float(lam), float(half)
    return {
        "difference": d,
        "relative": d / b["mean"] if b["mean"] else None,
        "ci95": [d - half, d + half],
        "p_value": min(1.0, 1.0 / lam) if lam > 0 else 1.0,
        "significant": lam >= 1.0 / alpha,
        "test": f"mSPRT, always valid (mixture sd {MIXTURE_SD} x per-user sd)",
    }


@dataclass(frozen=True)
class Joined:
    """Exposures and attributions of one experiment, joined by rec_id."""

    # variant -> user -> [exposures, engaged, Counter of actions]
    users: dict[str, dict[str, list]]
    # attributions naming an exposure of this experiment that showed another user,
    # or not their item
    unmatched: int


def join(
    experiment: str,
    exposures: Iterable,
    attributions: Iterable,
    until: float | None = None,
) -> Joined:
    """Per-variant, per-user counts from Exposure and Attribution records (see
    actors.attribution), up to time ``until``. An attribution counts when its rec_id
    is an exposure of this experiment to the same user that showed its item."""
    shown: dict[str, tuple[str, str, frozenset]] = {}
    users: dict[str, dict[str, list]] = defaultdict(dict)
    for x in exposures:
        if x.experiment != experiment or x.variant is None or (until and x.at > until):
            continue
        shown[x.rec_id] = (x.variant, x.user_id, frozenset(x.items))
        row = users[x.variant].setdefault(x.user_id, [0, 0, defaultdict(int)])
        row[0] += 1
    unmatched = 0
    for a in attributions:
        if until and a.ts > until:
            continue
        hit = shown.get(a.rec_id)
        if hit is None:
            continue  # another experiment's, or an exposure past its retention
        if hit[1] != a.user_id or a.item_id not in hit[2]:
            unmatched += 1
            continue
        row = users[hit[0]][a.user_id]
        row[2][a.action] += 1
        if a.action not in NOT_ENGAGEMENT:
            row[1] += 1
    return Joined(dict(users), unmatched)


def counts_of(rows: Mapping[str, list]) -> UserCounts:
    names = sorted({a for r in rows.values() for a in r[2]})
    return UserCounts(
        np.array([r[0] for r in rows.values()], dtype=float),
        np.array([r[1] for r in rows.values()], dtype=float),
        {a: np.array([r[2].get(a, 0) for r in rows.values()], dtype=float) for a in names},
    )


def results(joined: Joined, variants: Iterable[str], control: str) -> dict:
    """Each variant's summary and, for the others, the comparison with the control."""
    table = {v: summarize(counts_of(joined.users.get(v, {}))) for v in variants}
    for v, row in table.items():
        if v != control and control in table:
            row["vs_control"] = compare(row, table[control])
    return table
