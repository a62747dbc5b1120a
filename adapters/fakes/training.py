"""A training engine that records the jobs it was given, and a sample encoder that measures without a
tokenizer: use-case tests of ``application.train`` run on these alone (no model, no ms-swift).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from domain.packing import check_sample_lengths
from ports.metrics import MetricSink, MetricValue
from ports.tokenizer import ChatSample, EncodedPrompt, EncodedSample, TokenizerPort
from ports.training import TrainingJob, TrainingOutcome


def _files_in(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else ()


@attrs.define
class RecordingTrainingEngine:
    """``calls`` holds ``(method, files in the run directory when it was called)`` in call order; each run
    logs ``losses`` as steps 1..n."""

    jobs: list[TrainingJob] = attrs.field(factory=list)
    losses: tuple[float, ...] = (1.0, 0.5)
    calls: list[tuple[str, tuple[str, ...]]] = attrs.field(factory=list)

    def run(self, job: TrainingJob, metric_sink: MetricSink) -> TrainingOutcome:
        self.calls.append(("run", _files_in(job.run_dir)))
        self.jobs.append(job)
        for step, loss in enumerate(self.losses, start=1):
            metric_sink.log({"global_step": step, "loss": loss})
        return TrainingOutcome(global_step=len(self.losses), step_losses=self.losses, last_checkpoint=None)


@attrs.define
class FakeSampleEncoder:
    """Measures a sample as ``base_length`` + one token per ``chars_per_token`` characters of its target text
    (``None``: every sample is ``base_length``); no tokenizer, no image. ``measured`` keeps every sample it
    was asked about. Encoding is not faked: the use case only measures."""

    base_length: int = 10
    chars_per_token: int | None = 8
    measured: list[ChatSample] = attrs.field(factory=list)

    @property
    def tokenizer(self) -> TokenizerPort:
        raise NotImplementedError("FakeSampleEncoder only measures")

    @property
    def terminator_ids(self) -> tuple[int, ...]:
        return ()

    def encode_sample(self, sample: ChatSample) -> EncodedSample:
        raise NotImplementedError("FakeSampleEncoder only measures")

    def encode_prompt(self, sample: ChatSample) -> EncodedPrompt:
        raise NotImplementedError("FakeSampleEncoder only measures")

    def teacher_forced(self, prompt: EncodedPrompt, assistant_ids: Sequence[int]) -> EncodedSample:
        raise NotImplementedError("FakeSampleEncoder only measures")

    def sample_length(self, sample: ChatSample) -> int:
        self.measured.append(sample)
        if self.chars_per_token is None:
            return self.base_length
        return self.base_length + len(sample.target or "") // self.chars_per_token

    def lengths(self, samples: Sequence[ChatSample]) -> list[int]:
        return [self.sample_length(s) for s in samples]

    def checked_lengths(self, samples: Sequence[ChatSample], max_length: int) -> list[int]:
        lengths = self.lengths(samples)
        check_sample_lengths(lengths, max_length, [str(s.origin) for s in samples])
        return lengths


@attrs.define
class RecordingMetricSink:
    """:class:`ports.metrics.MetricSink` in memory: ``events`` in order, ``closed`` once closed."""

    path: Path | None = None
    resume_step: int = 0
    events: list[dict[str, object]] = attrs.field(factory=list)
    closed: bool = False

    def log(self, event: Mapping[str, MetricValue]) -> None:
        if self.closed:
            raise ValueError("log() after close()")
        self.events.append(dict(event))

    def close(self) -> None:
        self.closed = True
