"""The batched box IoU of the faster-coco-eval backend changes nothing (issue 16).

Expected values come from the library itself on the same inputs: its ``computeIoU`` cell by cell and its
own ``COCOeval_faster.evaluate``, never from the code under test.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.coco.evaluator import LibraryCocoEvaluator, _copy_gt, batched_box_ious


def problem(seed: int, n_images: int = 12, *, many: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Boxes on a coarse grid (ties of score and equal boxes are frequent), crowd regions, float and
    zero-size boxes, and with ``many`` more than 100 detections in one cell (the maxDets cut)."""
    rng = random.Random(seed)
    images = [{"id": i + 1, "width": 64, "height": 48, "file_name": f"{i}.jpg"} for i in range(n_images)]
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]
    annotations, results = [], []
    for img in images:
        for _ in range(rng.randint(0, 6)):
            x, y = rng.randint(0, 40), rng.randint(0, 30)
            w, h = rng.choice([0, 2, 7.5, 13, 20]), rng.choice([1, 3, 9.25, 17])
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": rng.choice([1, 2, 5]),
                                "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": int(rng.random() < 0.15)})  # fmt: skip
        for _ in range(rng.randint(0, 150 if many and img["id"] == 1 else 8)):
            x, y = rng.randint(0, 40), rng.randint(0, 30)
            crowded = many and img["id"] == 1  # one cell with more detections than maxDets (100)
            results.append({"image_id": img["id"], "category_id": 1 if crowded else rng.choice([1, 2, 5]),
                            "bbox": [x + rng.choice([0, 0.5]), y, rng.choice([2, 7, 13.5]), rng.choice([3, 9, 17])],
                            "score": rng.choice([0.1, 0.5, 0.5, 0.9, 1, 0.25])})  # fmt: skip
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    return gt, results


def prepared(gt: dict[str, Any], results: list[dict[str, Any]]) -> Any:
    evaluator = LibraryCocoEvaluator("faster_coco_eval")
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = evaluator._coco(_copy_gt(gt))
        ev = evaluator._eval(gt_coco, evaluator._results(gt_coco, results), "bbox")
    p = ev.params
    p.imgIds, p.catIds, p.maxDets = list(np.unique(p.imgIds)), list(np.unique(p.catIds)), sorted(p.maxDets)
    ev._prepare()
    return ev


@given(seed=st.integers(0, 10_000), many=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_blocks_equal_compute_iou_bit_for_bit(seed: int, many: bool) -> None:
    ev = prepared(*problem(seed, many=many))
    p = ev.params
    gts = ev.gt_dataset.get_instances(p.imgIds, p.catIds, True)
    dts = ev.dt_dataset.get_instances(p.imgIds, p.catIds, True)
    cells = [(i, c) for i in range(len(p.imgIds)) for c in range(len(p.catIds)) if gts[i][c] and dts[i][c]]
    blocks = batched_box_ious([gts[i][c] for i, c in cells], [dts[i][c] for i, c in cells], p.maxDets[-1])
    assert blocks is not None and len(blocks) == len(cells)
    for (i, c), block in zip(cells, blocks):
        want = np.asarray(ev.computeIoU(p.imgIds[i], p.catIds[c]), dtype=np.float64)
        assert block.shape == want.shape
        assert block.tobytes() == np.ascontiguousarray(want).tobytes()  # the same bits, -0.0 included


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_whole_evaluation_equals_the_librarys_evaluate(seed: int) -> None:
    gt, results = problem(seed, n_images=30, many=True)
    evaluator = LibraryCocoEvaluator("faster_coco_eval")
    ours = evaluator.evaluate(copy.deepcopy(gt), results, "bbox")

    def library_own_evaluate(ev: Any, iou_type: str) -> bool:
        return False

    evaluator._evaluate_boxes_batched = library_own_evaluate  # type: ignore[method-assign]
    theirs = evaluator.evaluate(copy.deepcopy(gt), results, "bbox")
    assert ours.stats == theirs.stats
    assert ours.per_class_ap == theirs.per_class_ap
    assert ours.curves == theirs.curves


def test_non_finite_values_go_to_the_library() -> None:
    gt = [[{"bbox": [0, 0, 2, 2], "iscrowd": 0}]]
    assert batched_box_ious(gt, [[{"bbox": [0, 0, 1, 1], "score": float("nan")}]], 100) is None
    assert batched_box_ious(gt, [[{"bbox": [0, float("inf"), 1, 1], "score": 0.5}]], 100) is None
    assert batched_box_ious([], [], 100) == []
