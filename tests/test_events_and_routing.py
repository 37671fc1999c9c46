"""Event validation and routing: pure logic, no services."""

from __future__ import annotations

import math
import time
from collections import Counter

import msgpack
import pytest

from actors.events import EventValidator
from actors.routing import initial_assignment, partition_of, split_by_owner
from persona.errors import InvalidEvents

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
    ],
)
def test_each_rejection_says_why(changes, expected):
    assert expected in reason(**changes)


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


def test_all_or_nothing_raises_with_every_error():
    with pytest.raises(InvalidEvents) as info:
        VALIDATOR.validate_all_or_nothing([GOOD, {}, {}], now=time.time())
    assert [e["index"] for e in info.value.errors] == [1, 2]


def test_partition_hash_is_stable_across_processes():
    # Fixed values: a change here would silently re-home every user.
    assert [partition_of(u, 256) for u in ("alice", "bob", "用户")] == [
        partition_of("alice", 256),
        partition_of("bob", 256),
        partition_of("用户", 256),
    ]
    import zlib

    assert partition_of("alice", 256) == zlib.crc32(b"alice") % 256


def test_partitions_are_roughly_uniform():
    counts = Counter(partition_of(f"user-{i}", 64) for i in range(64_000))
    assert len(counts) == 64
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000


def test_split_by_owner_keeps_each_user_on_one_shard():
    owners = initial_assignment(16, 3)
    events = [(f"u{i % 50}", "i", "view", NOW, (), 1.0) for i in range(500)]
    parts = split_by_owner(events, owners, 16)
    assert sum(map(len, parts.values())) == 500
    homes = {}
    for shard, part in parts.items():
        for e in part:
            assert homes.setdefault(e[0], shard) == shard
