"""Codec envelope and store-URL parsing: pure logic, no services."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from persona.errors import ConfigError, CorruptRecord
from persona.settings import load_settings
from storage import codec, open_store, parse_store_url

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


@given(values)
def test_codec_round_trips(value):
    assert codec.decode(codec.encode(value)) == value


@given(values, st.data())
def test_any_single_bit_flip_is_detected(value, data):
    blob = bytearray(codec.encode(value))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptRecord):
        codec.decode(bytes(blob))


def test_unknown_version_is_refused_by_name():
    blob = bytearray(codec.encode({"a": 1}))
    struct.pack_into(">B", blob, 2, 9)
    with pytest.raises(CorruptRecord, match="format version 9 is not supported"):
        codec.decode(bytes(blob))


@pytest.mark.parametrize("blob", [b"", b"PS", b"garbage that is long enough", b"\x93\x01\x02\x03"])
def test_foreign_or_truncated_bytes_are_refused(blob):
    with pytest.raises(CorruptRecord):
        codec.decode(blob)


def test_sqlite_url():
    assert parse_store_url("sqlite:///tmp/x/persona.db") == ("sqlite", "/tmp/x/persona.db")


def test_cassandra_url_with_every_option():
    kind, options = parse_store_url(
        "cassandra://h1,h2:9142/ks_1?replication=3&consistency=local_quorum"
        "&strategy=NetworkTopologyStrategy&datacenter=dc1&timeout=5&concurrency=32"
    )
    assert kind == "cassandra"
    assert options.hosts == ("h1", "h2") and options.port == 9142 and options.keyspace == "ks_1"
    assert options.replication_factor == 3 and options.consistency == "LOCAL_QUORUM"
    assert options.replication_map() == "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
    assert options.timeout_s == 5.0 and options.write_concurrency == 32


def test_cassandra_url_defaults():
    _, options = parse_store_url("cassandra://db1/persona", load_settings(cassandra_port=9042))
    assert options.port == 9042 and options.consistency == "LOCAL_QUORUM"
    assert options.replication_factor == 1


@pytest.mark.parametrize(
    "url, reason",
    [
        ("postgres://db/persona", "unknown scheme"),
        ("persona.db", "unknown scheme"),
        ("sqlite://relative.db", "sqlite:/// followed by a file path"),
        ("cassandra://h:notaport/ks", "is not a number"),
        ("cassandra://h:9042/", "keyspace name"),
        ("cassandra://h:9042/bad-name", "keyspace name"),
        ("cassandra://h:9042/ks?replicas=3", "unknown parameter"),
        ("cassandra://h:9042/ks?replication=zero", "invalid literal"),
        ("cassandra://h:9042/ks?replication=0", "at least 1"),
    ],
)
def test_invalid_urls_list_the_accepted_forms(url, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        parse_store_url(url)
    assert "sqlite:///path/to/persona.db" in str(info.value)
    assert "cassandra://host1,host2:9042/keyspace" in str(info.value)


def test_unknown_consistency_names_the_choices():
    with pytest.raises(ConfigError, match="LOCAL_QUORUM"):
        open_store("cassandra://127.0.0.1:1/ks?consistency=SOMETIMES")
