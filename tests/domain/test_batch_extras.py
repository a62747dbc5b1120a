"""The batch-extras registry and its pure value rules (stage1.md §4.1, §4.3)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from domain.batch_extras import (
    BATCH_EXTRAS,
    EXTRA_KEYS,
    LABELS_KEY,
    SampleMeta,
    instability_meta_json,
    is_batch_extra,
    packed_row_dataset_label,
    split_batch,
)


def test_registry_holds_the_five_extras_of_the_spec() -> None:
    assert EXTRA_KEYS == (
        "dataset_labels",
        "dataset_segments",
        "pack_num_samples",
        "token_types",
        "instability_meta_json",
    )
    assert len({e.key for e in BATCH_EXTRAS}) == len(BATCH_EXTRAS)
    assert not is_batch_extra("labels") and not is_batch_extra("input_ids")


KEYS = st.sampled_from([*EXTRA_KEYS, LABELS_KEY, "input_ids", "position_ids", "pixel_values", "use_cache"])


@given(st.dictionaries(KEYS, st.integers()))
def test_split_batch_separates_inputs_extras_and_labels(batch: dict[str, int]) -> None:
    inputs, extras, labels = split_batch(batch)
    assert set(inputs).isdisjoint({*EXTRA_KEYS, LABELS_KEY})
    assert set(extras) == set(EXTRA_KEYS)
    assert all(extras[k] == batch.get(k) for k in EXTRA_KEYS)
    assert labels == batch.get(LABELS_KEY)
    # nothing is lost or invented
    rebuilt = {**inputs, **{k: v for k, v in extras.items() if k in batch}}
    if LABELS_KEY in batch:
        rebuilt[LABELS_KEY] = labels  # type: ignore[assignment]
    assert rebuilt == batch


def test_packed_row_dataset_label() -> None:
    assert packed_row_dataset_label(["coco", "coco"]) == "coco"
    assert packed_row_dataset_label(["coco", "lvis"]) == "mixed"
    assert packed_row_dataset_label([]) == "default"
    assert packed_row_dataset_label([None, ""]) == "default"
    assert packed_row_dataset_label(["coco", None]) == "mixed"


def _meta(k: int) -> SampleMeta:
    return SampleMeta(dataset="coco", source="/d/coco.jsonl", line=k + 1, sample_id=k, length=10 + k)


def test_instability_meta_json_limits_members_not_totals() -> None:
    rows = [[_meta(0), _meta(1), _meta(2)], [_meta(3)]]
    body = json.loads(instability_meta_json(rows, 2))
    assert [r["num_samples"] for r in body] == [3, 1]
    assert [r["total_length"] for r in body] == [33, 13]
    assert [len(r["samples"]) for r in body] == [2, 1]
    assert body[0]["samples"][1] == {
        "dataset": "coco",
        "source": "/d/coco.jsonl",
        "line": 2,
        "sample_id": 1,
        "length": 11,
    }
    assert [len(r["samples"]) for r in json.loads(instability_meta_json(rows, 0))] == [3, 1]
    text = instability_meta_json([[SampleMeta("café", "/d/é.jsonl", 1, 0, 5)]], 0)
    assert text.isascii() and json.loads(text)[0]["samples"][0]["dataset"] == "café"
