"""The event schema and its validation: strict, explicit, and every rejection says why.

An event is ``{"user_id", "item_id", "action", "ts", "topics"?, "weight"?, "event_id"?,
"rec_id"?, "position"?}``. Validated events become tuples ``(user_id, item_id, action,
ts, topics, weight)``, the form the profile model, the journal and the fleet pass
around; an event's ``rec_id`` and ``position`` (the recommendation it answers, see
actors/attribution.py) travel beside it, by line (``references``).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

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

# The fast check's shapes (EventValidator._plainly_valid): events with only these
# fields, numbers that are ints or floats (not bools), topics as a list or tuple.
_PLAIN_KEYS = frozenset((*REQUIRED, "topics", "weight"))
_NUMBERS = (int, float)
_SEQUENCES = (list, tuple)
_DOT_SEGMENTS = (".", "..")


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
        plain = self._plainly_valid
        latest = now + self.max_future_s
        for index, event in enumerate(events):
            # Most events pass the fast check; the rest get reason()'s full check.
            if not plain(event, latest):
                problem = self.reason(event, now)
                if problem:
                    errors.append({"index": index, "reason": problem})
                    continue
            get = event.get
            valid.append(
                (
                    event["user_id"],
                    event["item_id"],
                    event["action"],
                    float(event["ts"]),
                    tuple(get("topics", ())),
                    float(get("weight", 1.0)),
                )
            )
        return valid, errors

    def _plainly_valid(self, event: Any, latest: float) -> bool:
        """True for an event of the common shape that ``reason`` accepts (the required
        fields, topics, weight; ids without '/'); False means "ask ``reason``", never
        "invalid": this only skips its slower checks, one per rule."""
        if type(event) is not dict or not _PLAIN_KEYS.issuperset(event):
            return False
        user, item = event.get("user_id"), event.get("item_id")
        action, ts = event.get("action"), event.get("ts")
        if not (
            type(user) is str
            and type(item) is str
            and type(action) is str
            and action in self.actions
            and 0 < len(user) <= MAX_ID_CHARS
            and 0 < len(item) <= MAX_ID_CHARS
            and user.isprintable()
            and item.isprintable()
            and "/" not in user
            and "/" not in item
            and user not in _DOT_SEGMENTS
            and item not in _DOT_SEGMENTS
            # NaN fails both comparisons; an infinity or a huge int the second.
            and type(ts) in _NUMBERS
            and 0 <= ts <= latest
        ):
            return False
        topics = event.get("topics", ())
        if type(topics) not in _SEQUENCES or len(topics) > MAX_TOPICS:
            return False
        for topic in topics:
            if type(topic) is not str or not 0 < len(topic) <= MAX_TOPIC_CHARS:
                return False
            if not topic.isprintable():
                return False
        weight = event.get("weight", 1.0)
        return type(weight) in _NUMBERS and 0 < weight <= MAX_WEIGHT

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


# Version of the columnar encoding below (its first field).
COLUMNS_VERSION = 1
# zlib level of encoded parts: level 1 takes ~0.3 us per event and shrinks a part
# ~3x; Cassandra's CPU per journal append grows with the row's bytes.
COLUMNS_ZLIB_LEVEL = 1


def encode_columns(events: Sequence[ValidEvent], lines: Sequence[int]) -> bytes:
    """Validated events and their lines as one compressed columnar blob: what the fleet
    sends a shard (one bytes object, not a pickled tuple per event) and what the shard
    journals as it is. Actions and topics are names once plus small indexes, times and
    weights exact float64 (weights left out when all are 1), lines as differences."""
    if events:
        users, items, actions, times, topics, weights = zip(*events, strict=True)
    else:
        users = items = actions = times = topics = weights = ()
    action_names = list(dict.fromkeys(actions))
    action_index = {a: n for n, a in enumerate(action_names)}
    counts = bytes(map(len, topics))  # at most MAX_TOPICS each
    flat = [t for event_topics in topics for t in event_topics]
    topic_names = list(dict.fromkeys(flat))
    topic_index = {t: n for n, t in enumerate(topic_names)}
    weight_array = np.array(weights, dtype="<f8")
    line_array = np.array(lines, dtype="<i8")
    payload = [
        COLUMNS_VERSION,
        list(users),
        list(items),
        action_names,
        np.fromiter(map(action_index.__getitem__, actions), "<u4", len(actions)).tobytes(),
        np.array(times, dtype="<f8").tobytes(),
        topic_names,
        counts,
        np.fromiter(map(topic_index.__getitem__, flat), "<u4", len(flat)).tobytes(),
        None if bool((weight_array == 1.0).all()) else weight_array.tobytes(),
        np.diff(line_array, prepend=0).tobytes() if len(line_array) else b"",
    ]
    return zlib.compress(msgpack.packb(payload, use_bin_type=True), COLUMNS_ZLIB_LEVEL)


def decode_columns(blob: bytes) -> tuple[list[ValidEvent], list[int]]:
    """The events (tuples, as ``validate`` makes them) and lines of an encoded blob.
    Raises ValueError when it is not one."""
    try:
        fields = msgpack.unpackb(zlib.decompress(blob), raw=False)
    except (zlib.error, msgpack.UnpackException) as exc:
        raise ValueError(f"not an encoded event part: {exc}") from exc
    if not isinstance(fields, list) or not fields or fields[0] != COLUMNS_VERSION:
        version = fields[0] if isinstance(fields, list) and fields else None
        raise ValueError(f"event part of unknown version {version!r}")
    (_, users, items, action_names, action_at, times, topic_names, counts, topic_at, weights,
     line_steps) = fields  # fmt: skip
    n = len(users)
    actions = list(map(action_names.__getitem__, np.frombuffer(action_at, "<u4").tolist()))
    flat = list(map(topic_names.__getitem__, np.frombuffer(topic_at, "<u4").tolist()))
    if not counts or counts.count(counts[0]) == n:  # every event has as many topics
        width = counts[0] if counts else 0
        topics = list(zip(*[iter(flat)] * width, strict=False)) if width else [()] * n
    else:
        at, topics = 0, []
        for count in counts:
            topics.append(tuple(flat[at : at + count]))
            at += count
    ts = np.frombuffer(times, "<f8").tolist()
    weight_list = np.frombuffer(weights, "<f8").tolist() if weights is not None else [1.0] * n
    lines = np.cumsum(np.frombuffer(line_steps, "<i8")).tolist()
    if (
        not len(items)
        == len(actions)
        == len(ts)
        == len(topics)
        == len(weight_list)
        == len(lines)
        == n
    ):
        raise ValueError("event part columns differ in length")
    return list(zip(users, items, actions, ts, topics, weight_list, strict=True)), lines
