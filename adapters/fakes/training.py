"""A training engine that records the job it was given, for use-case tests without a model."""

from __future__ import annotations

import attrs

from ports.training import TrainingJob, TrainingOutcome


@attrs.define
class RecordingTrainingEngine:
    jobs: list[TrainingJob] = attrs.field(factory=list)
    losses: tuple[float, ...] = (1.0, 0.5)

    def run(self, job: TrainingJob) -> TrainingOutcome:
        self.jobs.append(job)
        for step, loss in enumerate(self.losses, start=1):
            job.metric_sink.log({"global_step": step, "loss": loss})
        return TrainingOutcome(global_step=len(self.losses), step_losses=self.losses, last_checkpoint=None)
