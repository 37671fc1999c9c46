"""Model versions: item embeddings a training job published, their codec, and the log
that says which version serves. No Ray; the functions at the end take a Store.

A version is immutable once published (replicas may be serving it). Which version
serves is not a field that is overwritten but a log of switches: ``switch`` pushes a
version, ``rollback`` pops back to the one before, so the history stays readable and
two operators acting at once are ordered by the store (one log position each).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from persona.errors import ConfigError, CorruptRecord, VersionConflict
from storage import Store, codec
from storage.base import ModelSwitch

# Vectors per stored chunk: ~512 KiB of float32 whatever the dimension, so no single
# store write grows with the catalog (as with the item signals).
CHUNK_BYTES = 512 * 1024


@dataclass(frozen=True)
class ItemEmbeddings:
    """One published version: an item id per row of unit-length float32 vectors."""

    version: str
    ids: list[str]
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0


def new_version(now: float | None = None) -> str:
    """A sortable, unique version name: ``v20261203-064512-3f2a``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"v{stamp}-{uuid.uuid4().hex[:4]}"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero): similarity is then a dot product."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def encode_chunks(ids: Sequence[str], vectors: np.ndarray) -> list[bytes]:
    """The vectors in size-bounded chunks: ``{"ids": [...], "dim": d, "v": float32 bytes}``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    per_chunk = max(1, CHUNK_BYTES // max(4 * dim, 1))
    return [
        codec.encode(
            {
                "ids": list(ids[at : at + per_chunk]),
                "dim": dim,
                "v": vectors[at : at + per_chunk].tobytes(),
            }
        )
        for at in range(0, len(ids), per_chunk)
    ]


def decode_chunks(version: str, chunks: Iterable[bytes]) -> ItemEmbeddings:
    ids: list[str] = []
    parts: list[np.ndarray] = []
    dim = 0
    for n, blob in enumerate(chunks):
        record = codec.decode(blob, what=f"model {version} chunk {n}")
        dim = int(record["dim"])
        block = np.frombuffer(record["v"], dtype=np.float32).reshape(-1, dim)
        if len(block) != len(record["ids"]):
            raise CorruptRecord(f"model {version} chunk {n}: ids and vectors disagree")
        ids += record["ids"]
        parts.append(block)
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
    return ItemEmbeddings(version, ids, vectors)


def encode_info(info: dict) -> bytes:
    return codec.encode(info)


def decode_info(version: str, blob: bytes) -> dict:
    return codec.decode(blob, what=f"model {version} info")


def serving_stack(switches: Iterable[ModelSwitch]) -> list[str]:
    """The versions switched to and not rolled back from, oldest first: the last one
    serves, the one before it is where a rollback goes."""
    stack: list[str] = []
    for entry in sorted(switches, key=lambda s: s.seq):
        if entry.rollback:
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry.version:
                stack.append(entry.version)  # a log written by hand: trust its row
        else:
            stack.append(entry.version)
    return stack


def current_version(switches: Iterable[ModelSwitch]) -> str | None:
    stack = serving_stack(switches)
    return stack[-1] if stack else None


def rollback_target(switches: Iterable[ModelSwitch]) -> str:
    """The version a rollback returns to; ConfigError when there is none."""
    stack = serving_stack(switches)
    if len(stack) < 2:
        raise ConfigError(
            "nothing to roll back to: "
            + (f"only {stack[-1]} was ever switched to" if stack else "no model serves yet")
        )
    return stack[-2]


def next_position(switches: Sequence[ModelSwitch]) -> int:
    return max((s.seq for s in switches), default=0) + 1


# --- against a store ---
def publish(store: Store, ids: Sequence[str], vectors: np.ndarray, info: dict) -> str:
    """Store a new version (unit rows) and return its name; nothing switches yet."""
    version = new_version()
    vectors = unit_rows(vectors)
    info = {**info, "items": len(ids), "dim": int(vectors.shape[1]), "published_at": time.time()}
    store.put_model(version, encode_info(info), encode_chunks(list(ids), vectors))
    return version


def switch(store: Store, version: str | None = None, *, rollback: bool = False) -> str:
    """Make ``version`` serve (it must be published), or with ``rollback`` return to
    the version before the current one. Replicas pick the change up on their next
    refresh. Returns the version now serving."""
    for _ in range(5):  # another switch may take the position we read as next
        switches = store.get_model_switches()
        target = rollback_target(switches) if rollback else version
        if target is None or target not in store.get_models():
            raise ConfigError(f"no model version {target!r} is published (`persona model list`)")
        try:
            store.append_model_switch(next_position(switches), target, rollback)
            return target
        except VersionConflict:
            continue
    raise VersionConflict("the model log kept moving under five switches in a row; try again")


def list_models(store: Store) -> list[dict]:
    """Every published version with its info, newest first, marking the one serving."""
    serving = current_version(store.get_model_switches())
    rows = [
        {"version": version, "serving": version == serving, **decode_info(version, blob)}
        for version, blob in store.get_models().items()
    ]
    return sorted(rows, key=lambda row: row["version"], reverse=True)


def load_current(store: Store, loaded: str | None = None) -> ItemEmbeddings | None:
    """The serving version's embeddings, or None when none serves or it is ``loaded``
    already (a poll costs one read of the small model log)."""
    version = current_version(store.get_model_switches())
    if version is None or version == loaded:
        return None
    return decode_chunks(version, store.get_model_chunks(version))
