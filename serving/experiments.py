"""Experiments: which variant (blend) a user gets, and changes that keep users in place.

Pure logic, no Ray. A user falls into one of BUCKETS fixed buckets, a hash of the
experiment's salt and the user id; each variant holds ranges of buckets. Changing
traffic fractions or adding a variant moves as few buckets as possible: a variant
that shrinks gives up its highest buckets, one that grows (or is new) takes free
ones, lowest first, and every other bucket keeps its variant, so its users see the
same variant before and after. A new salt reshuffles everyone: that is a new
experiment.

The configuration lives in the store as a log of changes (like the model log): each
entry holds the whole configuration, what changed, when and by which token name.
Replicas poll it and switch without a restart. ``PERSONA_EXPERIMENTS`` is the first
entry of an empty log.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from persona.errors import ConfigError, VersionConflict

BUCKETS = 10_000
# The salt of the experiment PERSONA_EXPERIMENTS describes: users keep the buckets the
# first bucketing (CRC32 of "persona-exp:<user>") gave them.
DEFAULT_SALT = "persona-exp"
DEFAULT_NAME = "default"

Ranges = tuple[tuple[int, int], ...]  # [start, end) bucket ranges, sorted


def _size(ranges: Ranges) -> int:
    return sum(end - start for start, end in ranges)


def _normalise(ranges) -> Ranges:
    merged: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in ranges if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


@dataclass(frozen=True)
class Variant:
    name: str
    blend: dict
    buckets: Ranges

    @property
    def share(self) -> float:
        """Percent of users."""
        return _size(self.buckets) * 100.0 / BUCKETS


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    control: str
    variants: dict[str, Variant]
    _table: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.control not in self.variants:
            raise ConfigError(f"experiment {self.name!r}: control {self.control!r} is no variant")
        owner: list[str | None] = [None] * BUCKETS
        for variant in self.variants.values():
            for start, end in variant.buckets:
                if not 0 <= start < end <= BUCKETS:
                    raise ConfigError(f"variant {variant.name!r}: bucket range {start}-{end}")
                for b in range(start, end):
                    if owner[b] is not None:
                        raise ConfigError(f"bucket {b} is in {owner[b]!r} and {variant.name!r}")
                    owner[b] = variant.name
        object.__setattr__(self, "_table", tuple(owner))

    def bucket(self, user_id: str) -> int:
        return zlib.crc32(f"{self.salt}:{user_id}".encode()) % BUCKETS

    def assign(self, user_id: str) -> str | None:
        """The user's variant; None when the experiment does not take all traffic and
        the user's bucket is in no variant (served the control's blend, not counted)."""
        return self._table[self.bucket(user_id)]

    def blend(self, variant: str | None) -> dict:
        return self.variants[variant or self.control].blend

    def shares(self) -> dict[str, float]:
        return {name: v.share for name, v in self.variants.items()}

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "salt": self.salt,
            "control": self.control,
            "variants": {
                n: {"blend": v.blend, "buckets": [list(r) for r in v.buckets], "share": v.share}
                for n, v in self.variants.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Experiment:
        variants = {
            n: Variant(n, dict(v.get("blend") or {}), _normalise(v["buckets"]))
            for n, v in d["variants"].items()
        }
        return cls(d["name"], d["salt"], d["control"], variants)


def from_settings(experiments: Mapping) -> Experiment:
    """The experiment PERSONA_EXPERIMENTS describes: ``{variant: {share, blend}}`` (the
    first variant is the control; buckets laid out in order, in proportion to the
    shares, exactly as the first bucketing did), or a whole experiment
    ``{"name", "salt"?, "control"?, "variants": {name: {share, blend}}}``."""
    if "variants" in experiments:
        name = str(experiments.get("name") or DEFAULT_NAME)
        salt = str(experiments.get("salt") or name)
        specs, control = experiments["variants"], experiments.get("control")
    else:
        name, salt, specs, control = DEFAULT_NAME, DEFAULT_SALT, experiments, None
    if not specs:
        raise ConfigError("an experiment needs at least one variant")
    total = sum(float(v.get("share", 0)) for v in specs.values())
    if total <= 0:
        raise ConfigError("experiment variants need a positive share")
    variants, running = {}, 0.0
    for vname, spec in specs.items():
        # ceil: bucket b is in [start, end) exactly when b / BUCKETS * total falls in
        # [running, running + share), the first bucketing's rule.
        start = math.ceil(running / total * BUCKETS - 1e-9)
        running += float(spec.get("share", 0))
        end = math.ceil(running / total * BUCKETS - 1e-9)
        variants[vname] = Variant(vname, dict(spec.get("blend") or {}), _normalise([(start, end)]))
    return Experiment(name, salt, control or next(iter(specs)), variants)


def reallocate(current: Mapping[str, Ranges], shares: Mapping[str, float]) -> dict[str, Ranges]:
    """Bucket ranges for new shares (percent) that move as few buckets as possible: a
    variant that shrinks gives up its highest buckets, a variant dropped all of them,
    and a variant that grows takes free buckets, lowest first. Buckets of variants
    that did not shrink keep their variant.

    >>> reallocate({"a": ((0, 5000),), "b": ((5000, 10000),)}, {"a": 40, "b": 40, "c": 20})
    {'a': ((0, 4000),), 'b': ((5000, 9000),), 'c': ((4000, 5000), (9000, 10000))}
    """
    targets = {name: round(float(s) * BUCKETS / 100.0) for name, s in shares.items()}
    if any(t < 0 for t in targets.values()) or sum(targets.values()) > BUCKETS:
        raise ConfigError(f"shares must be >= 0 and add up to at most 100, got {dict(shares)}")
    kept: dict[str, list[list[int]]] = {}
    for name, ranges in current.items():
        if name not in targets:
            continue
        keep, excess = [list(r) for r in ranges], _size(ranges) - targets[name]
        while excess > 0:  # give up the highest buckets first
            start, end = keep[-1]
            cut = min(excess, end - start)
            keep[-1][1] -= cut
            excess -= cut
            if keep[-1][0] == keep[-1][1]:
                keep.pop()
        kept[name] = keep
    held = sorted(tuple(r) for ranges in kept.values() for r in ranges)
    free, cursor = [], 0
    for start, end in held:
        if start > cursor:
            free.append([cursor, start])
        cursor = max(cursor, end)
    if cursor < BUCKETS:
        free.append([cursor, BUCKETS])
    result: dict[str, Ranges] = {}
    for name, target in targets.items():
        ranges = kept.get(name, [])
        need = target - sum(e - s for s, e in ranges)
        while need > 0:
            start, end = free[0]
            take = min(need, end - start)
            ranges.append([start, start + take])
            need -= take
            free[0][0] += take
            if free[0][0] == free[0][1]:
                free.pop(0)
        result[name] = _normalise(ranges)
    return result


def change(
    current: Experiment,
    shares: Mapping[str, float],
    blends: Mapping[str, dict] | None = None,
    *,
    name: str | None = None,
    salt: str | None = None,
    control: str | None = None,
) -> tuple[Experiment, str]:
    """The experiment after a change, and what changed, in words. A new ``name``
    starts a new experiment (its salt defaults to the name, so users are shuffled
    afresh); otherwise buckets move as little as ``reallocate`` allows. A variant
    not in ``shares`` is dropped; a new one needs a blend."""
    blends = dict(blends or {})
    fresh = name is not None and name != current.name
    for variant in shares:
        if variant not in blends and (fresh or variant not in current.variants):
            if variant in current.variants:
                blends[variant] = current.variants[variant].blend
            else:
                raise ConfigError(f"variant {variant!r} is new: give its blend")
    if fresh:
        new = from_settings(
            {
                "name": name,
                "salt": salt or name,
                "control": control or next(iter(shares)),
                "variants": {v: {"share": s, "blend": blends[v]} for v, s in shares.items()},
            }
        )
        return new, f"started experiment {name} ({_describe_shares(new)})"
    if salt is not None and salt != current.salt:
        raise ConfigError("a new salt reshuffles every user: start a new experiment (a new name)")
    control = control or current.control
    if control not in shares:
        raise ConfigError(f"the control {control!r} must keep a share")
    buckets = reallocate({n: v.buckets for n, v in current.variants.items()}, shares)
    variants = {
        v: Variant(
            v,
            dict(blends.get(v, current.variants[v].blend if v in current.variants else {})),
            buckets[v],
        )
        for v in shares
    }
    new = Experiment(current.name, current.salt, control, variants)
    words = []
    for v in sorted(set(current.variants) | set(shares)):
        before = current.variants[v].share if v in current.variants else None
        after = new.variants[v].share if v in new.variants else None
        if before is None:
            words.append(f"added {v} at {after:g}%")
        elif after is None:
            words.append(f"removed {v} (was {before:g}%)")
        elif before != after:
            words.append(f"{v} {before:g}% -> {after:g}%")
        if v in blends and v in current.variants and blends[v] != current.variants[v].blend:
            words.append(f"{v} blend {current.variants[v].blend} -> {blends[v]}")
    if control != current.control:
        words.append(f"control {current.control} -> {control}")
    return new, "; ".join(words) or "no change"


def _describe_shares(experiment: Experiment) -> str:
    return ", ".join(f"{n} {s:g}%" for n, s in experiment.shares().items())


# --- the log in the store ---------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    seq: int
    at: float
    by: str
    what: str
    experiment: Experiment


def read_log(store) -> list[Change]:
    changes = []
    for seq, at, blob in store.get_experiment_changes():
        entry = json.loads(blob)
        changes.append(
            Change(seq, at, entry["by"], entry["what"], Experiment.from_dict(entry["experiment"]))
        )
    return changes


def record(store, experiment: Experiment, what: str, by: str, seq: int) -> Change:
    """Append a change at ``seq`` (1 + the last); VersionConflict if taken."""
    blob = json.dumps({"experiment": experiment.to_dict(), "what": what, "by": by})
    store.append_experiment_change(seq, blob.encode())
    return Change(seq, time.time(), by, what, experiment)


def current(store, initial: Mapping) -> tuple[Experiment, list[Change]]:
    """The running experiment and the log; an empty log first takes ``initial``
    (PERSONA_EXPERIMENTS) as its first entry, once, whoever gets there first."""
    log = read_log(store)
    if not log:
        first = from_settings(initial)
        with contextlib.suppress(VersionConflict):
            record(store, first, f"initial ({_describe_shares(first)})", "settings", 1)
        log = read_log(store)
    return log[-1].experiment, log


def apply_change(store, initial: Mapping, by: str, **kwargs) -> Change:
    """Change the running experiment (see ``change``) and record it; a concurrent
    change that took the position first is refused with VersionConflict (read the
    log again and retry)."""
    experiment, log = current(store, initial)
    new, what = change(experiment, **kwargs)
    return record(store, new, what, by, log[-1].seq + 1)


# --- results --------------------------------------------------------------------------
def report(store, initial: Mapping, name: str, now: float | None = None, points: int = 0) -> dict:
    """An experiment's results from the store: its configuration and changes, and per
    variant users, exposures, rates with 95% intervals and the always-valid test
    against the control (serving.stats). ``points`` > 0 adds the engagement rate over
    time (cumulative, at that many instants from the start to now) for plotting."""
    from actors.attribution import Attribution, Exposure
    from serving import stats

    running, log = current(store, initial)
    changes = [c for c in log if c.experiment.name == name]
    if not changes:
        raise KeyError(name)
    experiment = changes[-1].experiment
    now = time.time() if now is None else now
    start = changes[0].at
    exposures = [Exposure.decode(b) for _, _, b in store.scan_exposures(start, now)]
    exposures = [e for e in exposures if e.experiment == name]
    attributions = [Attribution.decode(b) for _, _, b in store.scan_attributions(start, now)]
    variants = list(experiment.variants)
    joined = stats.join(name, exposures, attributions)
    out = {
        "name": name,
        "running": running.name == name,
        "salt": experiment.salt,
        "control": experiment.control,
        "shares": experiment.shares(),
        "started": start,
        "as_of": now,
        "variants": stats.results(joined, variants, experiment.control),
        "unmatched_attributions": joined.unmatched,
        "changes": [{"seq": c.seq, "at": c.at, "by": c.by, "what": c.what} for c in changes],
    }
    if points > 0:
        last = max([e.at for e in exposures] + [start])
        series = []
        for n in range(1, points + 1):
            at = start + (last - start) * n / points
            table = stats.results(
                stats.join(name, exposures, attributions, until=at), variants, experiment.control
            )
            series.append({"at": at, "variants": table})
        out["series"] = series
    return out


def listing(store, initial: Mapping) -> list[dict]:
    """Every experiment in the log: name, whether it runs, its shares, when it started
    and when it last changed."""
    running, log = current(store, initial)
    seen: dict[str, dict] = {}
    for c in log:
        row = seen.setdefault(c.experiment.name, {"name": c.experiment.name, "started": c.at})
        row.update(shares=c.experiment.shares(), control=c.experiment.control, changed=c.at)
    for row in seen.values():
        row["running"] = row["name"] == running.name
    return list(seen.values())
