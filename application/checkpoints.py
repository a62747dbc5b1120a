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


def incomplete_checkpoint_problem(path: Path) -> str | None:
    """A ``checkpoint-<step>`` directory of a training run is only usable once its marker was written.

    Directories with other names (a merged export, an expanded base checkpoint) carry no marker and are
    accepted as they are.
    """
    path = Path(path)
    suffix = path.name.rsplit("-", 1)[-1]
    if path.name.startswith("checkpoint-") and suffix.isdigit() and not (path / COMPLETE_MARKER).is_file():
        return (
            f"'model.path' = {str(path)!r} is a training checkpoint without {COMPLETE_MARKER}: it was not "
            "completely written (interrupted save); use a complete checkpoint"
        )
    return None
