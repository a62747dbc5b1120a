"""The training engine port (D12): the use case hands over validated records and settings; the adapter trains.

Shaped for every trainer variant: Stage-1 (teacher forcing), and later Stage-2 AB / rollout_matching_sft,
whose engines additionally receive a generation backend (:mod:`ports.generation`) for rollouts.

Two calls, in this order (issue 11 item 3): :meth:`TrainingEngine.prepare` runs every check that can fail
before step 1 and needs the engine (sample lengths, the over-long error, the pack plan) without loading a
model and without writing anything; the use case then writes its run files and calls
:meth:`TrainingEngine.run` with what ``prepare`` returned, which is never computed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from domain.packing import PackPlan, PlanFingerprint
from domain.records import Record
from ports.metrics import MetricSink


@attrs.frozen
class TrainingJob:
    """Everything an engine needs, already validated (config errors and data errors raised before this).

    ``config`` is the resolved root config object (its ``model``, ``data``, ``prompt``, ``training``,
    ``objective`` blocks drive the engine). ``train_images`` / ``val_images`` are the resolved image
    files of the records, in record order (already checked against the records, data.md §3.3).
    ``resolved_config_path`` names where the use case writes ``resolved_config.json`` (after ``prepare``).
    """

    config: Any
    run_dir: Path
    model_path: Path
    train_records: Sequence[Record]
    train_images: Sequence[Path]
    val_records: Sequence[Record] | None
    val_images: Sequence[Path] | None
    resolved_config_path: Path
    resume_from: Path | None = None


@attrs.frozen
class UnitPlan:
    """What one split trains on: single samples (``units`` None) or the packs of a static plan (data.md §8.2).

    ``lengths`` are the data.md §6.5 sample lengths in record order; ``plan`` / ``fingerprint`` the static
    plan and what it depends on (``reused_cache``: it came from a matching plan cache).
    """

    units: tuple[tuple[int, ...], ...] | None
    lengths: tuple[int, ...]
    plan: PackPlan | None = None
    reused_cache: bool = False
    fingerprint: PlanFingerprint | None = None


@attrs.frozen
class PreparedTraining:
    """What :meth:`TrainingEngine.prepare` computed for a job: the unit plans of the splits (``val`` None
    when the job has no validation records)."""

    train: UnitPlan
    val: UnitPlan | None = None


@attrs.frozen
class TrainingOutcome:
    global_step: int
    step_losses: tuple[float, ...]
    last_checkpoint: Path | None
    eval_metrics: dict[str, float] | None = None


class TrainingEngine(Protocol):
    def prepare(self, job: TrainingJob) -> PreparedTraining:
        """Every engine check that can fail before step 1 (lengths, over-long samples, an empty pack plan),
        raised as located errors; loads no model and writes nothing."""
        ...

    def run(self, job: TrainingJob, prepared: PreparedTraining, metric_sink: MetricSink) -> TrainingOutcome:
        """Train ``job`` on the plans of ``prepared`` (from :meth:`prepare` of the same job), logging to
        ``metric_sink``."""
        ...
