"""Shared fixtures: a real Cassandra node (started by `make test`) and both stores.

Cassandra tests never skip: if no node answers, they fail and say what to start.
"""

from __future__ import annotations

import gc
import os
import socket
import uuid

import pytest

from persona.settings import load_settings

CASSANDRA_PORT = int(os.environ.get("PERSONA_CASSANDRA_PORT", "9042"))
# Small journal buckets so the contract tests cross bucket boundaries.
TEST_BUCKET_ROWS = 8
_TABLES = (
    "meta",
    "profiles",
    "journal",
    "checkpoints",
    "assignments",
    "items",
    "tombstones",
    "dedup",
    "exposures",
    "attributions",
    "experiment_changes",
    "quarantine",
    "signals",
    "models",
    "model_chunks",
    "model_switches",
)


def cassandra_url(keyspace: str, **params: str) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"replication": "1", "consistency": "ONE", **params}.items()
    )
    return f"cassandra://127.0.0.1:{CASSANDRA_PORT}/{keyspace}?{query}"


def require_cassandra() -> None:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        if sock.connect_ex(("127.0.0.1", CASSANDRA_PORT)) != 0:
            pytest.fail(
                f"no Cassandra node answers on 127.0.0.1:{CASSANDRA_PORT}. Start one with "
                "`persona cassandra start` (or run `make test`, which starts and stops it).",
                pytrace=False,
            )


@pytest.fixture(scope="session")
def cassandra_keyspace():
    """One keyspace for the session's Cassandra tests, dropped at the end."""
    require_cassandra()
    from storage import parse_store_url
    from storage.cassandra_store import CassandraStore

    keyspace = f"persona_test_{uuid.uuid4().hex[:8]}"
    settings = load_settings(journal_bucket_rows=TEST_BUCKET_ROWS)
    _, options = parse_store_url(cassandra_url(keyspace), settings)
    admin = CassandraStore(options)
    yield keyspace, options, admin
    admin._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
    admin.close()


@pytest.fixture
def cassandra_store(cassandra_keyspace):
    from storage.cassandra_store import CassandraStore

    _keyspace, options, admin = cassandra_keyspace
    for table in _TABLES:
        admin._session.execute(f"TRUNCATE {table}")
    store = CassandraStore(options)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path):
    from storage.sqlite_store import SqliteStore

    store = SqliteStore(tmp_path / "persona.db")
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "cassandra"])
def store(request):
    """The store contract suite runs against every backend."""
    return request.getfixturevalue(f"{request.param}_store")


# --- Ray ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        namespace="persona-tests",
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        logging_level="warning",
        resources={"persona_shard": 64},
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        # Drop every Ray reference while Ray is still up. serve.shutdown() leaves the
        # controller's actor handle and an object ref in a reference cycle (through the
        # RayActorError it catches); only the cyclic collector frees them, on whatever
        # thread runs it next. If that is another thread (a Cassandra driver thread) while
        # ray.shutdown() tears the core worker down, the ref's finalizer calls into the
        # gone core worker and Ray ends the process with exit code 1, before pytest's
        # summary ("The core worker has already been shutdown").
        gc.collect()
        ray.shutdown()


@pytest.fixture
def fresh_settings(tmp_path, request):
    """Settings for one fleet: its own namespace (shard names), store and a small P.

    Parametrize indirectly with "sqlite" or "cassandra"; default sqlite."""
    kind = getattr(request, "param", "sqlite")
    namespace = f"persona-test-{uuid.uuid4().hex[:8]}"
    if kind == "cassandra":
        require_cassandra()
        url = cassandra_url(f"persona_{uuid.uuid4().hex[:10]}", consistency="LOCAL_QUORUM")
    else:
        url = f"sqlite:///{tmp_path}/persona.db"
    settings = load_settings(
        store_url=url,
        namespace=namespace,
        partitions=16,
        shards=2,
        journal_bucket_rows=TEST_BUCKET_ROWS,
        checkpoint_interval_s=3600.0,
    )
    yield settings
    if kind == "cassandra":
        from storage import open_store

        store = open_store(settings=settings)
        store._session.execute(f"DROP KEYSPACE IF EXISTS {store.options.keyspace}")
        store.close()


@pytest.fixture
def fleet(ray_session, fresh_settings):
    """A started fleet. Its store is the fixture's, closed even when the start fails: an
    open Cassandra store keeps driver threads running to the end of the session."""
    from actors.fleet import Fleet
    from storage import open_store

    with open_store(settings=fresh_settings) as store:
        started = Fleet.start(fresh_settings, store)
        yield started
        started.shutdown()


@pytest.fixture
def connect_fleet():
    """Fleet.connect for a test body or its threads; the stores it opens close with the test."""
    from actors.fleet import Fleet
    from storage import open_store

    stores = []

    def connect(settings):
        store = open_store(settings=settings)
        stores.append(store)
        return Fleet.connect(settings, store)

    yield connect
    for store in stores:
        store.close()


# --- Serve -------------------------------------------------------------------------

API_TOKEN = "test-token-0123456789"
SERVE_PORT = int(os.environ.get("PERSONA_TEST_HTTP_PORT", "8765"))


@pytest.fixture(scope="module")
def api(ray_session, tmp_path_factory):
    """A real Serve app over loopback (SQLite store, token auth on), for one test module."""
    import httpx
    from ray import serve

    from serving.app import build_app

    data = tmp_path_factory.mktemp("serve")
    namespace = f"persona-api-{uuid.uuid4().hex[:8]}"
    overrides = {
        "store_url": f"sqlite:///{data}/persona.db",
        "namespace": namespace,
        "partitions": 16,
        "shards": 2,
        "api_token": API_TOKEN,
        "max_batch_events": 500,
        "max_body_bytes": 256 * 1024,
        "signals_refresh_s": 0.5,
        "checkpoint_interval_s": 3600.0,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app(overrides), name="persona", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}", timeout=30.0)
    client.settings = load_settings(**overrides)
    yield client
    client.close()
    serve.delete("persona")
    from actors.fleet import Fleet
    from storage import open_store

    with open_store(settings=client.settings) as store:
        Fleet.connect(client.settings, store).shutdown()
