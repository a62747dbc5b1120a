"""Which checkpoints count (infer-eval-config.md §7.3): only directories whose completion marker was written
last, and whose files still match it (sizes and SHA-256; issue 11 item 5). The rule is
:mod:`domain.checkpoints`; the files are read by the checkpoint store the caller passes (wiring makes it)."""

from __future__ import annotations

import warnings
from pathlib import Path

from domain.checkpoints import COMPLETE_MARKER, checkpoint_step
from domain.errors import ConfigError
from ports.storage import CheckpointStore

__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_problem",
    "complete_checkpoints",
    "incomplete_checkpoint_problem",
    "latest_usable_checkpoint",
]


def complete_checkpoints(run_dir: Path, store: CheckpointStore) -> list[Path]:
    """``checkpoint-<step>`` directories of ``run_dir`` carrying ``checkpoint_complete.json``, oldest first."""
    return store.complete_checkpoints(Path(run_dir))


def _summary(problems: list[str]) -> str:
    shown = "; ".join(problems[:3])
    return shown + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def latest_usable_checkpoint(run_dir: Path, key: str, store: CheckpointStore) -> Path | None:
    """The newest complete checkpoint whose files match its marker (None when none is complete); a damaged
    newer one is skipped with a warning naming what is wrong. Only damaged ones raise a ConfigError on ``key``."""
    complete = store.complete_checkpoints(Path(run_dir))
    if not complete:
        return None
    damaged: list[str] = []
    for path in reversed(complete):
        problems = store.problems(path)
        if not problems:
            if damaged:
                warnings.warn(
                    f"'{key}: latest': skipped {'; '.join(damaged)}; using {path}", RuntimeWarning, stacklevel=2
                )
            return path
        damaged.append(f"{path} ({_summary(problems)})")
    raise ConfigError(f"'{key}: latest' but every complete checkpoint of {run_dir} is damaged: {'; '.join(damaged)}")


def checkpoint_problem(path: Path, key: str, store: CheckpointStore) -> str | None:
    """Why the checkpoint ``path`` named by ``key`` must not be used, or None.

    A directory with a marker must match it. A ``checkpoint-<step>`` directory without one was not completely
    written. Directories with other names and no marker (a merged export, an expanded base checkpoint) are
    accepted as they are. The message names the newest usable earlier checkpoint, if there is one.
    """
    path = Path(path)
    has_marker = (path / COMPLETE_MARKER).is_file()
    step = checkpoint_step(path.name)
    if not has_marker and step is None:
        return None
    if not has_marker:
        reason = f"a training checkpoint without {COMPLETE_MARKER}: it was not completely written (interrupted save)"
    else:
        problems = store.problems(path)
        if not problems:
            return None
        reason = f"damaged: {_summary(problems)}"
    earlier = [
        p for p in store.complete_checkpoints(path.parent)
        if step is not None and (checkpoint_step(p.name) or 0) < step and not store.problems(p)
    ]  # fmt: skip
    hint = f"use the previous complete checkpoint {earlier[-1]}" if earlier else "use a complete checkpoint"
    return f"'{key}' = {str(path)!r} is {reason}; {hint}"


def incomplete_checkpoint_problem(path: Path, store: CheckpointStore) -> str | None:
    """``model.path``: :func:`checkpoint_problem` under that key."""
    return checkpoint_problem(path, "model.path", store)
