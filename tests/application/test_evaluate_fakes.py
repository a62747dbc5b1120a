"""The evaluate use case end to end on fakes alone (issue 10 item 3): every port arrives as an argument.

No ``application.wiring`` here, and the use case may not reach for it: the module is made unimportable for
the duration of each test, so a helper that still asked the wiring for a port would fail the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import application
from adapters.fakes.evaluation import CountingCocoEvaluator
from adapters.fakes.storage import RecordingArtifactStore
from application.config.schema import EvalConfig
from application.evaluate import EvaluateDependencies, evaluate
from ports.evaluation import SemanticStep


@pytest.fixture(autouse=True)
def no_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "application.wiring", None)  # type: ignore[arg-type]
    monkeypatch.delattr(application, "wiring", raising=False)


def box(points: list[int], desc: str, score: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "bbox_2d", "points": points, "desc": desc}
    if score is not None:
        out["score"] = score
    return out


def artifact(tmp_path: Path) -> Path:
    records = [
        {"index": 0, "image": "images/0.jpg", "width": 640, "height": 480, "coord_mode": "pixel",
         "gt": [box([10, 10, 100, 100], "cat"), box([200, 200, 300, 300], "dog")],
         "pred": [box([11, 10, 100, 100], "cat", 0.9), box([12, 11, 100, 101], "Cat", 0.8),
                  box([0, 0, 5, 5], "zebra", 0.4), {"type": "bbox_2d", "points": [5, 5, 1, 1], "score": 0.3}]},
        {"index": 1, "image": "images/1.jpg", "width": 320, "height": 240, "coord_mode": "pixel",
         "gt": [box([1, 1, 50, 50], "dog")], "pred": []},
    ]  # fmt: skip
    path = tmp_path / "gt_vs_pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def deps() -> EvaluateDependencies:
    return EvaluateDependencies(
        artifacts=RecordingArtifactStore(), coco=CountingCocoEvaluator(), semantic=SemanticStep.off("fakes")
    )


def test_artifact_evaluated_on_fakes_only(tmp_path: Path) -> None:
    d = deps()
    out = tmp_path / "eval"
    summary = evaluate(EvalConfig(metrics="both", overlay=False), artifact(tmp_path), out, d)

    assert isinstance(d.coco, CountingCocoEvaluator) and isinstance(d.artifacts, RecordingArtifactStore)
    (call,) = d.coco.calls  # one bbox evaluation: 2 images, 3 GT boxes, the 2 mapped predictions ("Cat" too)
    assert (call.iou_type, call.images, call.annotations, call.results) == ("bbox", 2, 3, 2)
    assert summary.metrics["bbox_AP"] == pytest.approx(2 / 5) and summary.metrics["bbox_AR100"] == 0.09
    assert summary.counters["images"] == 2 and summary.counters["degenerate"] == 1
    assert summary.metrics["dup/raw/pairs"] == pytest.approx(0.5)  # "cat" and "Cat" overlap in image 0
    assert summary.meta["coco_backend"] == "fake"

    names = {"metrics.json", "per_image.json", "coco_gt.json", "coco_preds.json", "per_class.csv",
             "pr_curves.json", "matches.jsonl", "matches@0.30.jsonl"}  # fmt: skip
    assert {p.name for p in d.artifacts.written} == names  # every output went through the store
    assert {p.name for p in out.iterdir()} == names
    assert all(p.parent == d.artifacts.staging[0] for p in d.artifacts.written)
    assert json.loads((out / "metrics.json").read_text())["metrics"]["bbox_AP"] == pytest.approx(2 / 5)


def test_coco_results_evaluated_on_fakes_only(tmp_path: Path) -> None:
    gt = {"images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 10}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25.0, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "cat"}]}  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": "7", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]))
    settings = EvalConfig(coco_gt_json=tmp_path / "gt.json", coco_results_json=tmp_path / "res.json", overlay=False)
    d = deps()
    summary = evaluate(settings, None, tmp_path / "eval", d)
    assert summary.metrics["bbox_AP"] == pytest.approx(0.5)
    assert isinstance(d.artifacts, RecordingArtifactStore)
    assert {p.name for p in d.artifacts.written} == {"metrics.json", "per_class.csv", "pr_curves.json"}

