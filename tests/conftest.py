"""Shared fixtures: a real Cassandra node (started by `make test`) and both stores.

Cassandra tests never skip: if no node answers, they fail and say what to start.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from persona.settings import load_settings

CASSANDRA_PORT = int(os.environ.get("PERSONA_CASSANDRA_PORT", "9042"))
# Small journal buckets so the contract tests cross bucket boundaries.
TEST_BUCKET_ROWS = 8
_TABLES = ("meta", "profiles", "journal", "checkpoints", "assignments", "items", "tombstones")


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
