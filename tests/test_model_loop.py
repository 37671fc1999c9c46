"""The model loop: a training job publishes item embeddings as a version, serving
switches to it without a restart, and a rollback returns to the version before.
The log and codec are pure (no cluster); the loop itself runs on real Ray, a real
store and the real HTTP API."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from actors import item_model
from actors.item_model import (
    current_version,
    decode_chunks,
    encode_chunks,
    rollback_target,
    serving_stack,
)
from jobs.train_embeddings import interactions
from persona.errors import ConfigError
from serving.ranking import Catalog, Signals, recommend
from storage.base import ModelSwitch
from tests.conftest import API_TOKEN


def log(*entries: tuple[str, bool]) -> list[ModelSwitch]:
    return [ModelSwitch(n + 1, v, rb, 0.0) for n, (v, rb) in enumerate(entries)]


# --- pure: the log, the codec, the ranking source ---
def test_switches_push_and_rollbacks_pop_back_to_the_version_before():
    history = log(("v1", False), ("v2", False), ("v3", False))
    assert current_version(history) == "v3" and rollback_target(history) == "v2"
    history += [ModelSwitch(4, "v2", True, 0.0)]
    assert current_version(history) == "v2" and rollback_target(history) == "v1"
    history += [ModelSwitch(5, "v1", True, 0.0)]
    assert serving_stack(history) == ["v1"]
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback_target(history)
    assert current_version([]) is None


def test_vectors_round_trip_through_several_chunks(monkeypatch):
    monkeypatch.setattr(item_model, "CHUNK_BYTES", 64)  # 4 vectors of 4 floats a chunk
    ids = [f"item-{n}" for n in range(10)]
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    chunks = encode_chunks(ids, vectors)
    assert len(chunks) == 3
    model = decode_chunks("v1", chunks)
    assert model.ids == ids and np.array_equal(model.vectors, vectors) and model.dim == 4


def test_interactions_weigh_actions_and_leave_hides_out():
    data = interactions(
        [("u", "a", "click"), ("u", "a", "save"), ("u", "b", "hide"), ("v", "c", "view")],
        {"view": 1.0, "click": 2.0, "save": 5.0, "hide": 0.0},
    )
    assert data.items == ["a", "c"] and data.events == 4 and data.users == 2
    assert data.matrix.toarray().tolist() == [[7.0, 0.0], [0.0, 1.0]]


def _catalog() -> Catalog:
    return Catalog.from_records({"item_id": i, "topics": []} for i in ("a", "b", "c", "d"))


def test_the_model_source_ranks_the_items_nearest_to_the_recent_engagements():
    from actors.profile import ProfileView

    view = ProfileView(
        "me", 1, 1, {"click": 1}, 1.0, 1.0, 1.0, (), ((1.0, "a", "click"),), frozenset(), None
    )
    first = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    catalog = _catalog().with_model("v1", ["a", "b", "c", "d"], item_model.unit_rows(first))
    ranked = recommend(view, catalog, Signals(), {"model": 1.0}, k=2, max_per_topic=5)
    assert [r["item_id"] for r in ranked][:1] == ["b"]
    assert "learned item embeddings" in ranked[0]["reason"]
    # Another version places "c" next to "a": the same profile ranks it first.
    second = np.array([[1, 0], [0, 1], [0.95, 0.05], [0, 1]], dtype=np.float32)
    catalog = catalog.with_model("v2", ["a", "b", "c", "d"], item_model.unit_rows(second))
    ranked = recommend(view, catalog, Signals(), {"model": 1.0}, k=2, max_per_topic=5)
    assert ranked[0]["item_id"] == "c"


# --- the loop on real Ray, a real store and the HTTP API ---
def _served_model(api, user: str, want: str, timeout: float = 30.0) -> str | None:
    """The model version the API ranks with, once it is ``want`` (replicas poll)."""
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"/v1/users/{user}/recommendations?k=5").json()
        if body.get("model") == want or time.monotonic() > deadline:
            return body.get("model")
        time.sleep(0.3)


def test_publish_switch_and_rollback_reach_the_http_api_without_a_restart(api, tmp_path):
    from jobs import train_embeddings

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    items = [
        {"item_id": f"film-{n}", "topics": ["drama" if n < 10 else "comedy"]} for n in range(20)
    ]
    assert api.put("/v1/items", json={"items": items}, headers=auth).status_code == 200
    now = time.time()
    events = [
        {"user_id": f"fan-{u}", "item_id": f"film-{(u % 2) * 10 + n}", "action": "click",
         "ts": now - 3600 + u * 10 + n, "topics": []}
        for u in range(30) for n in range(6)
    ]  # fmt: skip
    reply = api.post("/v1/events", json=events, headers={**auth, "Idempotency-Key": "model-1"})
    assert reply.status_code == 200 and reply.json()["applied"] == len(events)
    settings = replace(api.settings, model_factors=4)
    assert _served_model(api, "fan-0", "none-yet", timeout=0) is None

    # The training job on the store's profiles: published and switched to.
    first = train_embeddings.run([], settings)
    assert first["serving"] == first["version"] and first["users"] == 30
    assert _served_model(api, "fan-0", first["version"]) == first["version"]

    # From an events file through Ray Data, published without a switch: nothing moves.
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(__import__("json").dumps(e) for e in events) + "\n")
    second = train_embeddings.run([str(path)], settings, switch=False)
    assert second["serving"] is None and second["events"] == len(events)
    from storage import open_store

    with open_store(settings=settings) as store:
        listed = {row["version"]: row["serving"] for row in item_model.list_models(store)}
        assert listed == {first["version"]: True, second["version"]: False}
        assert item_model.switch(store, second["version"]) == second["version"]
        assert _served_model(api, "fan-0", second["version"]) == second["version"]
        assert item_model.switch(store, rollback=True) == first["version"]
    assert _served_model(api, "fan-0", first["version"]) == first["version"]
