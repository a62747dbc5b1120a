"""Which checkpoints count: only directories whose completion marker was written last (infer-eval-config.md §7.3)."""

from __future__ import annotations

from pathlib import Path

COMPLETE_MARKER = "checkpoint_complete.json"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories of ``run_dir`` carrying ``checkpoint_complete.json``, oldest first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and suffix.isdigit() and (path / COMPLETE_MARKER).is_file():
            found.append(path)
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]))
