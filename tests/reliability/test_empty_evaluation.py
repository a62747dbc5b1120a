"""Finding 4 (issue 11): nothing predicted and nothing annotated is an undefined score, never a perfect one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from application import wiring
from application.config.schema import EvalConfig
from application.evaluate import evaluate_artifact
from domain.evaluation import UNDEFINED_METRIC
from ports.evaluation import SemanticStep

RATIO_SUFFIXES = tuple(
    f"{name}_{level}_{kind}"
    for name in ("precision", "recall", "f1")
    for level in ("loc", "full")
    for kind in ("micro", "macro")
) + ("sem_acc_on_matched",)


def _empty_record(index: int) -> dict[str, object]:
    return {
        "index": index, "image": f"images/{index}.jpg", "width": 64, "height": 48, "coord_mode": "pixel",
        "gt": [], "pred": [], "raw_output": "", "raw_ends_with_im_end": True, "num_generated_tokens": 1,
        "errors": ["empty_pred"],
    }  # fmt: skip


@pytest.mark.parametrize("records", [0, 3], ids=["no-records", "records-without-objects"])
def test_evaluate_reports_undefined_not_perfect_on_an_empty_artifact(tmp_path: Path, records: int) -> None:
    artifact = tmp_path / "gt_vs_pred.jsonl"
    artifact.write_text("".join(json.dumps(_empty_record(i)) + "\n" for i in range(records)))
    warnings: list[str] = []
    settings = EvalConfig(metrics="f1ish", overlay=False)
    summary = evaluate_artifact(
        artifact, settings, tmp_path / "eval", coco=wiring.make_coco_evaluator(settings.coco_backend),
        semantic=SemanticStep.off("test"), warn=warnings.append,artifacts=wiring.make_artifact_store())  # fmt: skip
    for thr in ("0.30", "0.50"):
        for suffix in RATIO_SUFFIXES:
            assert summary.metrics[f"f1ish@{thr}_{suffix}"] == UNDEFINED_METRIC, suffix
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert written["f1ish@0.50_f1_full_micro"] == UNDEFINED_METRIC
    assert any("f1ish@0.50" in w and "undefined" in w and str(artifact) in w for w in warnings), warnings


def test_one_false_positive_is_measured_not_undefined(tmp_path: Path) -> None:
    record = _empty_record(0)
    record["pred"] = [{"type": "bbox_2d", "points": [1, 2, 30, 40], "desc": "cat", "score": 0.5}]
    record["errors"] = []
    artifact = tmp_path / "gt_vs_pred.jsonl"
    artifact.write_text(json.dumps(record) + "\n")
    settings = EvalConfig(metrics="f1ish", overlay=False, f1ish_pred_scope="all")
    warnings: list[str] = []
    summary = evaluate_artifact(
        artifact, settings, tmp_path / "eval", coco=wiring.make_coco_evaluator(settings.coco_backend),
        semantic=SemanticStep.off("test"), warn=warnings.append,artifacts=wiring.make_artifact_store())  # fmt: skip
    assert summary.metrics["f1ish@0.50_precision_loc_micro"] == 0.0
    assert summary.metrics["f1ish@0.50_recall_loc_micro"] == 1.0
    assert not warnings
