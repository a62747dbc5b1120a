"""Loading a training / inference split: every record validated and every image checked before any model loads.

data.md §1.1.3, §3.3, §7.1: the loader reads the whole JSONL, validates each record against the contract,
applies the limit (first N records), checks every image (eager) and raises one ``DataContractError``
listing file:line:field problems. Used by training and inference alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from application.dataset_images import ImageVerdictCache, image_problems, image_root_for, resolve_image_path
from domain.errors import ArtifactError, DataContractError, DataProblem
from domain.records import Record, RecordSet, no_records_problem, parse_jsonl_records
from ports.storage import ArtifactStore, ImageStore


@attrs.frozen
class LoadedSplit:
    path: Path
    records: RecordSet
    images: tuple[Path, ...]

    @property
    def num_poly_objects(self) -> int:
        return self.records.num_poly_objects


def read_split_lines(path: Path, artifacts: ArtifactStore) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The numbered lines of a dataset JSONL and, apart, ``(line, reason)`` for lines that are not UTF-8
    (reported with every other problem of the file, never alone)."""
    lines: list[tuple[int, str]] = []
    unreadable: list[tuple[int, str]] = []
    for line in artifacts.read_data_lines(path):
        if line.problem is not None:
            unreadable.append((line.number, line.problem))
        else:
            lines.append((line.number, line.text))
    return lines, unreadable


def load_split(
    path: Path,
    data: Any,
    prompt_variant: str,
    *,
    limit: int | None,
    artifacts: ArtifactStore,
    images: ImageStore,
) -> LoadedSplit:
    """Validate ``path`` against the record contract with the ``data`` block's settings, then its images.

    Record problems and (under ``check_image_sizes: eager``) image problems of the valid records are
    raised together in one DataContractError; a file without records is an error too.
    """
    try:
        lines, unreadable = read_split_lines(path, artifacts)
    except ArtifactError as exc:
        raise DataContractError(f"{path}: {exc}") from exc
    root = image_root_for(path, data.image_root)

    def check_images(kept: RecordSet) -> tuple[DataProblem, ...]:
        if data.check_image_sizes != "eager":
            return ()
        return image_problems(kept, root, images, cache=ImageVerdictCache(artifacts, root))

    record_set = parse_jsonl_records(
        lines,
        str(path),
        max_pixels=int(data.max_pixels),
        bbox_only=prompt_variant == "bbox_only",
        ordering=data.ordering,
        limit=limit,
        unreadable=unreadable,
        further_checks=check_images,
    )
    if not len(record_set):
        raise DataContractError(no_records_problem(str(path)))
    return LoadedSplit(path, record_set, tuple(resolve_image_path(r.image, root) for r in record_set))


def records_of(split: LoadedSplit) -> tuple[Record, ...]:
    return tuple(split.records)
