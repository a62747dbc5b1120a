"""Loading a training / inference split: every record validated and every image checked before any model loads.

data.md §1.1.3, §3.3, §7.1: the loader reads the whole JSONL, validates each record against the contract,
applies the limit (first N records), checks every image (eager) and raises one ``DataContractError``
listing file:line:field problems. Used by training and inference alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from application.dataset_images import check_images_eager, image_root_for, resolve_image_path
from domain.errors import ArtifactError, DataContractError
from domain.records import Record, RecordSet, parse_jsonl_records
from ports.storage import ArtifactStore, ImageStore


@attrs.frozen
class LoadedSplit:
    path: Path
    records: RecordSet
    images: tuple[Path, ...]

    @property
    def num_poly_objects(self) -> int:
        return self.records.num_poly_objects


def load_split(
    path: Path,
    data: Any,
    prompt_variant: str,
    *,
    limit: int | None,
    artifacts: ArtifactStore,
    images: ImageStore,
) -> LoadedSplit:
    """Validate ``path`` against the record contract with the ``data`` block's settings, then its images."""
    try:
        lines = [(line.number, line.text) for line in artifacts.read_lines(path)]
    except ArtifactError as exc:
        raise DataContractError(f"{path}: {exc}") from exc
    record_set = parse_jsonl_records(
        lines,
        str(path),
        max_pixels=int(data.max_pixels),
        bbox_only=prompt_variant == "bbox_only",
        ordering=data.ordering,
        limit=limit,
    )
    root = image_root_for(path, data.image_root)
    if data.check_image_sizes == "eager":
        check_images_eager(record_set, root, images)
    return LoadedSplit(path, record_set, tuple(resolve_image_path(r.image, root) for r in record_set))


def records_of(split: LoadedSplit) -> tuple[Record, ...]:
    return tuple(split.records)
