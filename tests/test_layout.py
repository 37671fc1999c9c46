"""The code's rooms: imports point one way (serving -> actors -> storage, jobs on top),
the product never imports bench/ or tests/, and pure logic has no Ray in it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from persona.settings import PROJECT_ROOT

# What each tier may import from the project (persona/ is shared by all).
ALLOWED = {
    "persona": {"persona"},
    "storage": {"persona", "storage"},
    "actors": {"persona", "storage", "actors"},
    "serving": {"persona", "storage", "actors", "serving"},
    "jobs": {"persona", "storage", "actors", "serving", "jobs"},
}
PROJECT = {*ALLOWED, "bench", "tests"}
# Pure logic: tested without a cluster, so it must not need one.
PURE = [
    "actors/profile.py",
    "actors/profile_table.py",
    "actors/routing.py",
    "actors/events.py",
    "actors/dedup.py",
    "actors/item_stats.py",
    "actors/shard_state.py",
    "actors/attribution.py",
    "serving/ranking.py",
    "serving/views.py",
    "serving/experiments.py",
    "serving/stats.py",
    "storage/codec.py",
]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("tier", sorted(ALLOWED))
def test_imports_point_one_way(tier):
    wrong = {
        str(path.relative_to(PROJECT_ROOT)): sorted(
            (imported_packages(path) & PROJECT) - ALLOWED[tier]
        )
        for path in (PROJECT_ROOT / tier).rglob("*.py")
    }
    assert {path: bad for path, bad in wrong.items() if bad} == {}


@pytest.mark.parametrize("module", PURE)
def test_pure_logic_has_no_ray(module):
    assert "ray" not in imported_packages(PROJECT_ROOT / module)


def test_every_test_the_readme_names_exists():
    """The README's "What happens when..." table proves each guarantee by naming a test:
    a renamed or deleted test must not leave the README pointing at nothing."""
    import re

    readme = (PROJECT_ROOT / "README.md").read_text()
    sources = {p.stem: p.read_text() for p in (PROJECT_ROOT / "tests").glob("test_*.py")}
    functions = {name for text in sources.values() for name in re.findall(r"def (test_\w+)", text)}
    named = set(re.findall(r"\b(test_\w+)", readme))
    assert named, "the README names its tests"
    assert named - functions - set(sources) == set()
