"""The shard's protocol without Ray: loads racing deletes, item embeddings cached once.

ShardState is what the ProfileShard actor drives; here its steps are called in
the interleavings the actor's event loop allows (a store read in a thread while
other calls run), against an embedded SQLite store.
"""

from __future__ import annotations

import numpy as np
import pytest

from actors.catalog import encode_item
from actors.shard_state import ShardState
from persona.settings import load_settings
from storage import open_store

T = 1_700_000_000.0


@pytest.fixture
def state(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    shard = ShardState("s0", store, load_settings(), partitions=8)
    shard.owned = {p: 1 for p in range(8)}
    yield shard
    store.close()


def stored_user(state: ShardState, user: str) -> None:
    state.apply_in_memory([(user, "i1", "click", T, ("jazz",), 1.0)], 1)
    state.store.put_profiles(state.encode_profiles([user]))
    state.forget_user(user)


def test_a_load_that_read_before_a_delete_does_not_bring_the_user_back(state):
    stored_user(state, "gone")
    since = state.removals
    loaded = state.fetch_profiles(["gone"])  # the read, in its thread, before the delete
    state.store.delete_profiles(["gone"])
    state.forget_deleted("gone", T)
    state.install(loaded, since)  # the read's result lands after the delete
    assert "gone" not in state.table


def test_a_load_without_a_delete_in_between_is_installed(state):
    stored_user(state, "kept")
    since = state.removals
    state.forget_deleted("someone-else", T)
    state.install(state.fetch_profiles(["kept"]), since)
    assert "kept" in state.table and state.table.get("kept").counts[state.rules.code("click")] == 1


def test_items_without_embeddings_are_looked_up_once_and_never_applied(state):
    state.store.upsert_items(
        {
            "with": encode_item({"topics": ["t"], "embedding": [1.0, 0.0]}),
            "without": encode_item({"topics": ["t"]}),
        }
    )
    state.install_item_vectors(state.fetch_item_vectors(["with", "without", "unknown"]))
    assert set(state.items_checked) == {"with", "without", "unknown"}
    assert list(state.item_vectors) == ["with"]
    assert state.fetch_item_vectors(["with", "without", "unknown"]) == {}
    state.apply_in_memory([("u", "with", "click", T, (), 1.0)], 1)
    assert np.allclose(state.table.get("u").interest_vector(), [1.0, 0.0])
