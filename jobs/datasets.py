"""Data sets for offline evaluation: MovieLens-100k (fetched once, cached) and event files.

MovieLens-100k ships inside the ``recbole==1.2.1`` wheel on PyPI, so it is fetched
with pip (which also serves it from pip's own cache) and only its two files are
kept, under ``<data_dir>/datasets/ml-100k``. Ratings become events the way a
product would log them: 5 -> save, 4 -> click, 3 -> view, 1-2 -> hide, at the
rating's own timestamp, and genres become topics (of the catalog item and of its
events).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from persona.errors import ConfigError

MOVIELENS_100K = "movielens-100k"
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}
RATING_ACTIONS = {5: "save", 4: "click", 3: "view", 2: "hide", 1: "hide"}
# A held-out rating of 4 or 5 is a hit; a 3 ("watched, fine") is not a recommendation
# the user was glad of, and 1-2 are hides.
MOVIELENS_RELEVANT = frozenset({"click", "save"})
# For event files: any held-out engagement counts (everything but a hide).
NOT_RELEVANT = frozenset({"hide"})


@dataclass(frozen=True)
class Dataset:
    """Events ``{user_id, item_id, action, ts, topics}`` in time order, the catalog
    ``{item_id, topics, created_at}``, and which held-out actions count as a hit."""

    name: str
    events: list[dict]
    items: list[dict]
    relevant_actions: frozenset[str] | None = None  # None: every action but a hide

    def is_relevant(self, action: str) -> bool:
        if self.relevant_actions is None:
            return action not in NOT_RELEVANT
        return action in self.relevant_actions


def load(source: str, data_dir: str | Path, items_file: Path | None = None) -> Dataset:
    """``movielens-100k`` or an events JSONL file (with ``items.jsonl`` beside it,
    or ``items_file``)."""
    if source == MOVIELENS_100K:
        return read_movielens(fetch_movielens_100k(Path(data_dir) / "datasets" / "ml-100k"))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"no such events file: {source} (or name a data set: {MOVIELENS_100K})")
    items_file = items_file or path.parent / "items.jsonl"
    return read_event_files(path, items_file if items_file.is_file() else None)


def read_event_files(events_file: Path, items_file: Path | None) -> Dataset:
    events = [json.loads(line) for line in events_file.open() if line.strip()]
    events.sort(key=lambda e: e["ts"])
    items = [json.loads(line) for line in items_file.open() if line.strip()] if items_file else []
    return Dataset(events_file.name, events, items)


def fetch_movielens_100k(directory: Path) -> Path:
    """The directory holding ``ml-100k.inter`` and ``ml-100k.item``, fetched from the
    recbole wheel on first use (``pip download``, checked against its SHA-256)."""
    if all((directory / name).is_file() for name in MEMBERS):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persona-recbole-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        done = subprocess.run([*command, RECBOLE_WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ConfigError(
                f"could not fetch {RECBOLE_WHEEL} with pip (it carries MovieLens-100k): "
                f"{done.stderr.strip()[-500:]}"
            )
        extract_movielens(wheels[0], directory)
    return directory


def extract_movielens(wheel: Path, directory: Path, sha256: str = RECBOLE_SHA256) -> None:
    """Check the wheel's digest, then copy the two MovieLens files out of it."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise ConfigError(f"{wheel.name} has SHA-256 {digest}, expected {sha256}")
    with zipfile.ZipFile(wheel) as archive:
        for name, member in MEMBERS.items():
            partial = directory / f".{name}.partial"
            partial.write_bytes(archive.read(member))
            partial.replace(directory / name)  # whole files only, even if interrupted


def read_movielens(directory: Path) -> Dataset:
    """MovieLens-100k in RecBole's atomic format: tab-separated, one header line."""
    items, genres = [], {}
    for row in _rows(directory / "ml-100k.item"):
        item_id, topics = row[0], tuple(row[3].split()) if len(row) > 3 else ()
        genres[item_id] = list(topics)
        items.append({"item_id": item_id, "topics": list(topics), "created_at": 0.0})
    events = []
    for user, item, rating, ts in _rows(directory / "ml-100k.inter"):
        events.append(
            {
                "user_id": user,
                "item_id": item,
                "action": RATING_ACTIONS[round(float(rating))],
                "ts": float(ts),
                "topics": genres.get(item, []),
            }
        )
    events.sort(key=lambda e: (e["ts"], e["user_id"], e["item_id"]))
    return Dataset(MOVIELENS_100K, events, items, MOVIELENS_RELEVANT)


def _rows(path: Path) -> Iterable[list[str]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        next(f, None)  # the header: name:type per column
        for line in f:
            line = line.rstrip("\n")
            if line:
                yield line.split("\t")
