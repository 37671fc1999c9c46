"""JSON views of stored records (profile and API errors): pure, no Ray."""

from __future__ import annotations

import math
from collections.abc import Mapping

from actors.profile import Profile, ProfileRules


def profile_view(record: Mapping, rules: ProfileRules, now: float, *, interests: int = 64) -> dict:
    """The public shape of a profile: interests decayed to ``now`` and ranked by score
    (ranked on stored scores, so even a years-old profile orders correctly), recent
    actions newest first, lifetime counters and the version."""
    profile = Profile.from_record(dict(record), rules)
    ranked = profile.interests_at(rules, now)[:interests]
    return {
        "user_id": profile.user_id,
        "version": profile.version,
        "events": profile.events,
        "first_seen": _finite(profile.first_seen),
        "last_seen": _finite(profile.last_seen),
        "counters": {a: n for a, n in zip(rules.actions, profile.counts, strict=True) if n},
        "interests": [{"topic": t, "score": s} for t, s in ranked],
        "recent_actions": [
            {"item_id": item, "action": rules.actions[code], "ts": ts}
            for ts, item, code in reversed(profile.recent)
        ],
        "hidden_items": sorted(profile.hidden or ()),
        "has_embedding": profile.interest_vector() is not None,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def error_body(code: str, message: str, **details) -> dict:
    return {"error": {"code": code, "message": message, **details}}
