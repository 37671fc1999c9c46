"""What only the Cassandra store has: keyspace settings, statement plumbing, error mapping."""

from __future__ import annotations

import uuid

import pytest

from persona.errors import StoreUnavailable
from persona.settings import load_settings
from storage import open_store
from tests.conftest import cassandra_url, require_cassandra


@pytest.fixture
def fresh_keyspace():
    require_cassandra()
    name = f"persona_rf_{uuid.uuid4().hex[:8]}"
    yield name
    store = open_store(cassandra_url(name))
    store._session.execute(f"DROP KEYSPACE IF EXISTS {name}")
    store.close()


def test_keyspace_replication_comes_from_the_url(fresh_keyspace):
    store = open_store(cassandra_url(fresh_keyspace, replication="3"))
    try:
        replication = store.keyspace_replication()
        assert replication["class"].endswith("SimpleStrategy")
        assert replication["replication_factor"] == "3"
    finally:
        store.close()


def test_unreachable_consistency_is_a_clear_store_error(fresh_keyspace):
    # Replication 3 on a one-node cluster cannot meet LOCAL_QUORUM (2 replicas).
    url = cassandra_url(fresh_keyspace, replication="3", consistency="LOCAL_QUORUM")
    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable, match=r"could not write profiles.*Unavailable"):
            store.put_profiles({"u": b"x"})
    finally:
        store.close()


def test_no_node_on_the_port_is_a_clear_store_error():
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1"):
        open_store(
            "cassandra://127.0.0.1:1/persona_nowhere?timeout=2",
            load_settings(),
        )


def test_schema_creation_is_idempotent(fresh_keyspace):
    first = open_store(cassandra_url(fresh_keyspace))
    first.put_profiles({"u": b"kept"})
    second = open_store(cassandra_url(fresh_keyspace))
    try:
        assert second.get_profiles(["u"]) == {"u": b"kept"}
    finally:
        first.close()
        second.close()
