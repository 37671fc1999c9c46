"""Batch profile lookup (POST /v1/profiles:batchGet): a real Serve app on a real Ray,
requests over loopback, users spread over both shards of the fixture's fleet."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from actors.routing import partition_of
from serving.views import MAX_LOOKUP_IDS
from storage import open_store
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
LOOKUP = "/v1/profiles:batchGet"


def seed(api, users: list[str]) -> None:
    now = time.time()
    events = [
        {"user_id": u, "item_id": f"item-{n % 7}", "action": "click", "ts": now - n, "topics": [t]}
        for n, u in enumerate(users)
        for t in ("jazz", "news")
    ]
    reply = api.post("/v1/events", json=events, headers=AUTH)
    assert reply.status_code == 200, reply.text


def owners(api, users: list[str]) -> set[str]:
    with open_store(settings=api.settings) as store:
        assignment = store.get_assignments()
    return {assignment[partition_of(u, api.settings.partitions)].owner for u in users}


def without_scores(profile: dict) -> dict:
    # Interest scores are decayed to the time of each request.
    return {**profile, "interests": [i["topic"] for i in profile["interests"]]}


def test_a_lookup_answers_users_of_every_shard_once_each_in_the_order_asked(api):
    users = [f"lookup-{n}" for n in range(40)]
    seed(api, users)
    assert len(owners(api, users)) == 2  # both shards of the fixture's fleet
    asked = [*reversed(users), users[0], users[5], "lookup-never-seen", users[0]]
    reply = api.post(LOOKUP, json={"user_ids": asked})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [p["user_id"] for p in body["profiles"]] == list(reversed(users))
    assert body["missing"] == ["lookup-never-seen"]
    for profile in body["profiles"]:
        single = api.get(f"/v1/users/{profile['user_id']}/profile").json()
        assert without_scores(profile) == without_scores(single)
        assert profile["counters"] == {"click": 2}


def test_unknown_and_deleted_users_are_missing_not_errors(api):
    seed(api, ["lookup-kept", "lookup-gone"])
    assert api.delete("/v1/users/lookup-gone", headers=AUTH).status_code == 204
    reply = api.post(LOOKUP, json={"user_ids": ["lookup-gone", "lookup-kept", "nobody"]})
    assert reply.status_code == 200, reply.text
    assert [p["user_id"] for p in reply.json()["profiles"]] == ["lookup-kept"]
    assert reply.json()["missing"] == ["lookup-gone", "nobody"]
    assert api.post(LOOKUP, json={"user_ids": []}).json() == {"profiles": [], "missing": []}


@pytest.mark.parametrize("count", [MAX_LOOKUP_IDS + 1, 5 * MAX_LOOKUP_IDS])
def test_more_ids_than_the_limit_are_413_naming_it(api, count):
    reply = api.post(LOOKUP, json={"user_ids": [f"u{n}" for n in range(count)]})
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["code"] == "too_many_ids" and f"{MAX_LOOKUP_IDS}" in error["message"]


def test_the_limit_itself_is_answered(api):
    reply = api.post(LOOKUP, json={"user_ids": [f"u{n}" for n in range(MAX_LOOKUP_IDS)]})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["missing"]) == MAX_LOOKUP_IDS


@pytest.mark.parametrize(
    "body, content_type, status, code",
    [
        (b'{"user_ids": [', "application/json", 400, "malformed_json"),
        (b"\xff\xfe", "application/json", 400, "bad_encoding"),
        (b'["a", "b"]', "application/json", 422, "invalid_lookup"),
        (b"{}", "application/json", 422, "invalid_lookup"),
        (b'{"user_ids": "a"}', "application/json", 422, "invalid_lookup"),
        (b'{"user_ids": ["a", 7]}', "application/json", 422, "invalid_id"),
        (b'{"user_ids": ["a", ""]}', "application/json", 422, "invalid_id"),
        (b'{"user_ids": ["a/b"]}', "application/json", 422, "invalid_id"),
        (b'{"user_ids": [[[[[[[[[[[[[[[[[["a"]]]]]]]]]]]]]]]]]]}', "application/json", 422, None),
        (b'{"user_ids": ["a"]}', "text/plain", 415, "unsupported_media_type"),
        (b"\x91\xa1a", "application/msgpack", 415, "unsupported_media_type"),
    ],
)
def test_malformed_lookups_are_a_4xx_with_the_reason(api, body, content_type, status, code):
    reply = api.post(LOOKUP, content=body, headers={"Content-Type": content_type})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code


def test_an_invalid_id_is_named_by_its_index(api):
    reply = api.post(LOOKUP, json={"user_ids": ["fine", "a\x07", "fine-too", 3]})
    errors = reply.json()["error"]["errors"]
    assert [e["index"] for e in errors] == [1, 3]


def test_a_body_over_the_byte_limit_is_413(api):
    padding = " " * (api.settings.max_body_bytes + 1)
    body = f'{{"user_ids": ["a"]{padding}}}'.encode()
    reply = api.post(LOOKUP, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"


def test_lookups_need_the_token_when_reads_are_protected(api):
    """The single reads' rule: the same fleet behind an app with PERSONA_PROTECT_READS=1."""
    from ray import serve

    from serving.app import build_app

    seed(api, ["lookup-guarded"])
    overrides = {
        "store_url": api.settings.store_url,
        "namespace": api.settings.namespace,
        "partitions": api.settings.partitions,
        "api_token": API_TOKEN,
        "protect_reads": True,
    }
    serve.run(build_app(overrides), name="persona-lookup-protected", route_prefix="/guarded")
    try:
        url = str(api.base_url).rstrip("/") + "/guarded" + LOOKUP
        body = {"user_ids": ["lookup-guarded"]}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert httpx.post(url, json=body, headers=wrong, timeout=30).status_code == 403
        reply = httpx.post(url, json=body, headers=AUTH, timeout=30)
        assert reply.status_code == 200
        assert [p["user_id"] for p in reply.json()["profiles"]] == ["lookup-guarded"]
    finally:
        serve.delete("persona-lookup-protected")


def test_the_lookup_is_in_the_openapi_document(api):
    operation = api.get("/openapi.json").json()["paths"][LOOKUP]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["user_ids"]["maxItems"] == MAX_LOOKUP_IDS
    assert {"200", "401", "403", "413", "415", "422"} <= set(operation["responses"])
    answer = json.dumps(operation["responses"]["200"])
    assert "LookupOut" in answer
