"""Hostile input over HTTP: whatever a client sends, the answer is never a 5xx, every
refusal has the API's error shape, and no body costs a replica more memory than a
small multiple of its own size."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import msgpack
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import views
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NOW = time.time()
FUZZ = settings(max_examples=80, deadline=None)


def assert_not_a_5xx(reply) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text)
    if reply.status_code >= 400:
        error = reply.json()["error"]
        assert error["code"] and error["message"], error


scalars = (
    st.none()
    | st.booleans()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["view", "click", "hide", "", "/", "..", "\x00"])
)


def nested(leaves, keys):
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=16,
    )


json_values = nested(scalars | st.integers(), st.text(max_size=10))
# msgpack carries 64-bit integers at most, and also bytes, extension types and maps
# keyed by anything.
msgpack_ints = st.integers(-(2**63), 2**64 - 1)
msgpack_values = nested(
    scalars
    | msgpack_ints
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.text(max_size=10) | msgpack_ints | st.binary(max_size=3),
)


def event_like(values, ints):
    return st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.text(max_size=140) | values,
            "item_id": st.text(max_size=140) | values,
            "action": st.sampled_from(["view", "click", "hide", "bogus"]) | values,
            "ts": st.floats() | ints | st.just(NOW) | values,
            "topics": st.lists(st.text(max_size=70), max_size=18) | values,
            "weight": st.floats() | ints | values,
            "event_id": st.text(max_size=140) | values,
        },
    )


item_like = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.text(max_size=140) | json_values,
        "topics": st.lists(st.text(max_size=70), max_size=18) | json_values,
        "embedding": st.lists(st.floats() | st.integers(), max_size=8) | json_values,
        "created_at": st.floats() | st.integers() | json_values,
    },
)
# Texts a JSON encoder never produces: numbers of any length, deep nesting, bad bytes.
hostile_json = st.one_of(
    st.binary(max_size=64),
    st.integers(1, 6_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 6_000).map(lambda n: b'[{"ts": 1%s}]' % (b"0" * n)),
    st.integers(1, 3_000).map(lambda n: b'[{"a": ' * n + b"1" + b"}]" * n),
    st.text(max_size=64).map(str.encode),
)


def post_events(api, body: bytes, content_type: str):
    headers = {**AUTH, "Content-Type": content_type}
    return api.post("/v1/events", content=body, headers=headers)


@FUZZ
@given(st.lists(event_like(json_values, st.integers()), max_size=5) | json_values)
def test_fuzzed_json_events_never_get_a_5xx(api, body):
    text = json.dumps(body, allow_nan=True).encode()
    assert_not_a_5xx(post_events(api, text, "application/json"))


@FUZZ
@given(st.lists(event_like(msgpack_values, msgpack_ints), max_size=5) | msgpack_values)
def test_fuzzed_msgpack_events_never_get_a_5xx(api, body):
    assert_not_a_5xx(post_events(api, msgpack.packb(body), "application/msgpack"))


@FUZZ
@given(hostile_json | st.binary(max_size=64))
def test_hostile_event_bytes_never_get_a_5xx(api, body):
    assert_not_a_5xx(post_events(api, body, "application/json"))
    assert_not_a_5xx(post_events(api, body, "application/msgpack"))


@FUZZ
@given(
    st.fixed_dictionaries({"items": st.lists(item_like, max_size=4) | json_values}) | json_values
)
def test_fuzzed_item_uploads_never_get_a_5xx(api, body):
    text = json.dumps(body, allow_nan=True).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_not_a_5xx(api.put("/v1/items", content=text, headers=headers))


@FUZZ
@given(hostile_json)
def test_hostile_item_bytes_never_get_a_5xx(api, body):
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_not_a_5xx(api.put("/v1/items", content=body, headers=headers))


query_texts = st.text(max_size=30) | st.integers().map(str) | st.just("9" * 5_000)


@FUZZ
@given(
    user=st.text(min_size=1, max_size=140),
    k=query_texts,
    topic=query_texts,
    exclude_seen=query_texts | st.sampled_from(["true", "false", "0", "1"]),
)
def test_hostile_recommendation_queries_never_get_a_5xx(api, user, k, topic, exclude_seen):
    params = {"k": k, "topic": topic, "exclude_seen": exclude_seen}
    assert_not_a_5xx(api.get(f"/v1/users/{quote(user, safe='')}/recommendations", params=params))


# --- memory: a body may not cost a replica much more than its own size ---------------


def replica_pids(app: str = "persona") -> list[int]:
    # The state API (ray.util.state) needs the dashboard, which the test session does not
    # run; the GCS actor table of this session is what it would read.
    actors = ray._private.state.actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in actors if a["ActorClassName"].startswith(f"ServeReplica:{app}:")]


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth_kb(pids: list[int], send) -> tuple[object, int]:
    """The reply to ``send()`` and the most any replica's peak RSS rose while it ran
    (the peak is reset first, so a spike freed again before we look still shows)."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = {pid: status_kb(pid, "VmHWM") for pid in pids}
    reply = send()
    return reply, max(status_kb(pid, "VmHWM") - before[pid] for pid in pids)


def empty_maps_msgpack(size: int) -> bytes:
    return b"\xdd" + struct.pack(">I", size - 5) + b"\x80" * (size - 5)


def nested_empty_maps_msgpack(size: int) -> bytes:
    # Arrays of 15 empty maps, 15 of those to an array, and so on: no array is long.
    level = b"\x80"
    for _ in range(3):
        level = b"\x9f" + level * 15
    count = (size - 3) // len(level)
    return b"\xdc" + struct.pack(">H", count) + level * count


def empty_maps_json(size: int) -> bytes:
    return b"[" + b"{}," * ((size - 4) // 3) + b"{}]"


def empty_lists_json(size: int) -> bytes:
    return b'{"items": [' + b"[]," * ((size - 16) // 3) + b"[]]}"


@pytest.mark.parametrize(
    "path, content_type, build",
    [
        ("/v1/events", "application/msgpack", empty_maps_msgpack),
        ("/v1/events", "application/msgpack", nested_empty_maps_msgpack),
        ("/v1/events", "application/json", empty_maps_json),
        ("/v1/items", "application/json", empty_lists_json),
    ],
)
def test_a_body_of_empty_containers_is_refused_without_expanding(api, path, content_type, build):
    body = build(api.settings.max_body_bytes - 1024)
    method = "PUT" if path == "/v1/items" else "POST"
    headers = {**AUTH, "Content-Type": content_type}
    pids = replica_pids()
    assert pids

    def send(content: bytes):
        return api.request(method, path, content=content, headers=headers)

    # The first body of a kind may allocate for good (imports, buffers): a small one
    # first. Not the hostile one, whose memory, freed again, the measured run would reuse.
    send(b"\x90" if content_type == "application/msgpack" else b"[]")
    reply, growth_kb = peak_growth_kb(pids, lambda: send(body))
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["code"]
    # Decoded, these bodies are 20-70 times their size; refused, a few copies at most.
    assert growth_kb * 1024 <= 4 * len(body), (growth_kb, len(body))


# --- the JSON structure check, against the decoded value -----------------------------


def decoded_shape(value, depth: int = 1) -> tuple[int, int, int]:
    """(containers, commas, depth) of a decoded JSON value: what json_shape must find."""
    if not isinstance(value, list | dict):
        return 0, 0, depth - 1
    entries = list(value.values()) if isinstance(value, dict) else value
    containers, commas, deepest = 1, max(len(entries) - 1, 0), depth
    for entry in entries:
        c, k, d = decoded_shape(entry, depth + 1)
        containers, commas, deepest = containers + c, commas + k, max(deepest, d)
    return containers, commas, deepest


# Strings full of what the check must not count: brackets, commas, quotes, escapes.
structural_text = st.text(alphabet='[]{},"\\:ab\u00e9\n', max_size=12)


@settings(max_examples=500, deadline=None)
@given(
    nested(
        st.none() | st.integers() | st.floats(allow_nan=False) | structural_text, structural_text
    ),
    st.booleans(),
    st.sampled_from([5, 64, views.JSON_CHUNK]),
)
def test_json_shape_counts_only_structure_outside_strings(value, ascii, chunk):
    # Small chunks put chunk boundaries inside strings and escapes.
    text = json.dumps(value, ensure_ascii=ascii).encode()
    with mock.patch.object(views, "JSON_CHUNK", chunk):
        assert views.json_shape(text) == decoded_shape(value), text
