"""The whole chain guarded by one outcome: the main job's schedule (configs/stage1/smoke.yaml) trains the tiny
Qwen3-VL until it has memorised the three shapes3 images, and inference on the same images recovers every
ground-truth box (AP50 >= 0.9, each GT matched at IoU >= 0.5 with the right description). A wrong label mask,
codec, template or decode breaks it. Its twin: the untrained model does NOT pass the same check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from application.config import load_config
from application.infer import default_dependencies, run_pipeline
from train_runner import run_train
from domain.geometry import box_iou

pytestmark = pytest.mark.slow

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

REPO = Path(__file__).resolve().parents[2]
SHAPES3 = REPO / "data" / "shapes3"
MIN_AP50 = 0.9
MIN_IOU = 0.5


@pytest.fixture(scope="module")
def shapes3_boxes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shapes3 converted by configs/prepare_data/shapes3_bbox.yaml, into a temporary folder."""
    from application.prepare_data import main

    out = tmp_path_factory.mktemp("data")
    config = out / "convert.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "prepare_data" / "shapes3_bbox.yaml"),
        "data": {"convert": {"annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
                             "output_dir": str(out / "shapes3")}},
    }))  # fmt: skip
    assert main(["--config", str(config)]) == 0
    return out / "shapes3" / "train_bbox.jsonl"


def infer_on(tmp: Path, jsonl: Path, model: dict[str, Any], name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """configs/infer/smoke.yaml with ``model`` on ``jsonl``: the eval metrics and the artifact's records."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(REPO / "configs" / "infer" / "smoke.yaml"),
        "run": {"name": name, "output_dir": str(tmp / "infer")},
        "model": model,
        "data": {"val_jsonl": str(jsonl)},
        "stages": {"vis": False},
    }))  # fmt: skip
    deps = attrs.evolve(default_dependencies(), progress=False, echo=lambda _line: None)
    outcome = run_pipeline(load_config(config, entry_point="infer"), deps)
    artifact = outcome.paths.artifact
    records = [json.loads(line) for line in artifact.read_text(encoding="utf-8").splitlines() if line.strip()]
    return dict(outcome.eval_summary.metrics), records


def recovery_problems(metrics: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """Why the run does not count as having memorised the images (empty when it has)."""
    problems = []
    if not metrics.get("bbox_AP50", -1.0) >= MIN_AP50:
        problems.append(f"bbox_AP50 {metrics.get('bbox_AP50')} < {MIN_AP50}")
    for record in records:
        preds = [p for p in record["pred"] if p["type"] == "bbox_2d"]
        for gt in record["gt"]:
            best = max((box_iou(gt["points"], p["points"]) for p in preds if p["desc"] == gt["desc"]), default=0.0)
            if best < MIN_IOU:
                problems.append(f"record {record['index']}: GT {gt['desc']} {gt['points']} best IoU {best:.2f}")
    return problems


def test_the_main_job_schedule_memorises_shapes3(shapes3_boxes: Path, tmp_path: Path) -> None:
    smoke = REPO / "configs" / "stage1" / "smoke.yaml"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(smoke),
        "run": {"output_dir": str(tmp_path / "train")},
        "data": {"train_jsonl": str(shapes3_boxes), "val_jsonl": str(shapes3_boxes)},
    }))  # fmt: skip
    loaded = load_config(config, entry_point="train")
    outcome = run_train(loaded)
    assert outcome.last_checkpoint is not None
    run_dir = tmp_path / "train" / "stage1_smoke"
    assert list((run_dir / "runs").rglob("events.out.tfevents*")), "the README promises TensorBoard events"
    assert (run_dir / "swift.log").is_file()
    metrics, records = infer_on(tmp_path, shapes3_boxes, {"path": str(outcome.last_checkpoint)}, "trained")
    assert len(records) == 3 and sum(len(r["gt"]) for r in records) == 9
    assert recovery_problems(metrics, records) == [], (metrics, [r["raw_output"] for r in records])


def test_the_untrained_model_does_not_pass_the_same_check(shapes3_boxes: Path, tmp_path: Path) -> None:
    smoke = load_config(REPO / "configs" / "stage1" / "smoke.yaml", entry_point="train").config
    assert smoke.model is not None and smoke.model.tiny is not None
    metrics, records = infer_on(tmp_path, shapes3_boxes, {"tiny": {"seed": smoke.model.tiny.seed}, "path": None},
                                "untrained")  # fmt: skip
    assert len(records) == 3
    problems = recovery_problems(metrics, records)
    assert problems, "an untrained model passed the memorisation check: the check cannot fail"
    assert any(p.startswith("bbox_AP50") for p in problems)
