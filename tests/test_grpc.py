"""The gRPC reads (serving/persona.proto) through Serve's real gRPC proxy, on real shards:
the same answers as the HTTP API, the same auth rule, and status codes for what goes wrong."""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest

from persona.settings import load_settings
from serving import persona_pb2 as pb
from serving import persona_pb2_grpc as pbg
from tests.conftest import API_TOKEN, SERVE_PORT
from tests.ray_heads import free_port, persona, stack_env

APP, PROTECTED = "persona-grpc", "persona-grpc-protected"
USERS = [f"g-user-{n}" for n in range(40)]
ACTIONS = ["view", "click", "like", "save", "hide", "view", "share"]


def events(users: list[str], per_user: int = 6) -> list[dict]:
    now = time.time()
    return [
        {
            "user_id": user,
            "item_id": f"g-item-{(u * 7 + n) % 30}",
            "action": ACTIONS[(u + n) % len(ACTIONS)],
            "ts": now - 3600 * (per_user - n),
            "topics": [f"topic-{(u + n) % 5}", f"topic-{n % 3}"],
        }
        for u, user in enumerate(users)
        for n in range(per_user)
    ]


def as_json(profile: pb.Profile) -> dict:
    """A Profile message in the HTTP API's JSON shape."""
    return {
        "user_id": profile.user_id,
        "version": profile.version,
        "events": profile.events,
        "first_seen": profile.first_seen if profile.HasField("first_seen") else None,
        "last_seen": profile.last_seen if profile.HasField("last_seen") else None,
        "counters": dict(profile.counters),
        "interests": [{"topic": i.topic, "score": i.score} for i in profile.interests],
        "recent_actions": [
            {"item_id": a.item_id, "action": a.action, "ts": a.ts} for a in profile.recent_actions
        ],
        "hidden_items": list(profile.hidden_items),
        "has_embedding": profile.has_embedding,
    }


def assert_same_profile(grpc_view: dict, http_view: dict) -> None:
    """Equal, but for the interest scores: each answer decays them to its own now."""
    assert [i["topic"] for i in grpc_view["interests"]] == [
        i["topic"] for i in http_view["interests"]
    ]
    assert [i["score"] for i in grpc_view["interests"]] == pytest.approx(
        [i["score"] for i in http_view["interests"]], rel=1e-5
    )
    strip = lambda view: {k: v for k, v in view.items() if k != "interests"}  # noqa: E731
    assert strip(grpc_view) == strip(http_view)


class Client:
    """A gRPC stub for one application, with its metadata."""

    def __init__(self, channel: grpc.Channel, app: str, token: str | None = None):
        self.stub = pbg.PersonaStub(channel)
        self.metadata = [("application", app)]
        if token is not None:
            self.metadata.append(("authorization", f"Bearer {token}"))

    def __getattr__(self, method: str):
        call = getattr(self.stub, method)
        return lambda request: call(request, metadata=self.metadata, timeout=30)


def refusal(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """Serve started with its gRPC proxy on a free port (serve.start's gRPC options only
    take effect on a Serve started now), the app on two shards holding USERS, and the
    same app with reads protected."""
    from ray import serve

    from actors.fleet import Fleet
    from serving.app import build_app
    from serving.grpc_ingress import grpc_options
    from storage import open_store

    data = tmp_path_factory.mktemp("grpc")
    overrides = {
        "store_url": f"sqlite:///{data}/persona.db",
        "namespace": f"persona-grpc-{uuid.uuid4().hex[:8]}",
        "partitions": 16,
        "shards": 2,
        "api_token": API_TOKEN,
        "signals_refresh_s": 0.5,
        "checkpoint_interval_s": 3600.0,
        "grpc_port": free_port(),
    }
    settings = load_settings(**overrides)
    serve.shutdown()
    serve.start(
        http_options={"host": "127.0.0.1", "port": SERVE_PORT},
        grpc_options=grpc_options(settings),
    )
    serve.run(build_app(overrides), name=APP, route_prefix="/")
    # The same shards and store: reads protected is a setting of the replicas only.
    serve.run(
        build_app({**overrides, "protect_reads": True}), name=PROTECTED, route_prefix="/protected"
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30.0)
    admin = {"Authorization": f"Bearer {API_TOKEN}"}
    catalog = [{"item_id": f"g-item-{n}", "topics": [f"topic-{n % 5}"]} for n in range(30)]
    uploaded = http.put("/v1/items", json={"items": catalog}, headers=admin)
    assert uploaded.status_code == 200, uploaded.text
    written = http.post("/v1/events", json=events(USERS), headers=admin)
    assert written.status_code == 200, written.text
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    store = open_store(settings=settings)
    fleet = Fleet.connect(settings, store)
    yield http, channel, fleet
    channel.close()
    http.close()
    serve.delete(PROTECTED)
    serve.delete(APP)
    serve.shutdown()  # the next module's serve.start gets the Serve it asks for
    fleet.shutdown()
    store.close()


def test_get_profile_equals_the_http_profile(served):
    http, channel, _fleet = served
    client = Client(channel, APP)
    for user in USERS[:5]:
        message = client.GetProfile(pb.GetProfileRequest(user_id=user))
        expected = http.get(f"/v1/users/{user}/profile").json()
        assert_same_profile(as_json(message), expected)
    assert any(
        as_json(client.GetProfile(pb.GetProfileRequest(user_id=u)))["hidden_items"] for u in USERS
    ), "some user hid an item, so the field is exercised"


def test_an_unknown_user_is_not_found(served):
    _http, channel, _fleet = served
    error = refusal(Client(channel, APP).GetProfile, pb.GetProfileRequest(user_id="nobody-1"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody-1" in error.details()


def test_batch_get_profiles_reads_several_shards_and_lists_unknown_ids(served):
    http, channel, fleet = served
    from actors.routing import group_users

    asked = [*USERS[:20], "nobody-2", USERS[3], "nobody-3"]
    assert len(group_users(USERS[:20], fleet.owners, fleet.partitions)) == 2, "both shards"
    answer = Client(channel, APP).BatchGetProfiles(pb.BatchGetProfilesRequest(user_ids=asked))
    assert [p.user_id for p in answer.profiles] == USERS[:20]  # first asked order, once each
    assert list(answer.missing) == ["nobody-2", "nobody-3"]
    for message in answer.profiles[:3]:
        assert_same_profile(
            as_json(message), http.get(f"/v1/users/{message.user_id}/profile").json()
        )


def test_recommend_returns_k_items_with_a_rec_id(served):
    _http, channel, _fleet = served
    client = Client(channel, APP)
    answer = client.Recommend(pb.RecommendRequest(user_id=USERS[0], k=5))
    assert answer.user_id == USERS[0] and not answer.cold_start
    assert len(answer.items) == 5 and len(answer.rec_id) == 32
    assert all(item.item_id for item in answer.items)
    for item in answer.items:
        assert sum(item.sources.values()) == pytest.approx(item.score, abs=1e-5)
    cold = client.Recommend(pb.RecommendRequest(user_id="newcomer", k=3))
    assert cold.cold_start and len(cold.items) == 3
    default = client.Recommend(pb.RecommendRequest(user_id=USERS[1]))
    assert len(default.items) == 20  # the HTTP default k; 24 of the 30 items are unseen
    assert answer.rec_id != default.rec_id


@pytest.mark.parametrize(
    ("method", "request_", "reason"),
    [
        ("GetProfile", pb.GetProfileRequest(user_id=""), "1-128 characters"),
        ("GetProfile", pb.GetProfileRequest(user_id="x" * 129), "1-128 characters"),
        ("GetProfile", pb.GetProfileRequest(user_id="a\x00b"), "non-printable"),
        ("GetProfile", pb.GetProfileRequest(user_id="a/b"), "may not contain '/'"),
        ("Recommend", pb.RecommendRequest(user_id="u", k=201), "k: at most 200"),
        ("Recommend", pb.RecommendRequest(user_id="u", topic="t" * 65), "topic: at most 64"),
        (
            "BatchGetProfiles",
            pb.BatchGetProfilesRequest(user_ids=["ok", "", "a/b"]),
            "1: user_id must be 1-128",
        ),
        (
            "BatchGetProfiles",
            pb.BatchGetProfilesRequest(user_ids=[f"u{n}" for n in range(1001)]),
            "at most 1000",
        ),
    ],
)
def test_bad_input_is_invalid_argument_with_the_reason(served, method, request_, reason):
    _http, channel, _fleet = served
    error = refusal(getattr(Client(channel, APP), method), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()


@pytest.mark.parametrize(
    "body",
    [b"\x0a\x02\xff\xfe", b"\x0a\x05ab", b"\xff\xff\xff\xff"],
    ids=["bad-utf8", "truncated", "garbage"],
)
def test_bytes_that_are_no_message_are_invalid_argument(served, body):
    """A broken client's bytes: grpc would answer UNKNOWN before Persona's code ran."""
    _http, channel, _fleet = served
    raw = channel.unary_unary(
        "/persona.v1.Persona/GetProfile",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw(body, metadata=[("application", APP)], timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a persona.v1.GetProfileRequest" in caught.value.details()


def test_protected_reads_need_a_read_token(served):
    _http, channel, _fleet = served
    request = pb.GetProfileRequest(user_id=USERS[0])
    anonymous = refusal(Client(channel, PROTECTED).GetProfile, request)
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = refusal(Client(channel, PROTECTED, token="not-the-token").GetProfile, request)
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    for method, req in (
        ("Recommend", pb.RecommendRequest(user_id=USERS[0])),
        ("BatchGetProfiles", pb.BatchGetProfilesRequest(user_ids=USERS[:2])),
    ):
        error = refusal(getattr(Client(channel, PROTECTED), method), req)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    allowed = Client(channel, PROTECTED, token=API_TOKEN).GetProfile(request)
    assert allowed.user_id == USERS[0]
    # The open app answers without a token.
    assert Client(channel, APP).GetProfile(request).user_id == USERS[0]


def test_a_shard_that_is_gone_is_unavailable(served):
    """Last in the module: it kills a shard for good."""
    import ray

    from actors.routing import partition_of

    _http, channel, fleet = served
    user = USERS[0]
    owner = fleet.owners[partition_of(user, fleet.partitions)]
    ray.kill(fleet.shards[owner], no_restart=True)
    error = refusal(Client(channel, APP).GetProfile, pb.GetProfileRequest(user_id=user))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert owner in error.details()


def test_persona_up_serves_grpc_behind_haproxy(tmp_path):
    """`persona up` (HAProxy in front, Serve's throughput mode) starts the gRPC reads on
    PERSONA_GRPC_PORT, HAProxy listening there, and `down` frees the port."""
    from jobs.local import port_holder

    env = stack_env(tmp_path, PERSONA_PARTITIONS=16)
    port = int(env["PERSONA_GRPC_PORT"])
    try:
        started = persona(env, "up")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"gRPC 127.0.0.1:{port}" in started.stdout
        assert "haproxy" in (port_holder(port) or "")
        api = f"http://127.0.0.1:{env['PERSONA_HTTP_PORT']}"
        written = httpx.post(f"{api}/v1/events", json=events(["ann"]), timeout=30)
        assert written.status_code == 200, written.text
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = Client(channel, "persona")
            message = client.GetProfile(pb.GetProfileRequest(user_id="ann"))
            assert_same_profile(
                as_json(message), httpx.get(f"{api}/v1/users/ann/profile", timeout=30).json()
            )
            error = refusal(client.GetProfile, pb.GetProfileRequest(user_id="nobody"))
            assert error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stopped = persona(env, "down")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert port_holder(port) is None
