"""A training engine that records the jobs it was given, for use-case tests without a model.

Its :meth:`RecordingTrainingEngine.prepare` applies the real engine's pre-step rules (the over-length
check and the static pack plan of ``domain.packing``) to a fixed length per sample, so the use case's
"fail before any run file" rule can be tested without a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from domain.errors import InvariantViolation
from domain.packing import PackingSettings, check_sample_lengths, plan_packs
from ports.metrics import MetricSink
from ports.training import PreparedTraining, TrainingJob, TrainingOutcome, UnitPlan


def _files_in(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else ()


@attrs.define
class RecordingTrainingEngine:
    """``calls`` holds ``(method, files in the run directory when it was called)`` in call order."""

    jobs: list[TrainingJob] = attrs.field(factory=list)
    losses: tuple[float, ...] = (1.0, 0.5)
    sample_length: int = 10
    calls: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list)
    prepared: list[PreparedTraining] = attrs.field(factory=list)

    def _unit_plan(self, job: TrainingJob, records_count: int, sources: list[str], *, packing: bool,
                   drop_last: bool) -> UnitPlan:
        training = job.config.training
        lengths = (self.sample_length,) * records_count
        check_sample_lengths(lengths, int(training.max_length), sources)
        if not packing:
            return UnitPlan(None, lengths)
        settings = PackingSettings(
            max_length=int(training.max_length),
            packing_buffer=int(training.packing_buffer),
            packing_min_fill_ratio=float(training.packing_min_fill_ratio),
            packing_drop_last=drop_last,
        )
        plan = plan_packs(lengths, settings, seed=int(job.config.run.seed), locations=sources)
        return UnitPlan(tuple(p.members for p in plan.packs), lengths, plan)

    def prepare(self, job: TrainingJob) -> PreparedTraining:
        self.calls.append(("prepare", _files_in(job.run_dir)))
        training = job.config.training
        train = self._unit_plan(
            job, len(job.train_records), [f"{r.source}:{r.line}" for r in job.train_records],
            packing=bool(training.packing), drop_last=bool(training.packing_drop_last),
        )
        val = None
        if job.val_records:
            val = self._unit_plan(
                job, len(job.val_records), [f"{r.source}:{r.line}" for r in job.val_records],
                packing=bool(training.eval_packing), drop_last=False,
            )
        prepared = PreparedTraining(train=train, val=val)
        self.prepared.append(prepared)
        return prepared

    def run(self, job: TrainingJob, prepared: PreparedTraining, metric_sink: MetricSink) -> TrainingOutcome:
        self.calls.append(("run", _files_in(job.run_dir)))
        if not self.prepared or prepared is not self.prepared[-1]:
            raise InvariantViolation("run() was given a PreparedTraining that this engine's prepare() did not make")
        self.jobs.append(job)
        for step, loss in enumerate(self.losses, start=1):
            metric_sink.log({"global_step": step, "loss": loss})
        return TrainingOutcome(global_step=len(self.losses), step_losses=self.losses, last_checkpoint=None)
