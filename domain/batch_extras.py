"""Batch extras (stage1.md §4.1): side data that travels beside a batch and never reaches the forward.

This module is the registry: a new extra MUST be added to :data:`BATCH_EXTRAS`. It also owns the
rule that splits a collated mapping into model inputs, extras and labels (§4.3), and the pure
parts of the enrichers' values (dataset label of a packed row, instability meta JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TypeVar

import attrs

V = TypeVar("V")

LABELS_KEY = "labels"
DATASET_LABELS = "dataset_labels"
DATASET_SEGMENTS = "dataset_segments"
PACK_NUM_SAMPLES = "pack_num_samples"
TOKEN_TYPES = "token_types"
INSTABILITY_META_JSON = "instability_meta_json"

MIXED_DATASET_LABEL = "mixed"
DEFAULT_DATASET_LABEL = "default"


@attrs.frozen
class BatchExtra:
    key: str
    producer: str
    value: str


BATCH_EXTRAS: tuple[BatchExtra, ...] = (
    BatchExtra(
        DATASET_LABELS,
        "dataset-meta enricher, always",
        "list[str] per row; packed row: the members' label if all equal, 'mixed' if they differ, "
        "'default' if none",
    ),
    BatchExtra(
        DATASET_SEGMENTS,
        "dataset-meta enricher, always",
        "list[int] per row: attention-mask row sum, else row length (packed: whole pack)",
    ),
    BatchExtra(
        PACK_NUM_SAMPLES,
        "dataset-meta enricher, always",
        "int64 [B] on the labels' device: member count per packed row, all ones when padded",
    ),
    BatchExtra(TOKEN_TYPES, "token-type enricher, if token-type metrics on", "int64 [B, L] (stage1.md §2)"),
    BatchExtra(
        INSTABILITY_META_JSON,
        "meta enricher, if the instability monitor is on",
        "ASCII JSON, sorted keys, a list with one object per row: "
        "{num_samples, total_length, samples: [{dataset, source, line, sample_id, length}]}",
    ),
)

EXTRA_KEYS: tuple[str, ...] = tuple(e.key for e in BATCH_EXTRAS)
_EXTRA_KEY_SET = frozenset(EXTRA_KEYS)


def is_batch_extra(key: str) -> bool:
    return key in _EXTRA_KEY_SET


def split_batch(batch: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V | None], V | None]:
    """(model inputs, every registered extra with None when missing, labels) of a collated mapping.

    The model inputs hold neither an extra nor ``labels`` (stage1.md §4.3.2).
    """
    inputs = {k: v for k, v in batch.items() if k not in _EXTRA_KEY_SET and k != LABELS_KEY}
    extras: dict[str, V | None] = {k: batch.get(k) for k in EXTRA_KEYS}
    return inputs, extras, batch.get(LABELS_KEY)


def packed_row_dataset_label(member_labels: Sequence[str | None]) -> str:
    """The dataset label of one row: the members' label if all equal, 'mixed' if not, 'default' if none."""
    known = [label for label in member_labels if label]
    if not known:
        return DEFAULT_DATASET_LABEL
    if len(set(known)) == 1 and len(known) == len(member_labels):
        return known[0]
    return MIXED_DATASET_LABEL


@attrs.frozen
class SampleMeta:
    """One member of a row as the instability meta records it (data.md §6.4 metadata)."""

    dataset: str
    source: str
    line: int
    sample_id: int
    length: int


def instability_meta_json(rows: Sequence[Sequence[SampleMeta]], max_meta_samples: int) -> str:
    """``instability_meta_json``: ASCII JSON with sorted keys, one object per row.

    ``samples`` holds at most ``max_meta_samples`` members (0 = all); ``num_samples`` and
    ``total_length`` always describe the whole row.
    """
    if max_meta_samples < 0:
        raise ValueError(
            f"objective.instability_monitor.max_meta_samples must be >= 0; got {max_meta_samples}"
        )
    body = []
    for members in rows:
        shown = members if max_meta_samples == 0 else members[:max_meta_samples]
        body.append(
            {
                "num_samples": len(members),
                "total_length": sum(m.length for m in members),
                "samples": [attrs.asdict(m) for m in shown],
            }
        )
    return json.dumps(body, sort_keys=True, ensure_ascii=True)
