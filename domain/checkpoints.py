"""Which training checkpoints count (infer-eval-config.md §7.3): the completion marker and its check.

A ``checkpoint-<step>`` directory counts once ``checkpoint_complete.json`` was written into it, last and
atomically. The marker lists every file of the directory with its size and SHA-256, so a directory whose
files were truncated or changed after the marker (a full disk, a copy cut short) is recognised as damaged
before a model is loaded from it (issue 11 item 5). This module owns the rule; the storage adapter
reads and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint-"
MARKER_SCHEMA_VERSION = 1


def checkpoint_step(name: str) -> int | None:
    """``checkpoint-12`` -> 12; None for any other directory name."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def oldest_first(names: Sequence[str]) -> list[str]:
    """The ``checkpoint-<step>`` names of ``names``, ordered by step (other names dropped)."""
    steps = {name: checkpoint_step(name) for name in names}
    return sorted((n for n, s in steps.items() if s is not None), key=lambda n: steps[n] or 0)


@attrs.frozen
class CheckpointFile:
    """One file of a checkpoint directory: path relative to it (``/``-separated), size, SHA-256 hex."""

    name: str
    bytes: int
    sha256: str


def completion_marker(
    *, global_step: int, epoch: float, written_at: str, files: Sequence[CheckpointFile]
) -> dict[str, Any]:
    """The marker document; ``files`` excludes the marker itself and is stored sorted by name."""
    listed = sorted((f for f in files if f.name != COMPLETE_MARKER), key=lambda f: f.name)
    return {
        "schema_version": MARKER_SCHEMA_VERSION,
        "global_step": int(global_step),
        "epoch": float(epoch),
        "written_at": written_at,
        "files": [{"name": f.name, "bytes": int(f.bytes), "sha256": f.sha256} for f in listed],
    }


def marker_problems(
    marker: Any, sizes: Mapping[str, int], sha256_of: Callable[[str], str]
) -> list[str]:
    """What contradicts ``marker`` in a directory whose files have ``sizes`` (relative name -> bytes).

    Sizes are compared first; ``sha256_of(name)`` is called only for files whose size matches and whose
    entry records a hash (markers written before hashes were recorded are checked by size). Files the
    marker does not list are allowed (a later tool may add a file beside the checkpoint).
    """
    if not isinstance(marker, Mapping) or not isinstance(marker.get("files"), list):
        return [f"{COMPLETE_MARKER} is not a marker document (no 'files' list)"]
    problems: list[str] = []
    for entry in marker["files"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            problems.append(f"{COMPLETE_MARKER} has a malformed file entry {entry!r}")
            continue
        name, expected = entry["name"], entry.get("bytes")
        if name not in sizes:
            problems.append(f"{name}: missing (the marker lists {expected} bytes)")
        elif expected != sizes[name]:
            problems.append(f"{name}: {sizes[name]} bytes, the marker says {expected} (truncated or changed)")
        elif isinstance(entry.get("sha256"), str) and sha256_of(name) != entry["sha256"]:
            problems.append(f"{name}: content differs from the SHA-256 the marker records (changed after saving)")
    return problems
