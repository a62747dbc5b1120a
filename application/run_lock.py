"""Which directory an entry point locks (issue 11 item 2): ``run.output_dir / run.name`` when the config
names a run, else the output directory it writes. The lock itself is the storage adapter's (wiring).

:func:`hold_run_directory` is a helper of the entry points' ``main`` functions (the one place that asks
the composition root for adapters); use cases never take the lock themselves."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from application.config import CoordExpConfig


def run_directory(config: CoordExpConfig) -> Path | None:
    run = config.run
    if run is None or run.name is None or run.output_dir is None:
        return None
    return Path(run.output_dir) / str(run.name)


def lock_target(config: CoordExpConfig, *, fallback: Path | None = None) -> Path:
    """The absolute directory to lock: this run's directory, else ``fallback`` (raises ValueError without both)."""
    target = run_directory(config)
    if target is None:
        target = fallback
    if target is None:
        raise ValueError("hold_run_directory needs run.output_dir and run.name, or a fallback directory")
    return target.absolute()


def hold_run_directory(
    config: CoordExpConfig, entry_point: str, *, fallback: Path | None = None
) -> AbstractContextManager[None]:
    """The exclusive lock of this run's directory for a ``with`` block (``fallback`` without ``run.*``)."""
    from application import wiring

    target = lock_target(config, fallback=fallback)
    return wiring.make_run_lock().hold(target, entry_point)
