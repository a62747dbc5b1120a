"""Helpers for the config tests: write YAML files into a temporary directory."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

WriteConfig = Callable[[str, str], Path]


@pytest.fixture()
def write(tmp_path: Path) -> WriteConfig:
    """``write("sub/a.yaml", yaml_text)`` -> the written file's path (text is dedented)."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return _write
