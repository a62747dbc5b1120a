"""LVIS federated AP behind the port: both backends equal ``lvis.LVISEval`` run directly on the same files."""

from __future__ import annotations

import copy
import functools
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from lvis_fixture import lvis_gt, lvis_results, np_float, write_json

from adapters.coco.lvis_evaluator import LVIS_BACKENDS, import_lvis, lvis_evaluator_for
from domain.errors import ConfigError
from domain.lvis import LVIS_STAT_NAMES, top_detections_per_image
from ports.evaluation import LvisEvaluator

pytest.importorskip("lvis")
REPO = Path(__file__).resolve().parents[2]



@functools.cache
def reference_cached(
    gt_path: Path, results_path: Path, iou_type: str, img_ids: tuple[int, ...] | None
) -> dict[str, float]:
    return reference(gt_path, results_path, iou_type, list(img_ids) if img_ids is not None else None)


def reference(
    gt_path: Path, results_path: Path, iou_type: str, img_ids: list[int] | None = None
) -> dict[str, float]:
    """``LVISEval`` exactly as its README runs it, on the files."""
    lvis = import_lvis()
    with np_float():
        ev = lvis.LVISEval(str(gt_path), str(results_path), iou_type)
        if img_ids is not None:
            ev.params.img_ids = img_ids
        ev.run()
    return {k: float(v) for k, v in ev.results.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lvis")
    gt = lvis_gt()
    out: dict[str, Any] = {"gt": gt, "gt_path": write_json(root / "lvis_gt.json", gt)}
    for iou_type in ("bbox", "segm"):
        res = lvis_results(gt, iou_type)
        out[iou_type] = res
        out[f"{iou_type}_path"] = write_json(root / f"{iou_type}.json", res)
    return out


@pytest.mark.parametrize("backend", LVIS_BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_backends_equal_lvis_eval_on_the_same_files(
    backend: str, iou_type: str, files: dict[str, Any]
) -> None:
    want = reference_cached(files["gt_path"], files[f"{iou_type}_path"], iou_type, None)
    evaluator = lvis_evaluator_for(backend)
    assert isinstance(evaluator, LvisEvaluator)
    got = evaluator.evaluate(files["gt"], files[iou_type], iou_type).metrics()
    assert list(want) == list(LVIS_STAT_NAMES)
    for name in LVIS_STAT_NAMES:
        assert abs(got[f"{iou_type}_{name}"] - want[name]) <= 1e-12, (backend, iou_type, name)
    assert 0.0 < want["AP"] < 1.0 and want["APr"] != want["APf"]  # the fixture is not degenerate


def test_flooded_image_is_cut_per_image_before_the_federated_filter(files: dict[str, Any]) -> None:
    """faster-coco-eval alone cuts 300 per image *and category*; without the per-image cut it differs."""
    gt, results = files["gt"], files["bbox"]
    counts: dict[int, int] = {}
    for r in results:
        counts[r["image_id"]] = counts.get(r["image_id"], 0) + 1
    assert max(counts.values()) > 300
    assert len(top_detections_per_image(results)) < len(results)
    want = reference_cached(files["gt_path"], files["bbox_path"], "bbox", None)
    fce = lvis_evaluator_for("faster_coco_eval")
    import faster_coco_eval

    g = faster_coco_eval.COCO()
    g.dataset = copy.deepcopy(gt)
    g.createIndex()
    raw = faster_coco_eval.COCOeval_faster(
        g, g.loadRes(copy.deepcopy(results)), "bbox", lvis_style=True, print_function=lambda *a, **k: None
    )
    raw.params.maxDets = [300]
    raw.evaluate()
    raw.accumulate()
    raw.summarize()
    assert abs(raw.stats_as_dict["AP_all"] - want["AP"]) > 1e-6  # the library's own cut differs
    assert abs(fce.evaluate(gt, results, "bbox").metrics()["bbox_AP"] - want["AP"]) <= 1e-12


@pytest.mark.parametrize("backend", LVIS_BACKENDS)
def test_image_subset(backend: str, files: dict[str, Any]) -> None:
    ids = sorted(img["id"] for img in files["gt"]["images"])[::3]
    want = reference_cached(files["gt_path"], files["bbox_path"], "bbox", tuple(ids))
    got = lvis_evaluator_for(backend).evaluate(files["gt"], files["bbox"], "bbox", img_ids=ids).metrics()
    for name in LVIS_STAT_NAMES:
        assert abs(got[f"bbox_{name}"] - want[name]) <= 1e-12, name


@pytest.mark.parametrize("backend", LVIS_BACKENDS)
def test_no_detections_and_no_mutation(backend: str, files: dict[str, Any]) -> None:
    gt, results = files["gt"], files["bbox"]
    before = (copy.deepcopy(gt), copy.deepcopy(results))
    evaluator = lvis_evaluator_for(backend)
    evaluator.evaluate(gt, results, "bbox")
    evaluator.evaluate(gt, results, "segm")
    assert (gt, results) == before
    empty = evaluator.evaluate(gt, [], "bbox")
    stats = dict(zip(LVIS_STAT_NAMES, empty.stats))
    assert stats["AP"] == 0.0 and stats["AR@300"] == 0.0
    assert all(not math.isnan(v) for v in empty.stats)


def test_backends_agree_per_class(files: dict[str, Any]) -> None:
    a = lvis_evaluator_for("faster_coco_eval").evaluate(files["gt"], files["bbox"], "bbox")
    b = lvis_evaluator_for("lvis").evaluate(files["gt"], files["bbox"], "bbox")
    assert [c for c, _ in a.per_class_ap] == [c for c, _ in b.per_class_ap]
    for (_, x), (_, y) in zip(a.per_class_ap, b.per_class_ap):
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-12
    assert a.curves.recall_thresholds == b.curves.recall_thresholds
    for (label_a, xs), (label_b, ys) in zip(a.curves.curves, b.curves.curves, strict=True):
        assert label_a == label_b and max(abs(x - y) for x, y in zip(xs, ys, strict=True)) <= 1e-12
    assert a.per_frequency_ap() == {f: a.metrics()[f"bbox_AP{f}"] for f in "rcf"}


def test_reference_backend_leaves_logging_and_numpy_alone(files: dict[str, Any]) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    lvis_evaluator_for("lvis").evaluate(files["gt"], files["bbox"][:50], "bbox")
    assert list(root.handlers) == handlers and root.level == level
    assert "float" not in np.__dict__
    # a fresh interpreter (no handler yet, lvis not imported): `import lvis` would configure the root logger
    code = (
        "import logging; from adapters.coco.lvis_evaluator import lvis_evaluator_for; "
        "lvis_evaluator_for('lvis'); import lvis; "
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers; "
        "assert logging.getLogger().level == logging.WARNING"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="eval.lvis_backend"):
        lvis_evaluator_for("detectron2")
