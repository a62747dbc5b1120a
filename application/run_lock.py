"""Which directory an entry point locks (issue 11 item 2): ``run.output_dir / run.name`` when the config
names a run, else the output directory it writes. The lock itself is the storage adapter's (wiring)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from application import wiring
from application.config import CoordExpConfig


def run_directory(config: CoordExpConfig) -> Path | None:
    run = config.run
    if run is None or run.name is None or run.output_dir is None:
        return None
    return Path(run.output_dir) / str(run.name)


def hold_run_directory(
    config: CoordExpConfig, entry_point: str, *, fallback: Path | None = None
) -> AbstractContextManager[None]:
    """The exclusive lock of this run's directory for a ``with`` block (``fallback`` without ``run.*``)."""
    target = run_directory(config)
    if target is None:
        target = fallback
    if target is None:
        raise ValueError("hold_run_directory needs run.output_dir and run.name, or a fallback directory")
    return wiring.make_run_lock().hold(target.absolute(), entry_point)
