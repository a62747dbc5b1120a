"""What one training sample is made of before encoding, and the few rules that turn a record into it.

Shared by the length pre-pass of the use case (``application.training_plan``: lengths are measured with
the objects in record order, data.md §6.5) and the engines' datasets (which shuffle per epoch under
``data.ordering: random``, data.md §2.5), so the two can never disagree about a sample's text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from domain.coordjson import render
from domain.objects import CoordMode, DetObject, FieldOrder, Ordering
from domain.ordering import shuffled_objects
from domain.records import Record


@attrs.frozen
class SampleSource:
    """One record of a split with its position (``record_index``, 0-based) and its resolved image file."""

    record: Record
    record_index: int
    image_path: str

    @property
    def location(self) -> str:
        """``<jsonl>:<line>``: how errors and reports name the sample (data.md §6.4)."""
        return f"{self.record.source}:{self.record.line}"


def build_sources(records: Sequence[Record], image_paths: Sequence[str]) -> tuple[SampleSource, ...]:
    """The sources of a split in record order; one image file per record or a ``ValueError``."""
    if len(records) != len(image_paths):
        raise ValueError(f"{len(records)} records but {len(image_paths)} image paths")
    return tuple(SampleSource(record=r, record_index=i, image_path=str(p)) for i, (r, p) in enumerate(zip(records, image_paths)))


def sample_objects(source: SampleSource, ordering: Ordering, seed: int, epoch: int) -> tuple[DetObject, ...]:
    """The objects of ``source`` in training order for ``epoch``: stored order, or under ``random`` the
    shuffle of (run seed, epoch, record index) (data.md §2.5)."""
    if ordering is Ordering.RANDOM:
        return tuple(shuffled_objects(source.record.objects, seed, epoch, source.record_index))
    return tuple(source.record.objects)


def target_text(objects: Sequence[DetObject], field_order: FieldOrder, coord_mode: CoordMode) -> str:
    """The assistant's CoordJSON line for ``objects`` (data.md §4)."""
    return render(objects, field_order, coord_mode)


def gradient_accumulation_steps(
    configured: int | None, effective_batch_size: int | None, per_device: int, world_size: int
) -> int:
    """G, the micro-batches per optimizer step: ``training.gradient_accumulation_steps`` when set, else the
    fewest that reach ``training.effective_batch_size`` over ``world_size`` devices of ``per_device`` rows
    (a pack counts as one row), else 1."""
    if configured is not None:
        return int(configured)
    if effective_batch_size is not None:
        return max(1, math.ceil(effective_batch_size / (per_device * world_size)))
    return 1
