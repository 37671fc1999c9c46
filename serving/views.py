"""What the API shows and what it reads: the JSON view of a profile, the batch profile
lookup every ingress shares (HTTP and gRPC), the error body and its exception, and
request bodies decoded within limits. No Ray import: the lookup is handed the fleet."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np

from actors.events import MAX_ID_CHARS, check_id
from actors.profile import ProfileRules, ProfileView

# At most this many user ids in one batch lookup (POST /v1/profiles:batchGet and the
# gRPC ingress): it bounds the work one request buys and its answer (a full profile is
# ~5 KB of JSON, so ~5 MB at most).
MAX_LOOKUP_IDS = 1000
# Recommendations one request asks for (GET .../recommendations?k=, gRPC Recommend): 20
# unless given, at most 200; a topic filter of at most 64 characters.
DEFAULT_K, MAX_K = 20, 200
MAX_TOPIC_CHARS = 64


def profile_view(
    profile: ProfileView, rules: ProfileRules, now: float, *, interests: int = 64
) -> dict:
    """The public shape of a profile: interests decayed to ``now`` and ranked by score
    (ranked on stored scores, so even a years-old profile orders correctly), recent
    actions newest first, lifetime counters and the version."""
    factor = profile.decay_factor(rules.rate, now)
    return {
        "user_id": profile.user_id,
        "version": profile.version,
        "events": profile.events,
        "first_seen": profile.first_seen,
        "last_seen": profile.last_seen,
        "counters": dict(profile.counters),
        "interests": [{"topic": t, "score": s * factor} for t, s in profile.topics[:interests]],
        "recent_actions": [
            {"item_id": item, "action": action, "ts": ts} for ts, item, action in profile.recent
        ],
        "hidden_items": sorted(profile.hidden),
        "has_embedding": profile.interest_vector is not None,
    }


class ProfileReader(Protocol):
    """What the batch lookup needs of a fleet (actors.fleet.Fleet)."""

    async def get_profiles_async(self, user_ids: Sequence[str]) -> dict[str, ProfileView]: ...


@dataclass(frozen=True)
class Lookup:
    """The answer to a batch lookup: the profiles found, each once, in the order their
    ids were first asked for, and the ids that hold no profile (never seen, deleted)."""

    found: list[ProfileView]
    missing: list[str]


def lookup_ids(body: Any) -> list[str]:
    """The user ids of a lookup body ``{"user_ids": [...]}``, or an ApiError: 413 past
    MAX_LOOKUP_IDS, 422 for another shape or an invalid id (each one by index)."""
    ids = body.get("user_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise ApiError(422, "invalid_lookup", 'send {"user_ids": [...]}')
    return check_lookup_ids(ids)


def check_lookup_ids(ids: Sequence[Any]) -> list[str]:
    """``ids`` if they are at most MAX_LOOKUP_IDS valid user ids, else an ApiError."""
    if len(ids) > MAX_LOOKUP_IDS:
        raise ApiError(
            413, "too_many_ids", f"{len(ids)} user ids; at most {MAX_LOOKUP_IDS} per request"
        )
    # The ids of a lookup never go into a URL, but only ids that could were written.
    errors = [
        {"index": n, "reason": problem}
        for n, user in enumerate(ids)
        if (problem := check_id(user, "user_id"))
    ]
    if errors:
        raise ApiError(422, "invalid_id", f"{len(errors)} invalid user id(s)", errors=errors[:100])
    return list(ids)


async def lookup_profiles(fleet: ProfileReader, user_ids: Sequence[str]) -> Lookup:
    """Many users' profiles in one hop per shard: the ids are grouped by owning shard
    (the routing table) and each shard answers its group in one actor call. Duplicate
    ids are answered once; ids are not checked here (``check_lookup_ids``)."""
    wanted = list(dict.fromkeys(user_ids))
    profiles = await fleet.get_profiles_async(wanted)
    return Lookup(
        [profiles[u] for u in wanted if u in profiles],
        [u for u in wanted if u not in profiles],
    )


def lookup_view(lookup: Lookup, rules: ProfileRules, now: float) -> dict:
    """The JSON body of a batch lookup: each profile as ``profile_view`` shows it."""
    return {
        "profiles": [profile_view(p, rules, now) for p in lookup.found],
        "missing": lookup.missing,
    }


def error_body(code: str, message: str, **details) -> dict:
    return {"error": {"code": code, "message": message, **details}}


class ApiError(Exception):
    """A refusal: the HTTP status, a machine-readable code and what was wrong."""

    def __init__(self, status: int, code: str, message: str, **details):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


# --- request bodies: their structure is bounded before they are decoded ----------------
#
# Bytes alone do not bound what a body costs once decoded: an empty msgpack map is one
# byte and becomes a 64-byte dict, `{},` is three bytes of JSON for the same dict. So a
# body is checked against a budget of containers (arrays, objects) and values, derived
# from how many records (events, items) one request may carry, before it is decoded.

# A valid event holds two containers (itself, its topics), an item three (+ embedding).
CONTAINERS_PER_RECORD = 4
# Valid bodies nest 3 (events) or 4 (items) deep.
MAX_DEPTH = 16
# JSON integers longer than a 64-bit one (msgpack's range) are refused: Python would
# build any size (10**400 overflows a float, and 4,301 digits fail int()).
MAX_INT_DIGITS = 20
# The longest valid string is an id: 128 characters of at most 4 bytes in UTF-8.
MAX_STRING_BYTES = 4 * MAX_ID_CHARS
JSON_CHUNK = 1 << 16


@dataclass(frozen=True)
class BodyLimits:
    """How much structure one request body may hold."""

    records: int  # entries of its array: the events, or the items of {"items": [...]}
    values_per_record: int  # fields and list entries of one record, at most
    what: str  # "events" or "items", for the reasons

    @property
    def containers(self) -> int:
        return self.records * CONTAINERS_PER_RECORD + 2

    @property
    def values(self) -> int:
        return self.records * self.values_per_record + 2

    def too_many(self, what: str, limit: int) -> ApiError:
        return ApiError(
            413,
            "too_many_values",
            f"the body holds more than {limit:,} {what}: a request carries at most "
            f"{self.records:,} {self.what}, each of at most {CONTAINERS_PER_RECORD} arrays "
            f"or objects and {self.values_per_record} values",
        )


_STRUCTURE = b'"[]{},'
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(_STRUCTURE)))
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def json_shape(
    body: bytes | bytearray, stop_above: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """``(containers, commas, depth)`` of a JSON text outside its strings, in C-speed
    passes over 64 KiB chunks: escaped backslashes and quotes are dropped, then every
    byte but quotes, brackets and commas; a string holding neither brackets nor commas
    is then a bare ``""``, and any other string an odd run between quotes.

    Counting stops once containers or commas pass ``stop_above`` (what it returns then
    is only known to be larger). The depth is 0 when the brackets do not balance: that
    is not JSON, and the decoder says where."""
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    max_containers, max_commas = stop_above or (sys.maxsize, sys.maxsize)
    containers = commas = 0
    in_string = False
    brackets = []
    for start in range(0, len(body), JSON_CHUNK):
        marks = body[start : start + JSON_CHUNK].translate(None, _NOT_STRUCTURE)
        runs = marks.replace(b'""', b"").split(b'"')
        outside = b"".join(runs[1::2] if in_string else runs[::2])
        in_string ^= len(runs) % 2 == 0
        containers += outside.count(b"[") + outside.count(b"{")
        commas += outside.count(b",")
        if containers > max_containers or commas > max_commas:
            return containers, commas, 0
        brackets.append(outside.translate(None, b","))
    joined = b"".join(brackets)
    if len(joined) != 2 * containers:
        return containers, commas, 0
    levels = np.cumsum(_DEPTH_STEP[np.frombuffer(joined, dtype=np.uint8)], dtype=np.int32)
    return containers, commas, int(levels.max(initial=0))


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(
            422,
            "number_out_of_range",
            f"an integer of {len(digits.lstrip('-'))} digits; at most {MAX_INT_DIGITS} (64 bits)",
        )
    return int(digits)


def _same(value: Any) -> Any:
    # A Python call per object lets other threads run mid-decode: a large body decoded
    # in a worker thread then does not hold the event loop up until it is done.
    return value


def decode_json(body: bytes | bytearray, limits: BodyLimits) -> Any:
    """A JSON body within ``limits``, or an ApiError saying why not (400, 413, 422)."""
    containers, commas, depth = json_shape(body, (limits.containers, limits.values))
    if containers > limits.containers:
        raise limits.too_many("arrays and objects", limits.containers)
    if commas > limits.values:
        raise limits.too_many("values", limits.values)
    if depth > MAX_DEPTH:
        raise ApiError(422, "too_deep", f"the body nests {depth} deep; at most {MAX_DEPTH}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_encoding", f"the body is not UTF-8: {exc}") from exc
    try:
        return json.loads(text, parse_int=_json_int, object_hook=_same)
    except RecursionError as exc:  # unbalanced, so json_shape could not tell the depth
        raise ApiError(422, "too_deep", f"the body nests deeper than {MAX_DEPTH}") from exc
    except ValueError as exc:  # JSONDecodeError among them
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc


class _Budget:
    """msgpack's hook on every array and map it builds: refuses the body once it has
    built more containers or values than ``limits`` allow."""

    def __init__(self, limits: BodyLimits):
        self.limits = limits
        self.containers, self.values = limits.containers, limits.values

    def __call__(self, container: Any) -> Any:
        self.containers -= 1
        self.values -= len(container)
        if self.containers < 0:
            raise self.limits.too_many("arrays and maps", self.limits.containers)
        if self.values < 0:
            raise self.limits.too_many("values", self.limits.values)
        return container


def _msgpack_array_header(body: bytes | bytearray) -> tuple[int, int] | None:
    """(entries, header bytes) of the msgpack array ``body`` starts with, or None."""
    first = body[0] if body else None
    if first is not None and 0x90 <= first <= 0x9F:
        return first & 0x0F, 1
    if first == 0xDC and len(body) >= 3:
        return int.from_bytes(body[1:3], "big"), 3
    if first == 0xDD and len(body) >= 5:
        return int.from_bytes(body[1:5], "big"), 5
    return None


_MSGPACK_LIMIT = re.compile(r"(\d+) exceeds max_(\w+)_len\((\d+)\)")


def _msgpack_refusal(exc: Exception, limits: BodyLimits) -> ApiError:
    """What a msgpack error tells the client: which limit, or that it is not msgpack."""
    if isinstance(exc, msgpack.StackError):
        return ApiError(422, "too_deep", "the body nests deeper than msgpack unpacks")
    if isinstance(exc, msgpack.OutOfData):
        return ApiError(400, "malformed_msgpack", "the body ends inside a msgpack value")
    found = _MSGPACK_LIMIT.search(str(exc))
    if found is None:
        problem = str(exc) or type(exc).__name__
        return ApiError(400, "malformed_msgpack", f"the msgpack body cannot be read: {problem}")
    size, kind, limit = found.group(1), found.group(2), found.group(3)
    if kind == "ext":
        return ApiError(
            422,
            "unsupported_type",
            "msgpack extension types are not accepted (send a timestamp as a number)",
        )
    if kind in ("str", "bin"):
        return ApiError(
            422, "value_too_long", f"a string of {size} bytes; at most {limit} (the longest id)"
        )
    return ApiError(
        413,
        "too_many_values",
        f"an array or map of {size} entries; one of {limits.what} holds at most {limit}",
    )


def decode_msgpack_records(body: bytes | bytearray, limits: BodyLimits) -> list:
    """A msgpack array of records within ``limits``, or an ApiError saying why not.

    The array's length is read from its header and checked before anything is built;
    its entries are then unpacked one at a time under msgpack's own limits on every
    inner array, map and string (so no list is preallocated longer than a record may
    be) and the budget counting everything built."""
    header = _msgpack_array_header(body)
    if header is None:
        raise ApiError(422, f"invalid_{limits.what}", f"the body must be an array of {limits.what}")
    count, start = header
    if count > limits.records:
        raise ApiError(
            413, "batch_too_large", f"{count} {limits.what}; at most {limits.records} per request"
        )
    budget = _Budget(limits)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,  # keys are field names: an array or a map as a key is refused
        max_buffer_size=max(len(body), 1),
        max_array_len=limits.values_per_record,
        max_map_len=limits.values_per_record,
        max_str_len=MAX_STRING_BYTES,
        max_bin_len=MAX_STRING_BYTES,
        max_ext_len=0,
        object_hook=budget,
        list_hook=budget,
    )
    unpacker.feed(memoryview(body)[start:])
    try:
        records = [unpacker.unpack() for _ in range(count)]
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _msgpack_refusal(exc, limits) from exc
    if unpacker.tell() != len(body) - start:
        raise ApiError(400, "malformed_msgpack", f"bytes follow the array of {count} {limits.what}")
    return records
