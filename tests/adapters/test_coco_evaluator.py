"""COCO backends behind the port: published numbers, crowd regions, zero predictions, parity."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.coco.evaluator import BACKENDS, LibraryCocoEvaluator, coco_evaluator_for
from domain.errors import ConfigError
from domain.evaluation import COCO_STAT_NAMES
from ports.evaluation import CocoEvaluator

DATA = Path(__file__).resolve().parents[2] / "data"
COCO100 = DATA / "coco_val2014_100"
SHAPES = DATA / "shapes3"

# /work/shared/data/README.md: published COCO metrics of the fake results on the first 100 images.
PUBLISHED = {
    "bbox": (
        0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
        0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
        0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982,
    ),
    "segm": (
        0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
        0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
        0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099,
    ),
}  # fmt: skip
RESULTS = {"bbox": "fakebbox100_results.json", "segm": "fakesegm100_results.json"}


def load(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def coco100_gt() -> dict[str, Any]:
    return load(COCO100 / "instances_val2014_100.json")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_published_coco100_numbers(backend: str, iou_type: str, coco100_gt: dict[str, Any]) -> None:
    evaluator = coco_evaluator_for(backend)
    assert isinstance(evaluator, CocoEvaluator)
    result = evaluator.evaluate(coco100_gt, load(COCO100 / RESULTS[iou_type]), iou_type)
    assert len(result.stats) == 12
    for name, got, want in zip(COCO_STAT_NAMES, result.stats, PUBLISHED[iou_type]):
        assert abs(got - want) <= 1e-10, (backend, iou_type, name, got, want)
    assert set(result.metrics()) == {f"{iou_type}_{n}" for n in COCO_STAT_NAMES}


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_crowd_case(backend: str) -> None:
    # README: detections loaded with min_score = 0.1 (the loader keeps score >= min_score).
    gt = load(SHAPES / "gt_ignore_test.json")  # one image id is the string "2299"
    dets = [d for d in load(SHAPES / "dt_ignore_test.json") if d["score"] >= 0.1]
    stats = coco_evaluator_for(backend).evaluate(gt, dets, "bbox").stats
    assert abs(stats[0] - 0.7099009900990099) <= 1e-10
    assert abs(stats[2] - 0.8415841584158416) <= 1e-10
    assert abs(stats[8] - 0.7153846153846154) <= 1e-10


def test_backends_agree_on_per_class_ap(coco100_gt: dict[str, Any]) -> None:
    a = coco_evaluator_for("faster_coco_eval").evaluate(coco100_gt, load(COCO100 / RESULTS["bbox"]), "bbox")
    b = coco_evaluator_for("pycocotools").evaluate(coco100_gt, load(COCO100 / RESULTS["bbox"]), "bbox")
    assert [c for c, _ in a.per_class_ap] == [c for c, _ in b.per_class_ap] and len(a.per_class_ap) == 80
    for (_, x), (_, y) in zip(a.per_class_ap, b.per_class_ap):
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9
    assert [k for k, _ in a.curves.curves] == ["0.50", "0.75", "mean"] == [k for k, _ in b.curves.curves]
    for (_, u), (_, v) in zip(a.curves.curves, b.curves.curves):
        assert np.allclose(u, v, rtol=0, atol=1e-9)


def test_inputs_are_not_mutated(coco100_gt: dict[str, Any]) -> None:
    gt = load(SHAPES / "gt_ignore_test.json")
    dets = load(SHAPES / "dt_ignore_test.json")
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    for backend in BACKENDS:
        coco_evaluator_for(backend).evaluate(gt, dets, "bbox")
    assert gt == gt_before and dets == dets_before


class _LoaderSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, coco_cls: Any) -> None:
        self.calls: list[int] = []
        original = coco_cls.loadRes

        def spy(this: Any, res: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(len(res))
            if isinstance(res, list) and not res:
                raise AssertionError("loadRes called with an empty list")
            return original(this, res, *args, **kwargs)

        monkeypatch.setattr(coco_cls, "loadRes", spy)


def _small_gt() -> dict[str, Any]:
    # two small non-crowd boxes in category 1; category 2 has only a crowd region; no medium/large GT
    return {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 1},
        ],
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_predictions_never_reach_the_loader(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator = coco_evaluator_for(backend)
    spy = _LoaderSpy(monkeypatch, evaluator._coco_cls)
    result = evaluator.evaluate(_small_gt(), [], "bbox")
    assert spy.calls == []
    got = dict(zip(COCO_STAT_NAMES, result.stats))
    # buckets with non-crowd GT -> 0.0; medium / large buckets have no GT -> -1.0
    for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs"):
        assert got[name] == 0.0, name
    for name in ("APm", "APl", "ARm", "ARl"):
        assert got[name] == -1.0, name
    # the same evaluator still loads non-empty results through the library loader
    evaluator.evaluate(
        _small_gt(), [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}], "bbox"
    )
    assert spy.calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_iou_thrs_and_img_ids(backend: str) -> None:
    gt = _small_gt()
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 8], "score": 0.9},  # IoU 0.8
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.8},
    ]
    ev = coco_evaluator_for(backend)
    # with thresholds 0.5 and 0.75 both boxes match at both: AP 1.0
    assert ev.evaluate(gt, dets, "bbox", iou_thrs=[0.5, 0.75]).stats[0] == pytest.approx(1.0)
    # restricted to image 1 only: one GT, one TP
    only_one = ev.evaluate(gt, dets[:1], "bbox", img_ids=[1])
    assert only_one.stats[1] == pytest.approx(1.0)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="coco_backend"):
        coco_evaluator_for("detectron")


def test_missing_backend_names_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="faster_coco_eval"):
        LibraryCocoEvaluator("pycocotools")


@pytest.mark.parametrize("backend", BACKENDS)
def test_polygon_iou(backend: str) -> None:
    ev = coco_evaluator_for(backend)
    square = [0, 0, 10, 0, 10, 10, 0, 10]
    shifted = [5, 5, 15, 5, 15, 15, 5, 15]
    iou = ev.polygon_iou([square, shifted], [square], 20, 20)
    assert iou.shape == (2, 1)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[1, 0] == pytest.approx(25 / 175)
    assert ev.polygon_iou([], [square], 20, 20).shape == (0, 1)
    with pytest.raises(ValueError, match=">= 6"):
        ev.polygon_iou([[0, 0, 10, 10]], [square], 20, 20)


# --- differential test against pycocotools called directly ------------------------------------------


def _pycocotools_stats(gt: dict[str, Any], dets: list[dict[str, Any]]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


@st.composite
def coco_problems(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    n_images = draw(st.integers(1, 4))
    n_cats = draw(st.integers(1, 3))
    coord = st.integers(0, 150)
    size = st.integers(1, 120)
    images = [{"id": i + 1, "width": 300, "height": 300} for i in range(n_images)]
    annotations = []
    for img in images:
        for _ in range(draw(st.integers(0, 4))):
            x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": draw(st.integers(1, n_cats)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(draw(st.integers(0, 9)) == 0),
                }
            )
    dets = []
    for img in images:
        for _ in range(draw(st.integers(0, 5))):
            if annotations and draw(st.booleans()):
                base = draw(st.sampled_from(annotations))["bbox"]
                jitter = draw(st.integers(-10, 10))
                bbox = [base[0] + jitter, base[1], max(1, base[2] - jitter), base[3]]
            else:
                bbox = [draw(coord), draw(coord), draw(size), draw(size)]
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": draw(st.integers(1, n_cats)),
                    "bbox": bbox,
                    "score": draw(st.sampled_from([0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 1.0])),
                }
            )
    categories = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(n_cats)]
    return {"images": images, "annotations": annotations, "categories": categories}, dets


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco_problems())
def test_differential_against_pycocotools(problem: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    gt, dets = problem
    if not dets:
        return  # the reference would call the loader with an empty list, which the port never does
    want = _pycocotools_stats(gt, dets)
    for backend in BACKENDS:
        got = coco_evaluator_for(backend).evaluate(gt, dets, "bbox").stats
        assert np.allclose(got, want[:12], rtol=0, atol=1e-12), (backend, got, want)
