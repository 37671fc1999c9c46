"""The HTTP API: a real Serve app on a real Ray, requests over loopback."""

from __future__ import annotations

import collections
import json
import re
import socket
import time

import httpx
import msgpack
import pytest
import ray

from persona.errors import ConfigError
from persona.settings import load_settings
from serving.auth import token_digest
from tests.conftest import API_TOKEN

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NOW = time.time()


def event(user="alice", item="song-1", action="click", ts=None, **extra):
    return {"user_id": user, "item_id": item, "action": action, "ts": ts or NOW, **extra}


def post(api, events, **headers):
    return api.post("/v1/events", json=events, headers={**AUTH, **headers})


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz", headers=AUTH)
    assert ready.status_code == 200 and ready.json()["store"] == "ok"
    assert set(ready.json()["shards"].values()) == {"ok"}


def test_anonymous_readiness_says_only_ready_or_not(api):
    # The details name the store's hosts and the shards: only for a token that may read.
    anonymous = api.get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    wrong = api.get("/readyz", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"


def test_a_token_with_a_trailing_newline_is_the_same_token():
    # A mounted secret usually ends in a newline; clients send the token without it.
    clean = token_digest(load_settings(api_token=API_TOKEN))
    assert token_digest(load_settings(api_token=f"{API_TOKEN}\n")) == clean
    assert token_digest(load_settings(api_token=f"  {API_TOKEN}\r\n")) == clean


def test_a_blank_token_is_refused_rather_than_taken_for_no_token():
    with pytest.raises(ConfigError, match="PERSONA_API_TOKEN"):
        token_digest(load_settings(api_token=" \n"))


def test_the_presented_token_is_compared_without_surrounding_whitespace(api):
    padded = {"Authorization": f"Bearer   {API_TOKEN}"}
    assert post(api, [event(user="padded")], **padded).status_code == 200


def test_posted_events_show_in_the_next_read(api):
    ack = post(api, [event(topics=["jazz"]), event(item="song-2", action="save", topics=["jazz"])])
    assert ack.status_code == 200, ack.text
    assert ack.json()["applied"] == 2
    profile = api.get("/v1/users/alice/profile").json()
    assert profile["counters"] == {"click": 1, "save": 1}
    assert profile["interests"][0]["topic"] == "jazz"
    # Equal times: newest first, then by (ts, item, action) descending, so song-2 first.
    assert [a["item_id"] for a in profile["recent_actions"]][:2] == ["song-2", "song-1"]


def test_msgpack_batches_are_accepted(api):
    body = msgpack.packb([event(user="packed")])
    reply = api.post(
        "/v1/events", content=body, headers={**AUTH, "Content-Type": "application/msgpack"}
    )
    assert reply.status_code == 200 and reply.json()["applied"] == 1
    assert api.get("/v1/users/packed/profile").status_code == 200


def test_unknown_user_is_404_with_a_json_body(api):
    reply = api.get("/v1/users/never-seen/profile")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "unknown_user"


def test_idempotency_key_applies_a_retry_once(api):
    batch = [event(user="idem", item=f"i{n}") for n in range(5)]
    first = post(api, batch, **{"Idempotency-Key": "req-42"})
    second = post(api, batch, **{"Idempotency-Key": "req-42"})
    assert first.json()["applied"] == 5
    assert second.json()["applied"] == 0 and second.json()["duplicate"] == 5
    assert api.get("/v1/users/idem/profile").json()["events"] == 5


def test_idempotency_key_survives_a_shard_restart(api):
    from actors.fleet import Fleet

    batch = [event(user=f"restart-{n}", item="x") for n in range(20)]
    assert post(api, batch, **{"Idempotency-Key": "req-restart"}).json()["applied"] == 20
    fleet = Fleet.connect(api.settings)
    for handle in fleet.shards.values():
        ray.kill(handle, no_restart=False)
    for _ in range(60):
        reply = post(api, batch, **{"Idempotency-Key": "req-restart"})
        if reply.status_code == 200:
            break
        time.sleep(0.5)
    assert reply.json()["duplicate"] == 20 and reply.json()["applied"] == 0
    profiles = [api.get(f"/v1/users/restart-{n}/profile").json() for n in range(20)]
    assert all(p["events"] == 1 for p in profiles)


@pytest.mark.parametrize(
    "body, content_type, status, code",
    [
        (b"[{", "application/json", 400, "malformed_json"),
        (b"\xff\xfe\xfd", "application/json", 400, "bad_encoding"),
        (b"{}", "application/json", 422, "invalid_events"),
        (b"[]", "application/json", 422, "empty_batch"),
        (b"[1, 2]", "application/json", 422, "invalid_events"),
        (b"user_id=a", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"[]", "text/plain", 415, "unsupported_media_type"),
        (b"\xc1", "application/msgpack", 422, "invalid_events"),
        (b"\x92\x80", "application/msgpack", 400, "malformed_msgpack"),
        (b"\x81\xa1a\x01", "application/msgpack", 422, "invalid_events"),
    ],
)
def test_malformed_bodies(api, body, content_type, status, code):
    reply = api.post("/v1/events", content=body, headers={**AUTH, "Content-Type": content_type})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"ts": "now"}, "finite number"),
        ({"user_id": 7}, "must be a string"),
        ({"action": "teleport"}, "unknown action"),
        ({"user_id": "x" * 10_000}, "1-128 characters"),
        ({"item_id": "../../etc/passwd\x00"}, "non-printable"),
        ({"user_id": "tab\there"}, "non-printable"),
        ({"ts": NOW * 1000}, "milliseconds"),
    ],
)
def test_invalid_events_are_422_and_nothing_is_applied(api, bad, reason):
    good = event(user="atomic", item="ok")
    reply = post(api, [good, {**event(user="atomic"), **bad}])
    assert reply.status_code == 422
    errors = reply.json()["error"]["errors"]
    assert errors[0]["index"] == 1 and reason in errors[0]["reason"]
    assert api.get("/v1/users/atomic/profile").status_code == 404


def test_missing_fields_and_nan_are_422(api):
    raw = b'[{"user_id": "a", "item_id": "b", "action": "view", "ts": NaN}, {"user_id": "a"}]'
    reply = api.post(
        "/v1/events", content=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert reply.status_code == 422
    reasons = [e["reason"] for e in reply.json()["error"]["errors"]]
    assert "finite number" in reasons[0] and "missing field" in reasons[1]


def test_batches_and_bodies_over_the_limits_are_413(api):
    too_many = [event(user="big", item=f"i{n}") for n in range(501)]
    assert post(api, too_many).status_code == 413
    huge = json.dumps([event(user="big", topics=["x" * 60] * 16)] * 400).encode()
    reply = api.post(
        "/v1/events", content=huge, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"
    assert api.get("/v1/users/big/profile").status_code == 404


def test_control_characters_and_long_ids_in_paths(api):
    assert api.get("/v1/users/%07bell/profile").status_code == 422
    assert api.get("/v1/users/" + "x" * 200 + "/profile").status_code == 422
    # An encoded slash never reaches a route: no user id can hold one (refused at
    # validation), so this is the API's own 404, not a file.
    dotted = api.get("/v1/users/..%2F..%2Fetc%2Fpasswd/profile")
    assert dotted.status_code == 404 and dotted.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "method, path, body, ok",
    [
        ("POST", "/v1/events", [event(user="auth")], 200),
        ("DELETE", "/v1/users/auth-del", None, 204),
        ("PUT", "/v1/items", {"items": [{"item_id": "auth-item"}]}, 200),
        ("GET", "/v1/items/auth-item-get", None, 200),
    ],
)
def test_protected_endpoints_need_the_token(api, method, path, body, ok):
    post(api, [event(user="auth-del")])
    api.put("/v1/items", json={"items": [{"item_id": "auth-item-get"}]}, headers=AUTH)
    kwargs = {"json": body} if body is not None else {}
    assert api.request(method, path, **kwargs).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert api.request(method, path, headers=wrong, **kwargs).status_code == 403
    assert api.request(method, path, headers=AUTH, **kwargs).status_code == ok


def test_reads_are_open_unless_configured(api):
    post(api, [event(user="reader")])
    assert api.get("/v1/users/reader/profile").status_code == 200


def test_protect_reads_puts_reads_behind_the_token(api):
    """The same fleet and store behind a second app with PERSONA_PROTECT_READS=1."""
    import httpx
    from ray import serve

    from serving.app import build_app

    post(api, [event(user="guarded")])
    overrides = {
        "store_url": api.settings.store_url,
        "namespace": api.settings.namespace,
        "partitions": api.settings.partitions,
        "api_token": API_TOKEN,
        "protect_reads": True,
    }
    serve.run(build_app(overrides), name="persona-protected", route_prefix="/protected")
    try:
        base = str(api.base_url).rstrip("/") + "/protected"
        for path in ("/v1/users/guarded/profile", "/v1/users/guarded/recommendations"):
            assert httpx.get(base + path, timeout=30).status_code == 401
            wrong = {"Authorization": "Bearer not-the-token"}
            assert httpx.get(base + path, headers=wrong, timeout=30).status_code == 403
            assert httpx.get(base + path, headers=AUTH, timeout=30).status_code == 200
    finally:
        serve.delete("persona-protected")


def test_catalog_round_trip_and_validation(api):
    items = {
        "items": [
            {"item_id": "cat-1", "topics": ["jazz"], "embedding": [1.0, 0.0], "created_at": NOW},
            {"item_id": "cat-2", "topics": ["rock"], "created_at": NOW - 10},
        ]
    }
    assert api.put("/v1/items", json=items, headers=AUTH).json() == {"upserted": 2}
    got = api.get("/v1/items/cat-1", headers=AUTH).json()
    assert got["topics"] == ["jazz"] and got["embedding"] == [1.0, 0.0]
    assert api.get("/v1/items/nope", headers=AUTH).status_code == 404
    bad = api.put("/v1/items", json={"items": [{"item_id": "x", "embedding": ["a"]}]}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"]["errors"][0]["index"] == 0


def test_recommendations_are_personal_and_exclude_seen_and_hidden(api):
    catalog = [
        {"item_id": f"rec-{t}-{n}", "topics": [t], "created_at": NOW - n}
        for t in ("jazz", "rock", "folk")
        for n in range(6)
    ]
    api.put("/v1/items", json={"items": catalog}, headers=AUTH)
    # The crowd: some engage with rec-jazz-0 then rec-jazz-1; rec-jazz-2 is more
    # popular but never engaged with next to rec-jazz-0.
    history = []
    for u in range(8):
        for n in (0, 1):
            history.append(
                event(user=f"crowd-{u}", item=f"rec-jazz-{n}", ts=NOW - 60 + n, topics=["jazz"])
            )
        history += [
            event(user=f"fans-of-2-{u}", item="rec-jazz-2", ts=NOW - 30 + k, topics=["jazz"])
            for k in range(3)
        ]
    post(api, history)
    post(
        api,
        [
            event(user="fan", item="rec-jazz-0", action="click", ts=NOW - 5, topics=["jazz"]),
            event(user="fan", item="rec-rock-0", action="hide", ts=NOW - 4, topics=["rock"]),
        ],
    )
    # Signals reach the replica on its next refresh (0.5 s here): ask until they did.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = api.get("/v1/users/fan/recommendations", params={"k": 5})
        if reply.status_code == 200 and reply.json()["items"][0]["item_id"] == "rec-jazz-1":
            break
        time.sleep(0.2)
    assert reply.status_code == 200
    body = reply.json()
    items = [i["item_id"] for i in body["items"]]
    assert body["variant"] in api.settings.experiments and body["cold_start"] is False
    assert items[0] == "rec-jazz-1", body
    assert "rec-jazz-0" in body["items"][0]["reason"]
    assert "rec-jazz-0" not in items and "rec-rock-0" not in items
    assert all(i["reason"] for i in body["items"])
    per_topic = {}
    for item in items:
        topic = item.split("-")[1]
        per_topic[topic] = per_topic.get(topic, 0) + 1
    assert max(per_topic.values()) <= api.settings.max_per_topic
    jazz_only = api.get("/v1/users/fan/recommendations", params={"k": 5, "topic": "rock"}).json()
    assert all(i["item_id"].startswith("rec-rock-") for i in jazz_only["items"])
    assert all(i["item_id"] != "rec-rock-0" for i in jazz_only["items"])


def test_unknown_user_gets_cold_start_recommendations(api):
    reply = api.get("/v1/users/brand-new-user/recommendations", params={"k": 3})
    assert reply.status_code == 200
    body = reply.json()
    assert body["cold_start"] is True and len(body["items"]) == 3


def test_variant_assignment_is_deterministic(api):
    variants = {
        api.get(f"/v1/users/user-{n}/recommendations", params={"k": 1}).json()["variant"]
        for n in range(30)
    }
    assert variants == set(api.settings.experiments)
    again = api.get("/v1/users/user-3/recommendations", params={"k": 1}).json()["variant"]
    assert again == api.get("/v1/users/user-3/recommendations", params={"k": 1}).json()["variant"]


def test_delete_removes_the_user_everywhere(api):
    post(api, [event(user="forget-me", item="rec-jazz-0", topics=["jazz"])])
    assert api.get("/v1/users/forget-me/profile").status_code == 200
    assert api.delete("/v1/users/forget-me", headers=AUTH).status_code == 204
    assert api.get("/v1/users/forget-me/profile").status_code == 404
    recs = api.get("/v1/users/forget-me/recommendations").json()
    assert recs["cold_start"] is True
    # Deleting again is safe and says there was nothing left.
    assert api.delete("/v1/users/forget-me", headers=AUTH).status_code == 404


def test_openapi_documents_every_route_and_error(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/users/{user_id}/profile",
        "/v1/users/{user_id}/recommendations",
        "/v1/events",
        "/v1/users/{user_id}",
        "/v1/items",
        "/v1/items/{item_id}",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert {"413", "415", "422", "401", "403"} <= set(paths["/v1/events"]["post"]["responses"])
    body = paths["/v1/events"]["post"]["requestBody"]["content"]
    event_schema = body["application/json"]["schema"]["items"]
    assert {"user_id", "item_id", "action", "ts"} <= set(event_schema["required"])
    assert "application/msgpack" in body
    assert api.get("/docs").status_code == 200


def json_body(api, path, text: bytes, method="POST", **headers):
    headers = {**AUTH, "Content-Type": "application/json", **headers}
    return api.request(method, path, content=text, headers=headers)


def msgpack_body(api, body: bytes):
    headers = {**AUTH, "Content-Type": "application/msgpack"}
    return api.post("/v1/events", content=body, headers=headers)


def assert_refused(reply, status: int | None = None) -> dict:
    """A 4xx (``status`` when given) in the API's one error shape, with a reason."""
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    if status is not None:
        assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] and error["message"], error
    return error


def big_int_event(digits: int) -> bytes:
    return b'[{"user_id": "u", "item_id": "i", "action": "click", "ts": 1%s}]' % (b"0" * digits)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(big_int_event(400), id="ts-10**400"),
        pytest.param(big_int_event(5_000), id="ts-over-python-int-digit-limit"),
        pytest.param(b"[" * 5_000 + b"]" * 5_000, id="nested-5000-deep"),
        pytest.param(b'[{"topics": ' + b"[" * 40 + b"]" * 40 + b"}]", id="nested-40-deep"),
        pytest.param(
            b'[{"action": [], "user_id": "u", "item_id": "i", "ts": 1}]', id="list-action"
        ),
        pytest.param(b'[{"action": {}, "user_id": "u", "item_id": "i", "ts": 1}]', id="map-action"),
    ],
)
def test_malformed_json_events_are_a_4xx_never_a_5xx(api, body):
    assert_refused(json_body(api, "/v1/events", body))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x91\x81\x91\x01\x02", id="map-keyed-by-an-array"),
        pytest.param(b"\x91\x81\x80\x01", id="map-keyed-by-a-map"),
        pytest.param(b"\x91\x81\x01\x02", id="map-keyed-by-an-int"),
        pytest.param(b"\x91" * 3_000 + b"\x01", id="nested-3000-deep"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array-header-claiming-4G-entries"),
        pytest.param(b"\x91\xd4\x01\x00", id="extension-type"),
        pytest.param(msgpack.packb([event()]) + b"\x00", id="trailing-bytes"),
        pytest.param(msgpack.packb([{**event(), "action": [1]}]), id="list-action"),
    ],
)
def test_malformed_msgpack_events_are_a_4xx_never_a_5xx(api, body):
    assert_refused(msgpack_body(api, body))


def test_every_4xx_has_the_error_shape_before_a_route_runs(api):
    # Raised by the router and by FastAPI's own parameter validation, not by a route.
    assert_refused(api.get("/v1/nowhere"), 404)
    assert_refused(api.patch("/v1/items", headers=AUTH), 405)
    for params in ({"k": "0"}, {"k": "many"}, {"k": "9" * 5_000}, {"exclude_seen": "perhaps"}):
        error = assert_refused(api.get("/v1/users/q/recommendations", params=params), 422)
        assert error["code"] == "invalid_request" and error["errors"][0]["field"], error
    assert_refused(api.get("/v1/users/q/recommendations", params={"topic": "t" * 65}), 422)


def test_malformed_headers_are_a_4xx(api):
    good = json.dumps([event(user="headers")]).encode()
    assert_refused(json_body(api, "/v1/events", good, **{"Idempotency-Key": "x" * 129}), 422)
    assert_refused(json_body(api, "/v1/events", good, **{"Idempotency-Key": b"a\xa0b"}), 422)
    for content_type in ("", "application/json-ish", "multipart/form-data; boundary=x"):
        reply = json_body(api, "/v1/events", good, **{"Content-Type": content_type})
        assert_refused(reply, 415)
    text = {"Content-Type": "text/plain"}
    assert_refused(json_body(api, "/v1/items", b'{"items": []}', "PUT", **text), 415)
    assert api.get("/v1/users/headers/profile").status_code == 404


def test_an_idempotency_key_may_hold_a_slash(api):
    # A key names a batch, not a URL: "events.jsonl/3" is a fine name for one.
    reply = post(api, [event(user="slashed-key")], **{"Idempotency-Key": "events.jsonl/3"})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1" * 30, b"\xb2", b"3, 3"])
def test_garbage_content_length_is_a_4xx(api, length):
    # The HTTP server refuses these before the app; a proxy in front may not, so the
    # app parses the header defensively too.
    port = api.base_url.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_TOKEN.encode() + b"\r\n"
            b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n[]"
        )
        status_line = sock.makefile("rb").readline()
    assert 400 <= int(status_line.split()[1]) < 500, status_line


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"items": [{"item_id": "huge", "created_at": 1%s}]}' % (b"0" * 400),
            id="created_at-10**400",
        ),
        pytest.param(
            b'{"items": [{"item_id": "huge", "embedding": [1%s]}]}' % (b"0" * 400),
            id="embedding-10**400",
        ),
        pytest.param(
            b'{"items": [{"item_id": "x", "created_at": 1%s}]}' % (b"0" * 5_000),
            id="int-over-digit-limit",
        ),
        pytest.param(b'{"items": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", id="nested-5000-deep"),
        pytest.param(b'{"items": [{"item_id": "x"}]', id="truncated"),
        pytest.param(b'\xff{"items": []}', id="not-utf-8"),
        pytest.param(b'["items"]', id="not-an-object"),
    ],
)
def test_malformed_item_bodies_are_a_4xx_never_a_5xx(api, body):
    assert_refused(json_body(api, "/v1/items", body, "PUT"))


def test_item_uploads_have_a_byte_and_an_item_limit(api):
    over_count = api.settings.max_items_per_request + 1
    many = {"items": [{"item_id": f"n{n}"} for n in range(over_count)]}
    error = assert_refused(api.put("/v1/items", json=many, headers=AUTH), 413)
    assert error["code"] == "too_many_items"
    heavy = {"items": [{"item_id": "heavy", "topics": ["t" * 60] * 16}] * 400}
    error = assert_refused(api.put("/v1/items", json=heavy, headers=AUTH), 413)
    assert error["code"] == "body_too_large"
    assert api.get("/v1/items/n0", headers=AUTH).status_code == 404


REQUESTS_METRIC = re.compile(
    r"^ray_persona_requests(?:_total)?\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M
)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def request_counts() -> collections.Counter:
    """`ray_persona_requests` of the test app by (endpoint, status, variant), read from
    the Prometheus endpoint of this Ray session's node."""
    port = next(node["MetricsExportPort"] for node in ray.nodes() if node["Alive"])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts = collections.Counter()
    for sample in REQUESTS_METRIC.finditer(text):
        labels = dict(LABEL.findall(sample["labels"]))
        if labels.get("application") == "persona":
            key = (labels["endpoint"], labels["status"], labels["variant"])
            counts[key] += float(sample["value"])
    return counts


def test_every_response_is_counted_by_endpoint_status_and_variant(api):
    before = request_counts()
    expected = collections.Counter()

    def made(reply, endpoint: str, variant: str = "") -> None:
        expected[endpoint, str(reply.status_code), variant] += 1

    made(api.post("/v1/events", json=[event(user="counted")]), "events")
    made(post(api, [event(user="counted")], Authorization="Bearer wrong"), "events")
    made(post(api, [event(user="counted", item=f"i{n}") for n in range(501)]), "events")
    made(json_body(api, "/v1/events", b"[]", **{"Content-Type": "text/plain"}), "events")
    made(json_body(api, "/v1/events", b"[{"), "events")
    made(api.get("/v1/users/counted/recommendations", params={"k": 0}), "recommendations")
    recs = api.get("/v1/users/counted/recommendations", params={"k": 1})
    made(recs, "recommendations", recs.json()["variant"])
    made(api.get("/v1/users/counted/profile"), "profile")
    made(api.get("/healthz"), "healthz")
    made(api.get("/v1/nowhere"), "unmatched")
    statuses = {status for _, status, _ in expected}
    assert statuses == {"200", "400", "401", "403", "404", "413", "415", "422"}, expected
    # Replicas push metrics every few seconds: wait for the counts, within a bound.
    deadline = time.monotonic() + 120
    while True:
        after = request_counts()
        missing = {key: n for key, n in expected.items() if after[key] - before[key] < n}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, (missing, after)


def test_a_replica_closes_the_store_it_opened_when_stopped_or_failing_to_start(
    tmp_path, monkeypatch
):
    import dataclasses
    import gc
    import sqlite3

    import serving.app
    from persona.errors import ConfigError
    from persona.settings import load_settings
    from storage import open_store

    opened = []

    def recording_open_store(**options):
        opened.append(open_store(**options))
        return opened[-1]

    settings = load_settings(store_url=f"sqlite:///{tmp_path}/persona.db", partitions=4)
    replica_class = serving.app.Ingress.func_or_class.__mro__[1]
    # Serve copied the module's globals into the class when it was decorated.
    monkeypatch.setitem(replica_class.__init__.__globals__, "open_store", recording_open_store)
    with pytest.raises(ConfigError):  # no fleet: the replica refuses to start...
        replica_class(dataclasses.asdict(settings), {})
    gc.collect()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):  # ...and its store is closed
        opened[0].get_meta("partitions")
    replica = object.__new__(replica_class)  # what Serve calls when it stops a replica
    replica.store, replica._refresher = recording_open_store(settings=settings), None
    replica.__del__()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[1].get_meta("partitions")


def test_an_ingress_replica_joins_a_fleet_and_never_starts_one(tmp_path):
    """Replicas come and go with load: starting the fleet is the app builder's job, so a
    replica over a store with no fleet refuses to start instead of creating shards."""
    import dataclasses

    from persona.errors import ConfigError
    from persona.settings import load_settings
    from serving.app import Ingress
    from storage import open_store

    settings = load_settings(store_url=f"sqlite:///{tmp_path}/persona.db", partitions=4)
    replica_class = Ingress.func_or_class.__mro__[1]  # our class under Serve's ASGI wrapper
    with pytest.raises(ConfigError, match="start the fleet first"):
        replica_class(dataclasses.asdict(settings), {})
    with open_store(settings=settings) as store:
        assert store.get_assignments() == {}


def test_a_shard_that_is_gone_is_a_503_naming_it_until_it_runs_again(api):
    """A shard killed for good (the store still names it as an owner): readiness lists
    it as down and a write to its partitions answers 503 shard_unavailable with its name
    at once; both recover once the fleet's shards are started again."""
    from actors.fleet import Fleet
    from actors.routing import partition_of
    from storage import open_store

    with open_store(settings=api.settings) as store:
        fleet = Fleet.connect(api.settings, store)
        owner = fleet.owners[partition_of("orphan", fleet.partitions)]
        try:
            # The replica holds a handle to the shard that dies.
            assert api.get("/readyz", headers=AUTH).status_code == 200
            ray.kill(fleet.shards[owner], no_restart=True)
            ready = api.get("/readyz", headers=AUTH)
            assert ready.status_code == 503 and ready.json()["store"] == "ok", ready.json()
            assert ready.json()["shards"][owner].startswith("down"), ready.json()
            fleet = Fleet.start(api.settings, store)  # the shard runs again, from the store
            ready = api.get("/readyz", headers=AUTH)
            assert ready.status_code == 200, ready.json()
            ray.kill(fleet.shards[owner], no_restart=True)
            refused = post(api, [event(user="orphan")], **{"Idempotency-Key": "orphan-1"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shard_unavailable"
            assert owner in refused.json()["error"]["message"]
        finally:
            Fleet.start(api.settings, store)
        again = post(api, [event(user="orphan")], **{"Idempotency-Key": "orphan-1"})
        # ray.kill is asynchronous: the refused write may have landed just before the end.
        assert again.status_code == 200, again.text
        assert again.json()["applied"] + again.json()["duplicate"] == 1, again.text
        assert api.get("/readyz", headers=AUTH).status_code == 200


def test_exposures_are_logged_and_counted_unless_the_switch_is_off(api):
    """A recommendations response is an exposure in the store within a flush or two;
    behind an app built with PERSONA_EXPOSURE_LOGGING=0 the response still names its
    rec_id but nothing is logged (what bench.exposure_bench compares)."""
    import httpx
    from ray import serve

    from serving.app import build_app
    from storage import open_store

    post(api, [event(user="exposed", item="e-1"), event(user="unlogged", item="e-2")])

    def logged_rec_ids(wanted: set[str], deadline_s: float) -> set[str]:
        """The rec_ids in the store once ``wanted`` are there, or at the deadline."""
        deadline = time.monotonic() + deadline_s
        with open_store(settings=api.settings) as store:
            while True:
                found = {rec for rec, _at, _blob in store.scan_exposures(0.0, time.time() + 60)}
                if time.monotonic() > deadline or found >= wanted:
                    return found
                time.sleep(0.5)

    shown = api.get("/v1/users/exposed/recommendations?k=3").json()
    assert shown["rec_id"] in logged_rec_ids({shown["rec_id"]}, 30.0)

    overrides = {
        "store_url": api.settings.store_url,
        "namespace": api.settings.namespace,
        "partitions": api.settings.partitions,
        "api_token": API_TOKEN,
        "exposure_logging": False,
    }
    serve.run(build_app(overrides), name="persona-unlogged", route_prefix="/unlogged")
    try:
        base = str(api.base_url).rstrip("/") + "/unlogged"
        quiet = httpx.get(base + "/v1/users/unlogged/recommendations?k=3", timeout=30).json()
        assert quiet["rec_id"]
        # Several flush intervals pass without it.
        waited = 5 * api.settings.exposure_flush_s
        assert quiet["rec_id"] not in logged_rec_ids({quiet["rec_id"]}, waited)
    finally:
        serve.delete("persona-unlogged")
