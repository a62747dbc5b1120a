"""Dotted config keys: their text form and order, the file that set one, and the entry points.

Shared by the loader (structural problems) and the validation rules (cross-field problems), so neither
imports the other for them.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

EntryPoint = Literal[
    "train", "infer", "evaluate", "visualize", "prepare_data", "expand_vocab", "merge_adapter",
    "stage2_server_launch",
]
ENTRY_POINTS: tuple[str, ...] = typing.get_args(EntryPoint)

PathPart = str | int
ConfigPath = tuple[PathPart, ...]


def format_path(parts: Sequence[PathPart]) -> str:
    """``("rollout", "vllm", "server", "servers", 0, "grp_port")`` -> ``rollout.vllm.server.servers[0].grp_port``."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text = f"{text}.{part}" if text else part
    return text


def path_sort_key(parts: Sequence[PathPart]) -> tuple[tuple[bool, PathPart], ...]:
    """Sort dotted paths component-wise, list indices numerically."""
    return tuple((isinstance(p, int), p) for p in parts)


def is_under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` itself or a key / list item inside it."""
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def source_of(sources: Mapping[str, Path], path: str) -> Path | None:
    """The file that set ``path``: the leaf itself, else its nearest ancestor, else a descendant."""
    if path in sources:
        return sources[path]
    best: tuple[int, Path] | None = None
    for key, file in sources.items():
        if is_under(path, key) and (best is None or len(key) > best[0]):
            best = (len(key), file)
    if best is not None:
        return best[1]
    for key in sorted(sources):
        if is_under(key, path):
            return sources[key]
    return None
