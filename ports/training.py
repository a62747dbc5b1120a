"""The training engine port (D12): the use case hands over validated records and settings; the adapter trains.

Shaped for every trainer variant: Stage-1 (teacher forcing), and later Stage-2 AB / rollout_matching_sft,
whose engines additionally receive a generation backend (:mod:`ports.generation`) for rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from domain.records import Record
from ports.metrics import MetricSink


@attrs.frozen
class TrainingJob:
    """Everything an engine needs, already validated (config errors and data errors raised before this).

    ``config`` is the resolved root config object (its ``model``, ``data``, ``prompt``, ``training``,
    ``objective`` blocks drive the engine). ``train_images`` / ``val_images`` are the resolved image
    files of the records, in record order (already checked against the records, data.md §3.3).
    """

    config: Any
    run_dir: Path
    model_path: Path
    train_records: Sequence[Record]
    train_images: Sequence[Path]
    val_records: Sequence[Record] | None
    val_images: Sequence[Path] | None
    resolved_config_path: Path
    metric_sink: MetricSink
    resume_from: Path | None = None


@attrs.frozen
class TrainingOutcome:
    global_step: int
    step_losses: tuple[float, ...]
    last_checkpoint: Path | None
    eval_metrics: dict[str, float] | None = None


class TrainingEngine(Protocol):
    def run(self, job: TrainingJob) -> TrainingOutcome: ...
