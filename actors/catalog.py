"""The item catalog record: what an item is (topics, embedding, creation time) and its codec."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actors.events import MAX_TOPIC_CHARS, MAX_TOPICS, check_id
from storage import codec

MAX_EMBEDDING_DIM = 1024


def item_problem(item: Any) -> str | None:
    """Why an item is invalid, or None."""
    if not isinstance(item, dict):
        return "an item must be an object"
    unknown = sorted(set(item) - {"item_id", "topics", "embedding", "created_at"})
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}"
    problem = check_id(item.get("item_id"), "item_id")
    if problem:
        return problem
    topics = item.get("topics", [])
    if not isinstance(topics, list) or len(topics) > MAX_TOPICS:
        return f"topics must be a list of at most {MAX_TOPICS} strings"
    if any(not isinstance(t, str) or not 1 <= len(t) <= MAX_TOPIC_CHARS for t in topics):
        return f"each topic must be 1-{MAX_TOPIC_CHARS} characters"
    embedding = item.get("embedding")
    if embedding is not None:
        if not isinstance(embedding, list) or not 1 <= len(embedding) <= MAX_EMBEDDING_DIM:
            return f"embedding must be a list of 1-{MAX_EMBEDDING_DIM} numbers"
        if any(
            isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x)
            for x in embedding
        ):
            return "embedding values must be finite numbers"
    created = item.get("created_at", 0.0)
    if (
        isinstance(created, bool)
        or not isinstance(created, int | float)
        or not math.isfinite(created)
    ):
        return "created_at must be a finite number of seconds since the epoch"
    return None


def encode_item(item: dict) -> bytes:
    return codec.encode(
        {
            "topics": list(item.get("topics", [])),
            "embedding": item.get("embedding"),
            "created_at": float(item.get("created_at", 0.0)),
        }
    )


def decode_item(item_id: str, blob: bytes) -> dict:
    record = codec.decode(blob, what=f"item {item_id}")
    return {"item_id": item_id, **record}


def item_vector(record: dict) -> np.ndarray | None:
    embedding = record.get("embedding")
    if not embedding:
        return None
    vector = np.asarray(embedding, dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else None
