"""Event validation and routing: pure logic, no services."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import zlib
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.events import EventValidator, decode_columns, encode_columns
from actors.routing import initial_assignment, partition_of, split_by_owner
from persona.errors import InvalidEvents
from persona.settings import PROJECT_ROOT

NOW = 1_700_000_000.0
VALIDATOR = EventValidator(["view", "click", "hide"])
GOOD = {"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW - 5}


def reason(**changes):
    event = {**GOOD, **changes}
    event = {k: v for k, v in event.items() if v is not ...}
    _, errors = VALIDATOR.validate([event], now=NOW)
    return errors[0]["reason"] if errors else None


def test_a_good_event_becomes_a_tuple():
    valid, errors = VALIDATOR.validate([{**GOOD, "topics": ["a"], "weight": 2}], now=NOW)
    assert errors == [] and valid == [("u1", "i1", "view", NOW - 5, ("a",), 2.0)]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"user_id": ...}, "missing field(s): user_id"),
        ({"colour": "red"}, "unknown field(s): colour"),
        ({"user_id": ""}, "1-128 characters"),
        ({"user_id": "x" * 129}, "1-128 characters"),
        ({"item_id": "bad\nid"}, "non-printable"),
        ({"user_id": 42}, "must be a string"),
        ({"action": "teleport"}, "unknown action"),
        ({"ts": "yesterday"}, "finite number"),
        ({"ts": math.nan}, "finite number"),
        ({"ts": math.inf}, "finite number"),
        ({"ts": True}, "finite number"),
        ({"ts": -1}, ">= 0"),
        ({"ts": NOW * 1000}, "milliseconds sent as seconds"),
        ({"topics": "jazz"}, "list of strings"),
        ({"topics": ["t"] * 17}, "at most 16 topics"),
        ({"topics": ["x" * 65]}, "1-64 printable"),
        ({"weight": 0}, "weight must be in"),
        ({"weight": math.nan}, "finite number"),
        ({"action": []}, "action must be a string, got list"),
        ({"action": {"kind": "view"}}, "action must be a string, got dict"),
        ({"ts": 10**400}, "finite number"),
        ({"ts": -(10**400)}, "finite number"),
        ({"weight": 10**400}, "finite number"),
        ({"user_id": ["u1"]}, "must be a string, got list"),
        ({"topics": [["jazz"]]}, "1-64 printable"),
        ({"topics": {"jazz": 1}}, "list of strings"),
        ({"event_id": {"id": 1}}, "event_id must be a string"),
    ],
)
def test_each_rejection_says_why(changes, expected):
    assert expected in reason(**changes)


@pytest.mark.parametrize("name", ["user_id", "item_id"])
@pytest.mark.parametrize("value", ["a/b", "/", "team/alice/", ".", ".."])
def test_ids_that_cannot_be_addressed_over_http_are_refused(name, value):
    # GET /v1/users/{user_id}/profile can never reach "a/b", and clients collapse
    # the dot segments: such a user could be written but never read or deleted.
    problem = reason(**{name: value})
    assert problem is not None and name in problem and "URL path" in problem


def test_ids_with_dots_inside_are_fine():
    assert reason(user_id="a.b", item_id="...") is None


def test_old_history_and_near_future_are_accepted():
    assert reason(ts=0) is None
    assert reason(ts=NOW - 20 * 365 * 86_400) is None
    assert reason(ts=NOW + 3600) is None


def test_rejections_carry_their_index():
    _, errors = VALIDATOR.validate([GOOD, {"nope": 1}, GOOD, "not an event"], now=NOW)
    assert [e["index"] for e in errors] == [1, 3]


def test_msgpack_batches_are_accepted_and_garbage_is_refused():
    valid, _ = VALIDATOR.validate(msgpack.packb([GOOD]), now=NOW)
    assert len(valid) == 1
    with pytest.raises(InvalidEvents, match="not valid msgpack"):
        VALIDATOR.validate(b"\xc1\xc1\xc1", now=NOW)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x91\x81\x91\x01\x02", id="map-keyed-by-an-array"),
        pytest.param(b"\x91\x81\x80\x01", id="map-keyed-by-a-map"),
        pytest.param(b"\x91" * 3_000 + b"\x01", id="nested-3000-deep"),
    ],
)
def test_undecodable_msgpack_is_refused_with_a_reason(body):
    # A map keyed by an array or a map cannot become a dict: msgpack raises TypeError.
    with pytest.raises(InvalidEvents, match="not valid msgpack"):
        VALIDATOR.validate(body, now=NOW)


def test_all_or_nothing_raises_with_every_error():
    with pytest.raises(InvalidEvents) as info:
        VALIDATOR.validate_all_or_nothing([GOOD, {}, {}], now=time.time())
    assert [e["index"] for e in info.value.errors] == [1, 2]


def test_partition_hash_is_stable_across_processes_and_releases():
    # Fixed values: a change here would silently re-home every user.
    assert [partition_of(u, 256) for u in ("alice", "bob", "用户")] == [71, 64, 221]
    assert partition_of("user-123456", 4096) == 2398
    # ...and another interpreter with another hash seed agrees (str hash() would not).
    code = "from actors.routing import partition_of; print(partition_of('alice', 256))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
        cwd=str(PROJECT_ROOT),
    )
    assert other.stdout.strip() == "71"


def test_partitions_are_roughly_uniform():
    counts = Counter(partition_of(f"user-{i}", 64) for i in range(64_000))
    assert len(counts) == 64
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000


def test_split_by_owner_keeps_each_user_on_one_shard_with_its_lines():
    owners = initial_assignment(16, 3)
    events = [(f"u{i % 50}", "i", "view", NOW, (), 1.0) for i in range(500)]
    parts = split_by_owner(events, list(range(1000, 1500)), owners, 16)
    assert sum(len(part[0]) for part in parts.values()) == 500
    homes = {}
    for shard, (part, lines) in parts.items():
        assert len(part) == len(lines)
        for e, line in zip(part, lines, strict=True):
            assert homes.setdefault(e[0], shard) == shard
            assert events[line - 1000] is e  # each event keeps its own line


# --- validation never raises --------------------------------------------------------

_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: 10**400 is valid JSON
    | st.floats()  # nan and infinities too (json.loads accepts NaN and Infinity)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
# What msgpack can carry beyond JSON: bytes, extension types, timestamps, non-string keys.
_msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=12)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999))
)
msgpack_values = st.recursive(
    _msgpack_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4) | st.none(), inner
        )
    ),
    max_leaves=12,
)


def near_events(values):
    """Events with every field present, each either a good value or junk, so junk
    reaches every check instead of stopping at "missing field(s)"."""
    fields = {
        "user_id": st.just("u1") | st.sampled_from(["a/b", ".", "", "x" * 200]) | values,
        "item_id": st.just("i1") | values,
        "action": st.sampled_from(["view", "click"]) | values,
        "ts": st.just(NOW - 5) | values,
    }
    optional = {
        "topics": st.lists(st.text(max_size=70) | values, max_size=18) | values,
        "weight": st.floats(0, 2000) | values,
        "event_id": st.just("e1") | values,
    }
    return st.fixed_dictionaries(fields, optional=optional)


def assert_each_index_valid_or_explained(events, valid, errors):
    assert len(valid) + len(errors) == len(events)
    indices = [error["index"] for error in errors]
    assert indices == sorted(set(indices)) and all(0 <= i < len(events) for i in indices)
    assert all(isinstance(e["reason"], str) and e["reason"] for e in errors)
    for user_id, item_id, action, ts, topics, weight in valid:
        assert isinstance(user_id, str) and isinstance(item_id, str) and action in ("view", "click")
        assert math.isfinite(ts) and 0 < weight <= 1000 and all(isinstance(t, str) for t in topics)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_events(json_values) | json_values, max_size=6))
def test_validating_any_json_never_raises_and_explains_each_rejection(events):
    valid, errors = VALIDATOR.validate(events, now=NOW)
    assert_each_index_valid_or_explained(events, valid, errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(near_events(msgpack_values) | msgpack_values, max_size=6))
def test_validating_any_msgpack_never_raises_and_explains_each_rejection(events):
    body = msgpack.packb(events, datetime=False)
    decoded = msgpack.unpackb(body, raw=False, strict_map_key=False)
    valid, errors = VALIDATOR.validate(body, now=NOW)
    assert_each_index_valid_or_explained(decoded, valid, errors)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_events(msgpack_values) | near_events(json_values))
def test_the_fast_check_accepts_only_what_the_full_check_accepts(event):
    latest = NOW + VALIDATOR.max_future_s
    if VALIDATOR._plainly_valid(event, latest):
        assert VALIDATOR.reason(event, NOW) is None


# --- the columnar encoding of a shard's part (fleet -> shard -> journal) ------------

valid_events = st.tuples(
    st.text(min_size=1, max_size=12),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["view", "click", "hide"]),
    st.floats(0, 4e9),
    st.lists(st.text(min_size=1, max_size=8), max_size=16).map(tuple),
    st.floats(0.001, 1000) | st.just(1.0),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(valid_events, st.integers(-(2**62), 2**62)), max_size=40))
def test_an_encoded_part_decodes_to_the_same_events_and_lines(pairs):
    events, lines = [e for e, _ in pairs], [line for _, line in pairs]
    assert decode_columns(encode_columns(events, lines)) == (events, lines)


def test_an_encoded_part_is_much_smaller_than_its_tuples():
    events = [
        (f"user-{n % 997}", f"item-{n % 313}", "view", NOW + n * 0.37, ("t1", f"t{n % 7}"), 1.0)
        for n in range(5_000)
    ]
    blob = encode_columns(events, list(range(5_000)))
    assert len(blob) < len(msgpack.packb(events)) / 3


@pytest.mark.parametrize("blob", [b"", b"garbage", zlib.compress(msgpack.packb([99, []]))])
def test_what_is_not_an_encoded_part_is_refused(blob):
    with pytest.raises(ValueError):
        decode_columns(blob)
