"""The store contract, one suite for every backend (SQLite and a real Cassandra node)."""

from __future__ import annotations

import threading

import pytest

from persona.errors import (
    ConfigError,
    CorruptRecord,
    JournalConflict,
    StaleEpoch,
    StoreUnavailable,
    VersionConflict,
)
from storage import Checkpoint, codec


def test_profiles_round_trip_and_overwrite(store):
    store.put_profiles({"u1": b"one", "u2": b"two"})
    assert store.get_profiles(["u1", "u2"]) == {"u1": b"one", "u2": b"two"}
    store.put_profiles({"u1": b"uno"})
    assert store.get_profiles(["u1"]) == {"u1": b"uno"}


def test_missing_profiles_are_absent_not_errors(store):
    store.put_profiles({"here": b"x"})
    assert store.get_profiles(["here", "nobody", "nobody-else"]) == {"here": b"x"}
    assert store.get_profiles([]) == {}


def test_delete_profiles(store):
    store.put_profiles({"a": b"1", "b": b"2"})
    store.delete_profiles(["a", "never-existed"])
    assert store.get_profiles(["a", "b"]) == {"b": b"2"}


def test_many_keys_at_once(store):
    profiles = {f"user-{i}": f"blob-{i}".encode() for i in range(2500)}
    store.put_profiles(profiles)
    assert store.get_profiles(list(profiles)) == profiles
    assert dict(store.scan_profiles()) == profiles


def test_unicode_and_128_character_ids(store):
    ids = ["ünïcødé-用户-🙂", "x" * 128, "a b/c?d=e&f", "'; DROP TABLE profiles; --"]
    store.put_profiles({i: i.encode() for i in ids})
    assert store.get_profiles(ids) == {i: i.encode() for i in ids}


def test_one_megabyte_profile(store):
    big = codec.encode({"payload": b"\x01" * (1024 * 1024)})
    store.put_profiles({"big": big})
    assert codec.decode(store.get_profiles(["big"])["big"]) == {"payload": b"\x01" * (1024 * 1024)}


def test_journal_keeps_order_across_many_appends(store):
    for seq in range(1, 101):
        store.append_journal("shard-0", seq, f"batch-{seq}".encode())
    store.append_journal("shard-1", 1, b"other journal")
    rows = list(store.read_journal("shard-0", 0))
    assert [seq for seq, _ in rows] == list(range(1, 101))
    assert rows[41] == (42, b"batch-42")
    assert list(store.read_journal("shard-1", 0)) == [(1, b"other journal")]


def test_journal_read_after_position_with_limit(store):
    for seq in range(1, 40):
        store.append_journal("j", seq, b"%d" % seq)
    assert [s for s, _ in store.read_journal("j", 20)] == list(range(21, 40))
    assert [s for s, _ in store.read_journal("j", 5, limit=3)] == [6, 7, 8]
    assert list(store.read_journal("j", 39)) == []
    assert list(store.read_journal("missing", 0)) == []


def test_journal_trim(store):
    for seq in range(1, 30):
        store.append_journal("j", seq, b"%d" % seq)
    store.trim_journal("j", 17)
    assert [s for s, _ in store.read_journal("j", 0)] == list(range(18, 30))
    store.trim_journal("j", 10)  # trimming below the trimmed point changes nothing
    assert [s for s, _ in store.read_journal("j", 0)] == list(range(18, 30))
    store.append_journal("j", 30, b"30")
    store.trim_journal("j", 29)
    assert list(store.read_journal("j", 0)) == [(30, b"30")]


def test_journal_position_can_be_written_once(store):
    store.append_journal("j", 1, b"first")
    with pytest.raises(JournalConflict):
        store.append_journal("j", 1, b"second writer")
    assert list(store.read_journal("j", 0)) == [(1, b"first")]


def test_checkpoint_round_trip(store):
    assert store.get_checkpoint("shard-0") is None
    store.put_checkpoint("shard-0", Checkpoint(seq=42, meta=b"ids"))
    assert store.get_checkpoint("shard-0") == Checkpoint(seq=42, meta=b"ids")
    store.put_checkpoint("shard-0", Checkpoint(seq=50, meta=b""))
    assert store.get_checkpoint("shard-0") == Checkpoint(seq=50, meta=b"")


def test_checkpoint_survives_trim(store):
    for seq in range(1, 6):
        store.append_journal("j", seq, b"x")
    store.put_checkpoint("j", Checkpoint(seq=5, meta=b"m"))
    store.trim_journal("j", 5)
    assert store.get_checkpoint("j") == Checkpoint(seq=5, meta=b"m")


def test_meta_is_written_once(store):
    assert store.get_meta("partitions") is None
    assert store.put_meta_if_absent("partitions", "256") == "256"
    assert store.put_meta_if_absent("partitions", "64") == "256"
    assert store.get_meta("partitions") == "256"


def test_claims_advance_the_epoch(store):
    assert store.claim_partitions("shard-0", {0: 0, 1: 0}) == {0: 1, 1: 1}
    assert store.claim_partitions("shard-1", {1: 1}) == {1: 2}
    assignments = store.get_assignments()
    assert (assignments[0].owner, assignments[0].epoch) == ("shard-0", 1)
    assert (assignments[1].owner, assignments[1].epoch) == ("shard-1", 2)


def test_epoch_fence_refuses_a_stale_claim_and_changes_nothing(store):
    store.claim_partitions("shard-0", {0: 0, 1: 0})
    store.claim_partitions("shard-1", {1: 1})
    with pytest.raises(StaleEpoch):
        # shard-2 still believes partition 1 is at epoch 1; partition 0 is fine.
        store.claim_partitions("shard-2", {0: 1, 1: 1})
    assignments = store.get_assignments()
    assert assignments[0].owner == "shard-0" and assignments[0].epoch == 1
    assert assignments[1].owner == "shard-1" and assignments[1].epoch == 2


def test_epoch_fence_refuses_a_stale_owners_journal_write(store):
    store.claim_partitions("shard-0", {7: 0})
    store.append_journal("shard-0", 1, b"while owner", fence={7: 1})
    store.claim_partitions("shard-1", {7: 1})  # partition 7 moves away
    with pytest.raises(StaleEpoch):
        store.append_journal("shard-0", 2, b"zombie write", fence={7: 1})
    assert [s for s, _ in store.read_journal("shard-0", 0)] == [1]
    store.append_journal("shard-1", 1, b"new owner", fence={7: 2})


def test_concurrent_writers_from_threads(store):
    errors = []

    def writer(worker: int) -> None:
        try:
            for round_ in range(5):
                store.put_profiles(
                    {f"w{worker}-u{i}": f"{worker}:{round_}".encode() for i in range(50)}
                )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = dict(store.scan_profiles())
    assert len(stored) == 8 * 50
    assert all(blob == f"{key.split('-')[0][1:]}:4".encode() for key, blob in stored.items())


def test_concurrent_appends_to_one_position_have_one_winner(store):
    outcomes = []

    def append(worker: int) -> None:
        try:
            store.append_journal("contended", 1, f"writer {worker}".encode())
            outcomes.append("won")
        except JournalConflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=append, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    assert len(list(store.read_journal("contended", 0))) == 1


def test_corrupt_blob_reaches_a_shard_as_corrupt_record(store):
    """The store hands back exactly the bytes it was given (it never "repairs" a blob),
    so a flipped bit is caught by the codec where a shard loads the profile."""
    from actors.shard_state import ShardState
    from persona.settings import load_settings

    good = codec.encode({"interests": {"jazz": 1.5}})
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    store.put_profiles({"victim": bytes(flipped)})
    assert store.get_profiles(["victim"])["victim"] == bytes(flipped)
    shard = ShardState("s", store, load_settings(), partitions=4)
    with pytest.raises(CorruptRecord, match="profile victim: checksum"):
        shard.fetch_profiles(["victim"])


def test_item_catalog(store):
    store.upsert_items({"i1": b"a", "i2": b"b"})
    store.upsert_items({"i2": b"b2", "i3": b"c"})
    assert store.get_items(["i1", "i2", "nope"]) == {"i1": b"a", "i2": b"b2"}
    assert dict(store.scan_items()) == {"i1": b"a", "i2": b"b2", "i3": b"c"}


def test_tombstones(store):
    store.add_tombstones({"gone": 1700000000.5})
    assert store.get_tombstones(["gone", "alive"]) == {"gone": 1700000000.5}


def test_ping_answers_on_a_live_store(store):
    store.ping()
    store.put_profiles({"after-ping": b"x"})
    assert store.get_profiles(["after-ping"]) == {"after-ping": b"x"}


def test_an_unreachable_store_is_store_unavailable_naming_it(tmp_path):
    from storage import open_store

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.raises(StoreUnavailable, match="file-not-dir"):
        open_store(f"sqlite:///{blocked}/persona.db")
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1"):
        open_store("cassandra://127.0.0.1:1/nowhere?timeout=2")


def test_dedup_records_are_read_back_and_replaced(store):
    store.put_dedup({"0/file-a": b"one", "1/file-a": b"two"}, ttl_s=3600)
    store.put_dedup({"0/file-a": b"uno"}, ttl_s=3600)
    assert store.get_dedup(["0/file-a", "1/file-a", "2/none"]) == {
        "0/file-a": b"uno",
        "1/file-a": b"two",
    }
    assert store.get_dedup([]) == {}


def test_dedup_records_expire_after_their_retention(store):
    import time

    store.put_dedup({"0/short": b"x"}, ttl_s=1)
    store.put_dedup({"0/long": b"y"}, ttl_s=3600)
    deadline = time.monotonic() + 10
    while store.get_dedup(["0/short"]) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert store.get_dedup(["0/short", "0/long"]) == {"0/long": b"y"}


def test_quarantined_rows_are_kept_with_their_reason(store):
    store.quarantine("shard-a", 7, b"bad", "cannot be applied: KeyError")
    store.quarantine("shard-a", 3, b"worse", "undecodable")
    store.quarantine("shard-b", 1, b"other", "x")
    assert store.get_quarantine("shard-a") == [
        (3, "undecodable"),
        (7, "cannot be applied: KeyError"),
    ]
    assert store.get_quarantine("shard-c") == []


def test_item_signal_chunks_are_read_back_in_order(store):
    store.put_signals("shard-a", 1, [b"zero", b"one", b"two"])
    store.put_signals("shard-a", 0, [b"other slot"])
    assert store.get_signals("shard-a", 1, 3) == [b"zero", b"one", b"two"]
    assert store.get_signals("shard-a", 1, 2) == [b"zero", b"one"]
    with pytest.raises(CorruptRecord, match="chunk 3 of 4"):
        store.get_signals("shard-a", 1, 4)


def test_a_position_at_or_below_the_checkpoint_is_never_free_again(store):
    """Trimmed positions stay taken: a writer lagging behind the checkpoint must not
    write where no reader will ever look."""
    for seq in range(1, 21):
        store.append_journal("lagging", seq, f"row-{seq}".encode())
    store.put_checkpoint("lagging", Checkpoint(seq=18, meta=b""))
    store.trim_journal("lagging", 18)
    for seq in (1, 9, 16, 17, 18):
        with pytest.raises(JournalConflict):
            store.append_journal("lagging", seq, b"late")
    assert [s for s, _ in store.read_journal("lagging", 18)] == [19, 20]
    store.append_journal("lagging", 21, b"next")
    assert [s for s, _ in store.read_journal("lagging", 0)] == [19, 20, 21]


def test_model_versions_are_immutable_and_the_switch_log_has_one_writer_per_position(store):
    import numpy as np

    from actors.item_model import decode_chunks, encode_chunks, encode_info

    chunks = encode_chunks(["a", "b"], np.eye(2, dtype=np.float32))
    store.put_model("v1", encode_info({"items": 2}), chunks)
    with pytest.raises(VersionConflict):
        store.put_model("v1", b"other", [b"x"])
    assert list(store.get_models()) == ["v1"]
    assert decode_chunks("v1", store.get_model_chunks("v1")).ids == ["a", "b"]
    with pytest.raises(ConfigError):
        store.get_model_chunks("missing")
    store.append_model_switch(1, "v1", False)
    with pytest.raises(VersionConflict):
        store.append_model_switch(1, "v1", False)
    assert [(s.seq, s.version, s.rollback) for s in store.get_model_switches()] == [
        (1, "v1", False)
    ]


def test_exposures_are_read_back_by_time_and_overwritten_by_a_resend(store):
    base = 1_700_000_000.0
    records = {f"rec-{n:04d}": (base + n * 600.0, f"blob-{n}".encode()) for n in range(30)}
    store.put_exposures(records, ttl_s=3600)
    store.put_exposures({"rec-0003": (base + 1800.0, b"blob-3")}, ttl_s=3600)  # a resend
    got = list(store.scan_exposures(base + 1800.0, base + 6000.0))
    assert sorted(got) == [
        (f"rec-{n:04d}", base + n * 600.0, f"blob-{n}".encode()) for n in range(3, 11)
    ]
    assert len(list(store.scan_exposures(base - 1, base + 10**6))) == 30


def test_attributions_are_keyed_by_event_so_a_replay_overwrites(store):
    at = 1_700_000_123.5
    store.put_attributions({"file:1#7": (at, b"a"), "file:1#8": (at, b"b")}, ttl_s=3600)
    store.put_attributions({"file:1#7": (at, b"a")}, ttl_s=3600)
    assert sorted(store.scan_attributions(at - 1, at + 1)) == [
        ("file:1#7", at, b"a"),
        ("file:1#8", at, b"b"),
    ]


def test_exposures_expire_after_their_retention(store):
    import time

    now = time.time()
    store.put_exposures({"short": (now, b"x")}, ttl_s=1)
    store.put_exposures({"long": (now, b"y")}, ttl_s=3600)
    deadline = time.monotonic() + 10
    while len(list(store.scan_exposures(now - 1, now + 1))) > 1 and time.monotonic() < deadline:
        time.sleep(0.25)
        store.put_exposures({"long": (now, b"y")}, ttl_s=3600)  # SQLite prunes on write
    assert [k for k, _, _ in store.scan_exposures(now - 1, now + 1)] == ["long"]


def test_the_experiment_log_has_one_writer_per_position(store):
    store.append_experiment_change(1, b"first")
    with pytest.raises(VersionConflict):
        store.append_experiment_change(1, b"other")
    store.append_experiment_change(2, b"second")
    log = store.get_experiment_changes()
    assert [(seq, blob) for seq, _at, blob in log] == [(1, b"first"), (2, b"second")]
    assert log[0][1] <= log[1][1]
