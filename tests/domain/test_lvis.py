"""The pure LVIS rules: the per-image detection limit, the federated-field checks, synonyms in mapping."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ArtifactError
from domain.evaluation import Category, CategoryTable, MappingRule
from domain.lvis import (
    LVIS_STAT_NAMES,
    check_lvis_gt,
    federated_gt,
    lvis_metric_keys,
    top_detections_per_image,
)


def reference_limit(anns: list[dict[str, Any]], max_dets: int) -> list[dict[str, Any]]:
    """The order ``lvis.LVISResults.limit_dets_per_image`` produces, written out independently."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        groups.setdefault(a["image_id"], []).append(a)
    out: list[dict[str, Any]] = []
    for rows in groups.values():
        if len(rows) > max_dets:
            rows = sorted(rows, key=lambda r: r["score"], reverse=True)[:max_dets]
        out.extend(rows)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.1, 0.5, 0.5, 0.9])), max_size=40),
    st.integers(1, 6),
)
def test_top_detections_per_image_is_lvis_limit(rows: list[tuple[int, float]], max_dets: int) -> None:
    anns = [{"image_id": i, "score": s, "k": k} for k, (i, s) in enumerate(rows)]
    got = top_detections_per_image(anns, max_dets)
    assert got == reference_limit(anns, max_dets)
    counts: dict[int, int] = {}
    for a in got:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    assert all(c <= max_dets for c in counts.values())


def test_limit_keeps_the_highest_scores_across_categories() -> None:
    rng = random.Random(0)
    anns = [{"image_id": 1, "category_id": k % 7, "score": rng.random()} for k in range(400)]
    kept = top_detections_per_image(anns, 300)
    assert len(kept) == 300
    assert min(a["score"] for a in kept) >= sorted((a["score"] for a in anns), reverse=True)[299]


def lvis_doc() -> dict[str, Any]:
    return {
        "images": [{"id": 1, "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
        "categories": [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4.0, "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 2], "area": 0.0},
        ],
    }


def test_check_lvis_gt_locates_every_problem() -> None:
    check_lvis_gt(lvis_doc(), "val.json")
    doc = lvis_doc()
    doc["images"][0]["neg_category_ids"] = [2, 99]
    del doc["images"][0]["not_exhaustive_category_ids"]
    del doc["categories"][1]["frequency"]
    with pytest.raises(ArtifactError) as err:
        check_lvis_gt(doc, "val.json")
    text = str(err.value)
    assert "val.json: images[0].neg_category_ids: category ids [99]" in text
    assert "val.json: images[0].not_exhaustive_category_ids: a list" in text
    assert "val.json: categories[1].frequency" in text


def test_federated_gt_reads_like_lvis_eval_and_copies() -> None:
    doc = lvis_doc()
    out = federated_gt(doc)
    assert [a["id"] for a in out["annotations"]] == [1] and out["annotations"][0]["iscrowd"] == 0
    assert doc["annotations"][0]["iscrowd"] == 1 and out["images"][0] is not doc["images"][0]


def test_metric_keys() -> None:
    assert lvis_metric_keys("segm")[6:9] == ("segm_APr", "segm_APc", "segm_APf")
    assert len(LVIS_STAT_NAMES) == 13 and LVIS_STAT_NAMES[9] == "AR@300"


def test_synonyms_map_after_names() -> None:
    table = CategoryTable([Category(1, "cup", ("coffee_mug", "mug")), Category(2, "mug")])
    assert table.map_desc("mug", None, 0.6).category_id == 2  # a name wins over another category's synonym
    exact = table.map_desc("coffee_mug", None, 0.6)
    assert (exact.rule, exact.category_id) == (MappingRule.EXACT, 1)
    norm = table.map_desc("Coffee Mug", None, 0.6)
    assert (norm.rule, norm.category_id) == (MappingRule.NORMALIZED, 1)
