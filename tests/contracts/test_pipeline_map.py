"""docs/pipeline-map.md stays true (infer-eval-config.md §8, acceptance test 54)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import attrs
import pytest

from application.config.schema import CoordExpConfig

REPO = Path(__file__).resolve().parents[2]
MAP = REPO / "docs" / "pipeline-map.md"
BLOCKS = ("run", "model", "data", "prompt", "training", "objective", "stage2_ab", "matching", "rollout",
          "stages", "infer", "eval", "vis")


def _attrs_class(tp: object) -> type | None:
    """The attrs class inside an annotation like ``X | None`` or ``tuple[X, ...]``, else None."""
    if isinstance(tp, type) and attrs.has(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _attrs_class(arg)
        if found is not None:
            return found
    return None


def key_exists(dotted: str) -> bool:
    cls: type | None = CoordExpConfig
    for part in dotted.split("."):
        if cls is None:
            return False
        fields = {f.name.rstrip("_"): f for f in attrs.fields(cls)}
        if part not in fields:
            return False
        hints = typing.get_type_hints(cls)
        cls = _attrs_class(hints[fields[part].name])
    return True


def _backticked() -> list[str]:
    return re.findall(r"`([^`]+)`", MAP.read_text())


def test_every_named_module_exists() -> None:
    modules = [t for t in _backticked() if t.endswith(".py")]
    assert modules, "the map names no module"
    missing = [m for m in modules if not (REPO / m).is_file()]
    assert missing == []


def test_every_named_key_is_in_the_schema() -> None:
    keys = [t for t in _backticked() if re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", t) and not t.endswith(".py")
            and t.split(".")[0] in BLOCKS]
    assert len(keys) > 40
    stale = [k for k in keys if not key_exists(k)]
    assert stale == []


def test_every_entry_point_is_on_the_map() -> None:
    """A new ``python -m application.X`` entry point must be placed on the map."""
    named = set(_backticked())
    entry_points = sorted(
        f"application/{p.name}" for p in (REPO / "application").glob("*.py")
        if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.M)
    )
    assert entry_points, "no entry point found"
    assert [e for e in entry_points if e not in named] == []


def test_every_top_level_block_appears() -> None:
    named = set(_backticked())
    assert [b for b in BLOCKS if b not in named] == []


@pytest.mark.parametrize("bad", ["training.packing_length", "data.nope", "infer.generation.max_new_token"])
def test_key_checker_rejects_unknown_keys(bad: str) -> None:
    assert not key_exists(bad)
