"""What an acknowledgement means: the durability setting reaches each store and the
local Cassandra node's configuration (README, "What an acknowledgement means")."""

from __future__ import annotations

import logging
import uuid

import pytest
import yaml

from persona.errors import ConfigError
from persona.settings import load_settings
from storage import open_store
from storage.cassandra_local import LocalNode
from tests.conftest import cassandra_url, require_cassandra

# Everything the local node's cassandra.yaml may set: identity, addresses, ports,
# directories, single-node settings and the commitlog mode. No limit a client can hit.
SINGLE_NODE_KEYS = {
    "cluster_name",
    "num_tokens",
    "initial_token",
    "partitioner",
    "endpoint_snitch",
    "listen_address",
    "rpc_address",
    "storage_port",
    "native_transport_port",
    "start_native_transport",
    "seed_provider",
    "data_file_directories",
    "commitlog_directory",
    "saved_caches_directory",
    "hints_directory",
    "cdc_raw_directory",
    "cdc_enabled",
    "auto_snapshot",
    "commitlog_sync",
    "commitlog_sync_period",
}


def sqlite_synchronous(store) -> int:
    return store._db.execute("PRAGMA synchronous").fetchone()[0]


def node_yaml(tmp_path, durability: str) -> dict:
    settings = load_settings(data_dir=str(tmp_path), durability=durability)
    return yaml.safe_load(LocalNode.from_settings(settings).config_yaml())


def test_sqlite_normal_durability_is_wal_with_synchronous_normal(tmp_path):
    settings = load_settings(durability="normal")
    with open_store(f"sqlite:///{tmp_path}/persona.db", settings) as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sqlite_synchronous(store) == 1  # NORMAL


def test_sqlite_strict_durability_fsyncs_every_commit(tmp_path):
    settings = load_settings(durability="strict")
    with open_store(f"sqlite:///{tmp_path}/persona.db", settings) as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sqlite_synchronous(store) == 2  # FULL


def test_unknown_durability_is_refused_naming_the_modes(tmp_path):
    settings = load_settings(durability="paranoid")
    with pytest.raises(ConfigError, match="normal"):
        open_store(f"sqlite:///{tmp_path}/persona.db", settings)
    with pytest.raises(ConfigError, match="strict"):
        LocalNode.from_settings(
            load_settings(data_dir=str(tmp_path), durability="paranoid")
        ).config_yaml()


def test_local_node_yaml_sets_nothing_but_single_node_settings(tmp_path):
    for durability in ("normal", "strict"):
        config = node_yaml(tmp_path, durability)
        assert set(config) <= SINGLE_NODE_KEYS, set(config) - SINGLE_NODE_KEYS
        assert not any("threshold" in key or "timeout" in key for key in config)


def test_local_node_yaml_commitlog_sync_follows_durability(tmp_path):
    normal = node_yaml(tmp_path, "normal")
    assert (normal["commitlog_sync"], normal["commitlog_sync_period"]) == ("periodic", "10000ms")
    strict = node_yaml(tmp_path, "strict")
    assert strict["commitlog_sync"] == "batch"
    assert "commitlog_sync_period" not in strict


def test_local_node_yaml_uses_the_settings_ports_and_data_dir(tmp_path):
    settings = load_settings(
        data_dir=str(tmp_path), cassandra_port=19042, cassandra_storage_port=17000
    )
    config = yaml.safe_load(LocalNode.from_settings(settings).config_yaml())
    assert config["native_transport_port"] == 19042
    assert config["storage_port"] == 17000
    assert config["data_file_directories"] == [f"{tmp_path}/cassandra/19042/data"]


def test_strict_cassandra_store_warns_when_one_replica_may_acknowledge(caplog):
    require_cassandra()
    keyspace = f"persona_dur_{uuid.uuid4().hex[:8]}"
    strict = load_settings(durability="strict")
    caplog.set_level(logging.WARNING, logger="storage.cassandra_store")
    store = open_store(cassandra_url(keyspace, replication="3", consistency="ONE"), strict)
    try:
        weak = [r.getMessage() for r in caplog.records if "quorum" in r.getMessage()]
        assert weak and "consistency ONE and replication 3" in weak[0]
        caplog.clear()
        # One replica: ONE is a quorum of it, nothing to warn about.
        open_store(cassandra_url(keyspace, replication="1", consistency="ONE"), strict).close()
        assert not [r for r in caplog.records if "quorum" in r.getMessage()]
    finally:
        store._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        store.close()


def test_strict_cassandra_store_warns_exactly_when_the_node_syncs_periodically(caplog):
    require_cassandra()
    keyspace = f"persona_dur_{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger="storage.cassandra_store")
    url = cassandra_url(keyspace, consistency="LOCAL_QUORUM")
    store = open_store(url, load_settings(durability="strict"))
    try:
        mode = store.commitlog_sync()
        assert mode in ("periodic", "batch", "group")
        warned = [r for r in caplog.records if "syncs its commitlog" in r.getMessage()]
        assert bool(warned) == (mode == "periodic")
        caplog.clear()
        open_store(url, load_settings(durability="normal")).close()
        assert not [r for r in caplog.records if r.name == "storage.cassandra_store"]
    finally:
        store._session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        store.close()
