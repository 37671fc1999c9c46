"""The event schema and its validation: strict, explicit, and every rejection says why.

An event is ``{"user_id", "item_id", "action", "ts", "topics"?, "weight"?, "event_id"?,
"rec_id"?, "position"?}``. Validated events become tuples ``(user_id, item_id, action,
ts, topics, weight)``, the form the profile model, the journal and the fleet pass
around; an event's ``rec_id`` and ``position`` (the recommendation it answers, see
actors/attribution.py) travel beside it, by line (``references``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgpack

from persona.errors import InvalidEvents

MAX_ID_CHARS = 128
MAX_TOPICS = 16
MAX_TOPIC_CHARS = 64
MAX_WEIGHT = 1000.0
REQUIRED = ("user_id", "item_id", "action", "ts")
OPTIONAL = ("topics", "weight", "event_id", "rec_id", "position")
# A list longer than this is no list a person looked at.
MAX_POSITION = 10_000
ALLOWED = frozenset(REQUIRED + OPTIONAL)

ValidEvent = tuple[str, str, str, float, tuple[str, ...], float]


def check_id(value: Any, name: str, *, in_url_path: bool = True) -> str | None:
    """Why ``value`` is not a valid id, or None.

    Ids that go into a URL path (users, items: ``/v1/users/{user_id}/profile``) may
    not contain "/" nor be "." or "..": the router can never match the first, and
    clients collapse the dot segments, so such a user could be written but never
    read or deleted over HTTP."""
    if not isinstance(value, str):
        return f"{name} must be a string, got {type(value).__name__}"
    if not 1 <= len(value) <= MAX_ID_CHARS:
        return f"{name} must be 1-{MAX_ID_CHARS} characters, got {len(value)}"
    if not value.isprintable():
        return f"{name} contains control or non-printable characters"
    if in_url_path and "/" in value:
        return f"{name} may not contain '/': it could never be addressed in a URL path"
    if in_url_path and value in (".", ".."):
        return f"{name} may not be {value!r}: it could never be addressed in a URL path"
    return None


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None: not a number (bools are not), NaN, an
    infinity, or an int too large for a float (JSON and msgpack carry any size)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class EventValidator:
    """Validates events against the configured actions and the clock."""

    def __init__(self, actions: Iterable[str], max_future_s: float = 86_400.0):
        self.actions = frozenset(actions)
        self.max_future_s = max_future_s
        self._action_list = ", ".join(sorted(self.actions))

    def reason(self, event: Any, now: float) -> str | None:
        """Why one event is invalid, or None when it is valid."""
        if not isinstance(event, dict):
            return f"an event must be an object, got {type(event).__name__}"
        missing = [k for k in REQUIRED if k not in event]
        if missing:
            return f"missing field(s): {', '.join(missing)}"
        # Keys from msgpack may be of any type: a reason never prints arbitrary values.
        unknown = sorted(
            k[:40] if isinstance(k, str) else f"key of type {type(k).__name__}"
            for k in event
            if k not in ALLOWED
        )
        if unknown:
            return f"unknown field(s): {', '.join(unknown)}"
        for name in ("user_id", "item_id"):
            problem = check_id(event[name], name)
            if problem:
                return problem
        action = event["action"]
        # Checked before the set lookup: a list or dict is unhashable.
        if not isinstance(action, str):
            return f"action must be a string, got {type(action).__name__}"
        if action not in self.actions:
            return f"unknown action {action[:40]!r}; expected one of {self._action_list}"
        ts = _finite(event["ts"])
        if ts is None:
            return "ts must be a finite number of seconds since the epoch"
        if ts < 0:
            return "ts must be >= 0 (seconds since the epoch)"
        if ts > now + self.max_future_s:
            return (
                f"ts {ts:.0f} is more than {self.max_future_s:.0f}s in the future "
                "(milliseconds sent as seconds?)"
            )
        topics = event.get("topics", ())
        if not isinstance(topics, list | tuple):
            return "topics must be a list of strings"
        if len(topics) > MAX_TOPICS:
            return f"at most {MAX_TOPICS} topics, got {len(topics)}"
        for topic in topics:
            if (
                not isinstance(topic, str)
                or not 1 <= len(topic) <= MAX_TOPIC_CHARS
                or not topic.isprintable()
            ):
                return f"each topic must be 1-{MAX_TOPIC_CHARS} printable characters"
        weight = _finite(event.get("weight", 1.0))
        if weight is None:
            return "weight must be a finite number"
        if not 0 < weight <= MAX_WEIGHT:
            return f"weight must be in (0, {MAX_WEIGHT:g}]"
        if "event_id" in event:
            # Event ids never appear in a URL: only the common rules apply.
            problem = check_id(event["event_id"], "event_id", in_url_path=False)
            if problem:
                return problem
        if "rec_id" in event:
            problem = check_id(event["rec_id"], "rec_id", in_url_path=False)
            if problem:
                return problem
        if "position" in event:
            position = event["position"]
            if (
                not isinstance(position, int)
                or isinstance(position, bool)
                or not 0 <= position < MAX_POSITION
            ):
                return f"position must be an integer in [0, {MAX_POSITION})"
        return None

    def validate(
        self, events: Any, now: float | None = None
    ) -> tuple[list[ValidEvent], list[dict]]:
        """Split a batch into valid event tuples and ``{"index", "reason"}`` errors."""
        if isinstance(events, bytes | bytearray | memoryview):
            events = decode_msgpack_batch(events)
        if not isinstance(events, list | tuple):
            return [], [{"index": None, "reason": "a batch must be a list of events"}]
        now = time.time() if now is None else now
        valid: list[ValidEvent] = []
        errors: list[dict] = []
        intern = sys.intern
        for index, event in enumerate(events):
            problem = self.reason(event, now)
            if problem:
                errors.append({"index": index, "reason": problem})
                continue
            valid.append(
                (
                    event["user_id"],
                    # Item ids repeat across many users' recent actions: one object each.
                    intern(event["item_id"]),
                    intern(event["action"]),
                    float(event["ts"]),
                    tuple(intern(t) for t in event.get("topics", ())),
                    float(event.get("weight", 1.0)),
                )
            )
        return valid, errors

    def validate_all_or_nothing(self, events: Any, now: float | None = None) -> list[ValidEvent]:
        """Validate a batch that must be accepted whole (HTTP): raise InvalidEvents."""
        valid, errors = self.validate(events, now)
        if errors:
            raise InvalidEvents(errors)
        return valid


def references(events: Any, lines: Iterable[int]) -> dict[int, tuple[str | None, int | None]]:
    """``{line: (rec_id, position)}`` of the events that name a recommendation (valid
    or not: only the lines of valid events are ever looked up)."""
    if not isinstance(events, list | tuple):
        return {}
    refs = {}
    for event, line in zip(events, lines, strict=True):
        if isinstance(event, dict) and ("rec_id" in event or "position" in event):
            rec_id, position = event.get("rec_id"), event.get("position")
            refs[line] = (
                rec_id if isinstance(rec_id, str) else None,
                position if isinstance(position, int) else None,
            )
    return refs


def decode_msgpack_batch(body: bytes) -> Any:
    """The decoded body, or InvalidEvents saying why it cannot be decoded."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    # TypeError: a map keyed by an array or a map (unhashable) cannot become a dict.
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidEvents(
            [{"index": None, "reason": f"body is not valid msgpack: {exc}"}]
        ) from exc
