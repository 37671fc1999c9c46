"""Who may call what: scoped tokens given as digests, their rotation, the start-ups that
would leave an exposed API open, and the plaintext token kept out of actors, job rows
and Ray's logs. A real Serve app on a real Ray, requests over loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from persona.errors import ConfigError
from persona.settings import load_settings
from tests.conftest import SERVE_PORT

# The legacy plaintext token (PERSONA_API_TOKEN), unique to this run so that finding it
# anywhere can only mean it leaked. Given with the newline a mounted secret ends in.
PLAIN = f"plain-admin-{uuid.uuid4().hex}"
READER, WRITER, ADMIN = (f"{role}-{uuid.uuid4().hex}" for role in ("read", "write", "admin"))
NOW = time.time()


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = {
    "dashboard": {"sha256": sha256(READER), "role": "read"},
    "ingest": {"sha256": sha256(WRITER), "role": "write"},
    "ops": {"sha256": sha256(ADMIN), "role": "admin"},
}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def event(user: str, item: str = "song-1") -> dict:
    return {"user_id": user, "item_id": item, "action": "click", "ts": NOW, "topics": ["jazz"]}


def deploy(name: str, overrides: dict) -> httpx.Client:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(overrides), name=name, route_prefix=f"/{name}")
    return httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}/{name}", timeout=30.0)


@pytest.fixture(scope="module")
def secured(ray_session, tmp_path_factory):
    """An app with reads protected, three scoped tokens and the plaintext admin token."""
    from ray import serve

    from actors.fleet import Fleet

    data = tmp_path_factory.mktemp("secured")
    overrides = {
        "store_url": f"sqlite:///{data}/persona.db",
        "data_dir": str(data),
        "namespace": f"persona-sec-{uuid.uuid4().hex[:8]}",
        "partitions": 16,
        "shards": 2,
        "api_tokens": TOKENS,
        "api_token": PLAIN + "\n",
        "protect_reads": True,
        "checkpoint_interval_s": 3600.0,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    client = deploy("secured", overrides)
    client.overrides = overrides
    client.settings = load_settings(**overrides)
    yield client
    client.close()
    serve.delete("secured")
    Fleet.connect(client.settings).shutdown()


# --- each call and the role it needs ------------------------------------------------

CALLS = [
    ("GET", "/v1/users/{user}/profile", None, "read", 200),
    ("GET", "/v1/users/{user}/recommendations", None, "read", 200),
    ("GET", "/v1/items/sec-item", None, "read", 200),
    ("POST", "/v1/events", [event("{user}")], "write", 200),
    ("DELETE", "/v1/users/{user}", None, "admin", 204),
    ("PUT", "/v1/items", {"items": [{"item_id": "sec-item", "topics": ["jazz"]}]}, "admin", 200),
]
BY_ROLE = {"read": READER, "write": WRITER, "admin": ADMIN}


@pytest.mark.parametrize("method, path, body, needed, ok", CALLS)
def test_each_call_needs_a_token_of_its_role_or_above(secured, method, path, body, needed, ok):
    def call(user: str, headers: dict) -> httpx.Response:
        secured.post("/v1/events", json=[event(user)], headers=bearer(ADMIN)).raise_for_status()
        secured.put(
            "/v1/items", json={"items": [{"item_id": "sec-item"}]}, headers=bearer(ADMIN)
        ).raise_for_status()
        payload = json.loads(json.dumps(body).replace("{user}", user)) if body else None
        kwargs = {"json": payload} if payload is not None else {}
        return secured.request(method, path.format(user=user), headers=headers, **kwargs)

    user = f"sec-{uuid.uuid4().hex[:8]}"
    assert call(user, {}).status_code == 401
    wrong = call(user, bearer("not-a-token"))
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    for role, token in BY_ROLE.items():
        answer = call(f"{user}-{role}", bearer(token))
        if ROLE_RANK[role] >= ROLE_RANK[needed]:
            assert answer.status_code == ok, (role, answer.text)
        else:
            assert answer.status_code == 403, (role, answer.text)
            assert f"'{needed}'" in answer.json()["error"]["message"]
    # PERSONA_API_TOKEN (configured with a trailing newline) is one admin token.
    assert call(f"{user}-plain", bearer(PLAIN)).status_code == ok


ROLE_RANK = {"read": 0, "write": 1, "admin": 2}


def test_readiness_details_need_a_known_token(secured):
    assert secured.get("/readyz").json() == {"status": "ready"}
    detailed = secured.get("/readyz", headers=bearer(READER)).json()
    assert detailed["store"] == "ok" and set(detailed["shards"].values()) == {"ok"}
    assert secured.get("/readyz", headers=bearer("not-a-token")).status_code == 403


def test_idempotency_keys_belong_to_the_token_name(secured):
    key = {"Idempotency-Key": f"sec-{uuid.uuid4().hex[:8]}"}
    first = secured.post("/v1/events", json=[event("idem")], headers={**bearer(WRITER), **key})
    again = secured.post("/v1/events", json=[event("idem")], headers={**bearer(WRITER), **key})
    other = secured.post("/v1/events", json=[event("idem")], headers={**bearer(ADMIN), **key})
    assert (first.json()["applied"], again.json()["duplicate"]) == (1, 1)
    assert other.json()["applied"] == 1  # another client's req-1 is another batch


def test_idempotency_scope_is_the_token_name_and_names_no_secret():
    from serving.auth import TokenTable, client_scope

    table = TokenTable(access(TOKENS))
    writer = table.identify(f"Bearer {WRITER}\n")
    assert client_scope(writer) == "ingest" == client_scope(table.identify(f"Bearer  {WRITER}"))
    assert client_scope(table.identify(f"Bearer {ADMIN}")) == "ops"
    assert client_scope(table.identify(None)) == "anonymous"


def access(tokens: dict) -> dict:
    from serving.auth import access_tokens

    return access_tokens(load_settings(env={}, api_tokens=tokens))


def test_a_rotated_token_works_beside_the_old_one_then_alone(secured):
    from ray import serve

    old, new = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}"
    key = {"Idempotency-Key": f"rot-{uuid.uuid4().hex[:8]}"}
    both = {"ingest": {"sha256": [sha256(old), sha256(new)], "role": "write"}}
    client = deploy("rotation", {**secured.overrides, "api_tokens": both, "api_token": ""})
    sent = client.post("/v1/events", json=[event("rot")], headers={**bearer(old), **key})
    retried = client.post("/v1/events", json=[event("rot")], headers={**bearer(new), **key})
    assert sent.json()["applied"] == 1
    assert retried.json()["duplicate"] == 1  # the same name keeps its Idempotency-Keys
    only_new = {"ingest": {"sha256": sha256(new), "role": "write"}}
    client = deploy("rotation", {**secured.overrides, "api_tokens": only_new, "api_token": ""})
    try:
        old_answer = client.post("/v1/events", json=[event("rot")], headers=bearer(old))
        new_answer = client.post("/v1/events", json=[event("rot")], headers=bearer(new))
    finally:
        serve.delete("rotation")  # its replica's CPU is wanted by the Ray Data job below
    assert (old_answer.status_code, new_answer.status_code) == (403, 200)


# --- start-ups that would leave an exposed API open -----------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "persona.example.com"])
def test_an_exposed_app_without_a_token_refuses_to_start(host):
    from serving.app import build_app

    with pytest.raises(ConfigError, match="PERSONA_ALLOW_ANONYMOUS_WRITES"):
        build_app({"bind_host": host})


def test_serve_configs_tell_the_app_the_address_they_bind():
    from persona.settings import PROJECT_ROOT

    serve_yaml = yaml.safe_load((PROJECT_ROOT / "serve.yaml").read_text())
    manifest = yaml.safe_load((PROJECT_ROOT / "deploy" / "rayservice.yaml").read_text())
    for config in (serve_yaml, yaml.safe_load(manifest["spec"]["serveConfigV2"])):
        (app,) = config["applications"]
        assert app["args"]["bind_host"] == config["http_options"]["host"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_app_may_run_without_a_token(host):
    from serving.auth import access_tokens, refuse_open_exposure

    settings = load_settings(env={}, bind_host=host)
    refuse_open_exposure(settings, access_tokens(settings))


def test_anonymous_writes_on_an_exposed_address_start_with_a_loud_warning(caplog):
    from serving.auth import refuse_open_exposure

    settings = load_settings(env={}, bind_host="0.0.0.0", allow_anonymous_writes=True)
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        refuse_open_exposure(settings, {})
    assert any("ANYONE" in r.getMessage() for r in caplog.records)


def test_protect_reads_without_a_token_refuses_to_start():
    from serving.app import build_app

    with pytest.raises(ConfigError, match="PERSONA_PROTECT_READS"):
        build_app({"protect_reads": True})


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"sha256": "hunter2-plaintext", "role": "admin"}, "64 hex"),
        ({"sha256": sha256("x"), "role": "root"}, "role"),
        ({"sha256": sha256("x")}, "role"),
        ({"token": "hunter2-plaintext", "role": "read"}, "sha256"),
    ],
)
def test_a_token_entry_that_is_not_a_digest_and_role_is_refused_without_echoing_it(entry, problem):
    from serving.auth import access_tokens

    with pytest.raises(ConfigError, match=problem) as refused:
        access_tokens(load_settings(env={}, api_tokens={"ci": entry}))
    assert "hunter2" not in str(refused.value)


def test_tokens_are_read_from_json_in_the_environment():
    from serving.auth import access_tokens

    env = {"PERSONA_API_TOKENS": json.dumps(TOKENS), "PERSONA_API_TOKEN": f" {PLAIN}\n"}
    tokens = access_tokens(load_settings(env=env))
    assert tokens["ops"] == {"sha256": [sha256(ADMIN)], "role": "admin"}
    assert tokens["api_token"] == {"sha256": [sha256(PLAIN)], "role": "admin"}


def test_a_blank_plaintext_token_is_refused_rather_than_taken_for_none():
    from serving.auth import access_tokens

    with pytest.raises(ConfigError, match="PERSONA_API_TOKEN"):
        access_tokens(load_settings(env={}, api_token=" \n"))


# --- the plaintext never leaves the process that builds the app ---------------------


def test_settings_never_print_the_plaintext():
    settings = load_settings(env={}, api_token=PLAIN)
    assert PLAIN not in repr(settings) and PLAIN not in str(settings)


def test_shard_actors_never_hold_the_plaintext(secured):
    from actors.fleet import Fleet

    fleet = Fleet.connect(secured.settings)
    assert fleet.shards
    for name in fleet.shards:
        shard = ray.get_actor(name, namespace=secured.settings.namespace)
        held = ray.get(shard.__ray_call__.remote(lambda s: dataclasses.asdict(s.settings)))
        assert held["api_token"] == "" and PLAIN not in json.dumps(held)
        assert held["api_tokens"] == TOKENS  # digests only


def test_ingest_job_rows_never_hold_the_plaintext(secured, tmp_path):
    from jobs.ingest import run, task_rows

    files = []
    for n in range(2):
        path = tmp_path / f"events-{n}.jsonl"
        path.write_text("".join(json.dumps(event(f"job-{n}-{i}")) + "\n" for i in range(5)))
        files.append(path)
    rows = task_rows(files, secured.settings, str(tmp_path / "dead.jsonl"), 100, 2)
    assert len(rows) == 2 and PLAIN not in json.dumps(rows)
    assert all(row["settings"]["api_token"] == "" for row in rows)
    summary = run(
        [str(p) for p in files], settings=secured.settings, distributed=True, stream=io.StringIO()
    )
    assert summary.applied == 10


def test_ray_logs_never_hold_the_plaintext(secured):
    """Last in the module: after the app, the shards, the rotation and a Ray Data job
    have all run with the plaintext token set."""
    secured.get("/readyz", headers=bearer(PLAIN)).raise_for_status()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    needle = PLAIN.encode()
    leaked = [
        str(path)
        for path in session.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]
    assert leaked == []
