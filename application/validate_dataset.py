"""Dataset validation use case (data.md §9.9).

    python -m application.validate_dataset --config FILE

Runs the loader's checks of data.md §1 (record contract) and §3 (image files and sizes) on
``data.train_jsonl`` and ``data.val_jsonl``, computes every record's sample token length (data.md §6.5)
with the configured model's processor exactly as the training pre-pass does (``model.path``, or the
embedded tiny model: ``model.tiny``, or its defaults when there is no ``model`` block) and reports each
record longer than ``training.max_length`` by file and line. It reports EVERY problem (not only the
first 20) plus statistics: records, objects per image, bbox / poly counts, length percentiles. Exit
status 1 when any problem was found.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from application.dataset_images import (
    DEFAULT_CHECK_WORKERS,
    ImageVerdictCache,
    image_problems,
    image_root_for,
    resolve_image_path,
)
from application.datasets import read_split_lines
from domain.errors import ArtifactError, ConfigError, DataProblem, InvariantViolation
from domain.objects import Ordering
from domain.packing import over_long_samples
from domain.records import RecordSet, no_records_problem, validate_jsonl_records
from ports.storage import ArtifactStore, ImageStore

PROG = "python -m application.validate_dataset"

SampleLengths = Callable[[RecordSet, Sequence[Path]], Sequence[int]]
"""Token lengths (data.md §6.5) of every record of a validated record set (with its resolved image
files, as training loads them), in record order."""


@attrs.frozen
class Distribution:
    """Summary of a list of non-negative numbers (nearest-rank percentiles)."""

    count: int
    minimum: float
    mean: float
    p50: float
    p90: float
    p99: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        ordered = sorted(values)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

        return cls(len(ordered), ordered[0], sum(ordered) / len(ordered), rank(50), rank(90), rank(99), ordered[-1])

    def describe(self) -> str:
        return (
            f"min {self.minimum:g}, mean {self.mean:.2f}, p50 {self.p50:g}, p90 {self.p90:g}, "
            f"p99 {self.p99:g}, max {self.maximum:g}"
        )


@attrs.frozen
class SplitValidation:
    """The outcome for one JSONL file."""

    key: str  # data.train_jsonl / data.val_jsonl
    path: Path
    records: int
    problems: tuple[DataProblem | str, ...]
    bbox_objects: int = 0
    poly_objects: int = 0
    objects_per_image: Distribution | None = None
    lengths: Distribution | None = None
    lengths_note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@attrs.frozen
class DatasetValidation:
    splits: tuple[SplitValidation, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits)

    @property
    def problem_count(self) -> int:
        return sum(len(s.problems) for s in self.splits)


def validate_split(
    key: str,
    path: Path,
    *,
    image_root: Path | None,
    max_pixels: int,
    ordering: Ordering,
    bbox_only: bool,
    max_length: int,
    artifacts: ArtifactStore,
    images: ImageStore,
    sample_lengths: SampleLengths | None = None,
    workers: int = DEFAULT_CHECK_WORKERS,
) -> SplitValidation:
    """All loader checks on one JSONL file; never raises for data problems (they are collected)."""
    try:
        lines, unreadable = read_split_lines(path, artifacts)
    except ArtifactError as exc:
        return SplitValidation(key, path, 0, (f"{key}: {exc}",))
    record_set, contract = validate_jsonl_records(
        lines, str(path), max_pixels=max_pixels, bbox_only=bbox_only, ordering=ordering, unreadable=unreadable
    )
    problems: list[DataProblem | str] = list(contract)
    if not len(record_set) and not contract:
        problems.append(f"{key}: {no_records_problem(str(path))}")
    root = image_root_for(path, image_root)
    problems += image_problems(record_set, root, images, workers=workers, cache=ImageVerdictCache(artifacts, root))
    lengths: Distribution | None = None
    note = "not computed (no sample-length function given)"
    if sample_lengths is not None:
        values = list(sample_lengths(record_set, [resolve_image_path(r.image, root) for r in record_set]))
        if len(values) != len(record_set):
            raise InvariantViolation(f"sample_lengths returned {len(values)} lengths for {len(record_set)} records")
        records = list(record_set)
        for i in over_long_samples(values, max_length):
            problems.append(
                DataProblem(
                    records[i].source, records[i].line, "",
                    f"sample length {values[i]} exceeds training.max_length = {max_length}",
                )
            )  # fmt: skip
        lengths = Distribution.of(values)
        note = ""
    problems.sort(key=lambda p: (p.line, p.field) if isinstance(p, DataProblem) else (0, ""))
    per_image = [len(r.objects) for r in record_set]
    return SplitValidation(
        key, path, len(record_set), tuple(problems), record_set.num_bbox_objects, record_set.num_poly_objects,
        Distribution.of(per_image), lengths, note,
    )


def validate_dataset(
    config: Any,
    *,
    artifacts: ArtifactStore,
    images: ImageStore,
    sample_lengths: SampleLengths | None = None,
) -> DatasetValidation:
    """§9.9 on the typed config (``application.config.schema.CoordExpConfig``)."""
    data = config.data
    targets = [(k, p) for k, p in (("data.train_jsonl", data.train_jsonl), ("data.val_jsonl", data.val_jsonl)) if p]
    if not targets:
        raise ConfigError("validate_dataset needs data.train_jsonl and/or data.val_jsonl")
    splits = tuple(
        validate_split(
            key, Path(path), image_root=data.image_root, max_pixels=data.max_pixels, ordering=data.ordering,
            bbox_only=config.prompt.variant == "bbox_only", max_length=config.training.max_length,
            artifacts=artifacts, images=images, sample_lengths=sample_lengths,
        )
        for key, path in targets
    )
    return DatasetValidation(splits)


def report_text(result: DatasetValidation) -> str:
    """Every problem, one per line, then the statistics of each file."""
    out: list[str] = []
    for split in result.splits:
        out.append(f"{split.key}: {split.path}: {split.records} valid records, {len(split.problems)} problems")
        out.extend(f"  {p}" for p in split.problems)
        out.append(f"  objects: {split.bbox_objects} bbox_2d, {split.poly_objects} poly")
        if split.objects_per_image is not None:
            out.append(f"  objects per image: {split.objects_per_image.describe()}")
        if split.lengths is not None:
            out.append(f"  sample lengths: {split.lengths.describe()}")
        elif split.lengths_note:
            out.append(f"  sample lengths: {split.lengths_note}")
    verdict = "OK" if result.ok else f"FAILED with {result.problem_count} problems"
    out.append(f"validate_dataset: {verdict}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m application.validate_dataset --config FILE``: exit 0 when clean, 1 otherwise."""
    from application import wiring
    from application.cli import run_entry_point
    from application.config import load_config

    def body(config_path: Path) -> int:
        config = load_config(config_path).config
        from application.config.schema import ModelConfig, TinyModelConfig
        from application.training_plan import sample_lengths_of
        from application.training_settings import sample_settings

        # Token lengths with the configured model's processor (the tiny model by default), as training measures them.
        model = config.model if config.model is not None else ModelConfig(tiny=TinyModelConfig())
        encoder = wiring.make_sample_encoders()(wiring.resolve_model_checkpoint(model))
        sample_lengths = sample_lengths_of(encoder, sample_settings(config))
        result = validate_dataset(
            config, artifacts=wiring.make_artifact_store(), images=wiring.make_image_store(),
            sample_lengths=sample_lengths,
        )
        print(report_text(result))
        return 0 if result.ok else 1

    return run_entry_point(argv, PROG, body)


if __name__ == "__main__":
    sys.exit(main())
