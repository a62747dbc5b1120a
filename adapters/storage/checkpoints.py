"""Checkpoint directories on disk: list the complete ones, write and check the completion marker whose
rule :mod:`domain.checkpoints` owns (infer-eval-config.md §7.3; issue 11 item 5)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from adapters.storage.atomic import write_text_atomically
from domain.checkpoints import (
    COMPLETE_MARKER,
    CheckpointFile,
    completion_marker,
    marker_problems,
    oldest_first,
)

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_files(folder: Path) -> dict[str, Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def checkpoint_files(folder: Path) -> list[CheckpointFile]:
    """Every file under ``folder`` (the marker excepted) with its size and SHA-256."""
    return [
        CheckpointFile(name, path.stat().st_size, file_sha256(path)) for name, path in _relative_files(folder).items()
    ]


def write_completion_marker(folder: Path, *, global_step: int, epoch: float) -> None:
    """Write ``checkpoint_complete.json`` last, atomically, listing every file already in ``folder``."""
    marker = completion_marker(
        global_step=global_step,
        epoch=epoch,
        written_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        files=checkpoint_files(Path(folder)),
    )
    write_text_atomically(Path(folder) / COMPLETE_MARKER, json.dumps(marker, indent=2) + "\n")


class FileCheckpointStore:
    """:class:`ports.storage.CheckpointStore` on the local file system."""

    def complete_checkpoints(self, run_dir: Path) -> list[Path]:
        return complete_checkpoints(run_dir)

    def problems(self, folder: Path) -> list[str]:
        return checkpoint_problems(folder)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories of ``run_dir`` that carry the marker, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = [p.name for p in run_dir.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [run_dir / name for name in oldest_first(names)]


def checkpoint_problems(folder: Path) -> list[str]:
    """Why ``folder`` is not the complete checkpoint its marker describes (empty list: it is)."""
    folder = Path(folder)
    marker_path = folder / COMPLETE_MARKER
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {COMPLETE_MARKER} (the save did not finish)"]
    except (OSError, ValueError) as exc:
        return [f"{COMPLETE_MARKER} is unreadable: {exc}"]
    files = _relative_files(folder)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    return marker_problems(marker, sizes, lambda name: file_sha256(files[name]))
