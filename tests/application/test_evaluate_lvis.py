"""``eval.dataset_style: lvis`` through the use case, and the official-format export (issue 16).

Expected numbers come from the reference libraries called directly on the same files: ``lvis.LVISEval``
for federated AP, pycocotools' ``loadRes`` + ``COCOeval`` for the exported ``coco_preds.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from lvis_fixture import COCO100, lvis_gt, lvis_results, np_float, write_json

from application import wiring
from application.config.schema import EvalConfig
from application.evaluate import check_settings, evaluate_artifact, run_evaluation
from domain.errors import ArtifactError, ConfigError
from domain.evaluation import COCO_STAT_NAMES
from domain.lvis import LVIS_STAT_NAMES
from ports.evaluation import SemanticStep

OFF = SemanticStep.off("test")



def lvis_reference(gt_path: Path, results_path: Path, iou_type: str = "bbox") -> dict[str, float]:
    from adapters.coco.lvis_evaluator import import_lvis  # the reference, called as its README does

    lvis = import_lvis()
    with np_float():
        ev = lvis.LVISEval(str(gt_path), str(results_path), iou_type)
        ev.run()
    return {k: float(v) for k, v in ev.results.items()}


def record(index: int, img: dict[str, Any], w: int, h: int, gt: list[Any], pred: list[Any]) -> dict[str, Any]:
    return {"index": index, "image": f"images/val/{img['id']:012d}.jpg", "image_id": img["id"],
            "width": w, "height": h, "coord_mode": "pixel", "gt": gt, "pred": pred, "raw_output": None,
            "raw_ends_with_im_end": True, "num_generated_tokens": 1, "errors": []}  # fmt: skip


def int_box(bbox: list[float], sx: float, sy: float, w: int, h: int) -> list[int] | None:
    """A COCO xywh box in original pixels -> integer xyxy in the resized image, or None if degenerate."""
    x, y, bw, bh = bbox
    x1, y1 = min(max(int(x * sx), 0), w - 1), min(max(int(y * sy), 0), h - 1)
    x2, y2 = min(int((x + bw) * sx) + 1, w - 1), min(int((y + bh) * sy) + 1, h - 1)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def artifact_from(
    gt: dict[str, Any], results: list[dict[str, Any]], factors: dict[int, tuple[float, float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Artifact records (images resized by ``factors``) and the same detections in original pixels as
    the evaluator must export them (``x_rec * W_off / W_rec``), in the artifact's per-image order."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    gts: dict[int, list[dict[str, Any]]] = {}
    for a in gt["annotations"]:
        gts.setdefault(a["image_id"], []).append(a)
    records, expected = [], []
    for k, img in enumerate(sorted(gt["images"], key=lambda i: i["id"])):
        fx, fy = factors[img["id"]]
        w, h = max(8, round(img["width"] * fx)), max(8, round(img["height"] * fy))
        sx, sy = w / img["width"], h / img["height"]
        gt_objs = []
        for a in gts.get(img["id"], []):
            box = int_box(a["bbox"], sx, sy, w, h)
            if box is not None:
                gt_objs.append({"type": "bbox_2d", "points": box, "desc": names[a["category_id"]]})
        preds = []
        for r in by_image.get(img["id"], []):
            box = int_box(r["bbox"], sx, sy, w, h)
            if box is None:
                continue
            preds.append(
                {"type": "bbox_2d", "points": box, "desc": names[r["category_id"]], "score": r["score"]}
            )
            ox, oy = img["width"] / w, img["height"] / h
            xyxy = [box[0] * ox, box[1] * oy, box[2] * ox, box[3] * oy]
            expected.append({"image_id": img["id"], "category_id": r["category_id"],
                             "bbox": [xyxy[0], xyxy[1], xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]],
                             "score": r["score"]})  # fmt: skip
        records.append(record(k, img, w, h, gt_objs, preds))
    return records, expected


def write_artifact(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    return path


def run(
    tmp_path: Path, records: list[dict[str, Any]], evaluator: str | None, **changes: Any
) -> tuple[Any, Path]:
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", records)
    settings = attrs.evolve(EvalConfig(), metrics="coco", use_segm=False, **changes)
    out = tmp_path / f"eval_{evaluator}_{settings.dataset_style}"
    lvis = wiring.make_lvis_evaluator(evaluator) if evaluator is not None else None
    summary = evaluate_artifact(
        artifact, settings, out, coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF, lvis=lvis, artifacts=wiring.make_artifact_store())
    return summary, out


UNIFORM = 1.0


@pytest.fixture(scope="module")
def lvis_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lvis_case")
    gt = lvis_gt()
    factors = {img["id"]: (UNIFORM, UNIFORM) for img in gt["images"]}
    records, expected = artifact_from(gt, lvis_results(gt), factors)
    return {"root": root, "gt": gt, "gt_path": write_json(root / "lvis_val.json", gt), "records": records,
            "results_path": write_json(root / "results.json", expected)}  # fmt: skip


@pytest.mark.parametrize("backend", ["faster_coco_eval", "lvis"])
def test_use_case_equals_lvis_eval_on_the_same_files(
    backend: str, lvis_case: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("lvis")
    want = lvis_reference(lvis_case["gt_path"], lvis_case["results_path"])
    summary, out = run(
        tmp_path, lvis_case["records"], backend,
        dataset_style="lvis", lvis_backend=backend, coco_gt_json=lvis_case["gt_path"],
    )  # fmt: skip
    for name in LVIS_STAT_NAMES:
        assert abs(summary.metrics[f"bbox_{name}"] - want[name]) <= 1e-12, (backend, name)
    assert "bbox_AR100" not in summary.metrics
    assert summary.meta["dataset_style"] == "lvis" and summary.meta["lvis_backend"] == backend
    per_freq = json.loads((out / "per_frequency.json").read_text())
    assert per_freq["AP"]["bbox"] == {"rare": want["APr"], "common": want["APc"], "frequent": want["APf"]}
    assert sum(per_freq["categories"].values()) == len(lvis_case["gt"]["categories"])


def not_exhaustive_case(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """One image, category ``cup`` annotated but not exhaustively: one matched cup, one unmatched cup."""
    gt = {
        "images": [
            {
                "id": 7,
                "width": 200,
                "height": 200,
                "neg_category_ids": [2],
                "not_exhaustive_category_ids": [1],
            }
        ],
        "categories": [
            {"id": 1, "name": "cup", "frequency": "c"},
            {"id": 2, "name": "dog", "frequency": "r"},
        ],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500}],
    }
    preds = [
        {"type": "bbox_2d", "points": [10, 10, 60, 60], "desc": "cup", "score": 0.6},
        {
            "type": "bbox_2d",
            "points": [120, 120, 180, 180],
            "desc": "cup",
            "score": 0.9,
        },  # an unlabelled cup?
    ]
    gt_objs = [{"type": "bbox_2d", "points": [10, 10, 60, 60], "desc": "cup"}]
    return write_json(tmp_path / "gt.json", gt), [record(0, gt["images"][0], 200, 200, gt_objs, preds)]


@pytest.mark.parametrize("backend", ["faster_coco_eval", "lvis"])
def test_not_exhaustive_prediction_is_no_false_positive_unlike_coco(backend: str, tmp_path: Path) -> None:
    pytest.importorskip("lvis")
    gt_path, records = not_exhaustive_case(tmp_path)
    lvis_summary, _ = run(
        tmp_path, records, backend, dataset_style="lvis", lvis_backend=backend, coco_gt_json=gt_path
    )
    coco_summary, _ = run(tmp_path, records, None, dataset_style="coco", coco_gt_json=gt_path)
    # the unmatched cup is ignored (1 - 2.2e-16 with the reference's tp / (tp + fp + eps); 1.0 in faster-coco-eval)
    assert lvis_summary.metrics["bbox_AP"] >= 1.0 - 1e-12
    assert coco_summary.metrics["bbox_AP"] < 0.6  # COCO ranks a false positive above the true one
    # ... and LVISEval itself agrees, on the same file
    results = write_json(tmp_path / "res.json", [
        {"image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.6},
        {"image_id": 7, "category_id": 1, "bbox": [120, 120, 60, 60], "score": 0.9},
    ])  # fmt: skip
    assert abs(lvis_reference(gt_path, results)["AP"] - lvis_summary.metrics["bbox_AP"]) <= 1e-12


def test_lvis_style_needs_an_lvis_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.coco_gt_json"):
        check_settings(attrs.evolve(EvalConfig(), dataset_style="lvis"))
    gt_path, records = not_exhaustive_case(tmp_path)
    plain = json.loads(gt_path.read_text())
    del plain["images"][0]["not_exhaustive_category_ids"]
    plain["categories"][1]["frequency"] = "often"
    bad = write_json(tmp_path / "coco_like.json", plain)
    with pytest.raises(ArtifactError) as err:
        run(tmp_path, records, "faster_coco_eval", dataset_style="lvis", coco_gt_json=bad)
    text = str(err.value)
    assert "images[0].not_exhaustive_category_ids" in text and "categories[1].frequency" in text
    with pytest.raises(ConfigError, match="no LVIS evaluator"):
        run(tmp_path, records, None, dataset_style="lvis", coco_gt_json=gt_path)


def test_lvis_results_file_input(tmp_path: Path, lvis_case: dict[str, Any]) -> None:
    """``eval.coco_results_json`` against an LVIS annotation file: the reference numbers as well."""
    pytest.importorskip("lvis")
    raw = write_json(tmp_path / "raw.json", lvis_results(lvis_case["gt"]))
    want = lvis_reference(lvis_case["gt_path"], raw)
    settings = attrs.evolve(
        EvalConfig(), dataset_style="lvis", coco_gt_json=lvis_case["gt_path"], coco_results_json=raw
    )
    summary = run_evaluation(
        settings, None, tmp_path / "eval", coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF,
        lvis=wiring.make_lvis_evaluator("faster_coco_eval"),artifacts=wiring.make_artifact_store())  # fmt: skip
    for name in LVIS_STAT_NAMES:
        assert abs(summary.metrics[f"bbox_{name}"] - want[name]) <= 1e-12, name


# --- official-format export -----------------------------------------------------------------------


def test_export_round_trips_through_pycocotools_with_non_uniform_resize(tmp_path: Path) -> None:
    """``coco_preds.json`` carries original image ids, category ids and boxes in original pixels: loading
    it with pycocotools' ``loadRes`` on the original annotations gives the evaluator's stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = COCO100 / "instances_val2014_100.json"
    gt = json.loads(gt_path.read_text())
    results = json.loads((COCO100 / "fakebbox100_results.json").read_text())
    rng = random.Random(3)
    factors = {img["id"]: (rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)) for img in gt["images"]}
    records, expected = artifact_from(gt, results, factors)
    ratios = {round(r["width"] / img["width"] / (r["height"] / img["height"]), 2)
              for r, img in zip(records, sorted(gt["images"], key=lambda i: i["id"]))}  # fmt: skip
    assert len(ratios) > 20  # factors differ between images and between axes
    summary, out = run(tmp_path, records, None, coco_gt_json=gt_path)
    exported = json.loads((out / "coco_preds.json").read_text())
    assert len(exported) == len(expected)
    for got, want in zip(exported, expected):
        assert (got["image_id"], got["category_id"], got["score"]) == (
            want["image_id"],
            want["category_id"],
            want["score"],
        )
        assert max(abs(a - b) for a, b in zip(got["bbox"], want["bbox"])) <= 1e-9
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(out / "coco_preds.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for name, value in zip(COCO_STAT_NAMES, ev.stats):
        assert abs(summary.metrics[f"bbox_{name}"] - float(value)) <= 1e-12, name
    assert not math.isclose(summary.metrics["bbox_AP"], 0.0)
    assert copy.deepcopy(exported) == exported


def image_info_file(tmp_path: Path) -> Path:
    """A test-dev style image-info file: COCO-100's ``images`` and ``categories``, no ``annotations``."""
    gt = json.loads((COCO100 / "instances_val2014_100.json").read_text())
    info = {k: v for k, v in gt.items() if k != "annotations"}
    assert "annotations" not in info and info["images"] and info["categories"]
    return write_json(tmp_path / "image_info_test.json", info)


def non_uniform_records() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gt = json.loads((COCO100 / "instances_val2014_100.json").read_text())
    results = json.loads((COCO100 / "fakebbox100_results.json").read_text())
    rng = random.Random(5)
    factors = {img["id"]: (rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)) for img in gt["images"]}
    return artifact_from(gt, results, factors)


def run_in(directory: Path, records: list[dict[str, Any]], **changes: Any) -> tuple[Any, Path]:
    """The use case in ``directory`` (created), ``eval.metrics`` among the settings one may change."""
    directory.mkdir(parents=True, exist_ok=True)
    artifact = write_artifact(directory / "gt_vs_pred.jsonl", records)
    settings = attrs.evolve(EvalConfig(), **{"metrics": "coco", "use_segm": False, **changes})
    out = directory / "eval"
    summary = evaluate_artifact(
        artifact, settings, out, coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF, artifacts=wiring.make_artifact_store())
    return summary, out


def assert_no_scores(summary: Any) -> None:
    scores = [k for k in summary.metrics if k.startswith(("bbox_", "segm_")) or "f1" in k or "precision" in k
              or "recall" in k]  # fmt: skip
    assert scores == []
    assert summary.meta["metrics_computed"] is False
    assert "no metric was computed" in summary.meta["no_metrics_reason"]
    assert "has no annotations" in summary.meta["no_metrics_reason"]


@pytest.mark.parametrize("metrics", ["coco", "both"])
def test_test_dev_image_info_file_is_exported_not_scored(tmp_path: Path, metrics: str) -> None:
    """Issue 16 item 2: an image-info ``eval.coco_gt_json`` (COCO test-dev) exports ``coco_preds.json``
    with original ids and per-axis rescaled boxes, identical to the export against the full annotations,
    and ``metrics.json`` states that nothing was scored."""
    from pycocotools.coco import COCO

    info_path = image_info_file(tmp_path)
    info = json.loads(info_path.read_text())
    records, expected = non_uniform_records()
    full_summary, full_out = run_in(
        tmp_path / "full", records, coco_gt_json=COCO100 / "instances_val2014_100.json"
    )
    assert full_summary.metrics["bbox_AP"] > 0
    test_dev = [{**r, "gt": []} for r in records]  # test-dev records carry no ground truth
    with pytest.warns(RuntimeWarning, match="no metric was computed") as caught:
        summary, out = run_in(tmp_path / "test_dev", test_dev, coco_gt_json=info_path, metrics=metrics)
    assert len([w for w in caught if "no metric" in str(w.message)]) == 1
    assert_no_scores(summary)
    document = json.loads((out / "metrics.json").read_text())
    assert document["meta"]["no_metrics_reason"] == summary.meta["no_metrics_reason"]
    assert document["metrics"] == dict(summary.metrics)
    assert not (out / "per_class.csv").exists() and not (out / "pr_curves.json").exists()
    assert not list(out.glob("matches*"))

    exported = json.loads((out / "coco_preds.json").read_text())
    assert exported == json.loads((full_out / "coco_preds.json").read_text())  # identical predictions
    assert len(exported) == len(expected) > 100
    image_ids = {img["id"] for img in info["images"]}
    category_ids = {c["id"] for c in info["categories"]}
    for got, want in zip(exported, expected):
        assert got["image_id"] in image_ids and got["category_id"] in category_ids
        assert (got["image_id"], got["category_id"], got["score"]) == (
            want["image_id"], want["category_id"], want["score"],
        )  # fmt: skip
        assert max(abs(a - b) for a, b in zip(got["bbox"], want["bbox"])) <= 1e-9
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(COCO100 / "instances_val2014_100.json"))
        loaded = coco_gt.loadRes(str(out / "coco_preds.json"))
    assert len(loaded.getAnnIds()) == len(exported)
    assert set(loaded.getImgIds()) <= image_ids


def test_test_dev_image_info_with_lvis_style_exports(tmp_path: Path) -> None:
    """An LVIS test-dev image-info file has no federated fields to check: exported, not scored."""
    info_path = image_info_file(tmp_path)
    records, _ = non_uniform_records()
    with pytest.warns(RuntimeWarning, match="no metric was computed"):
        summary, out = run_in(tmp_path / "test_dev", records, dataset_style="lvis", coco_gt_json=info_path)
    assert_no_scores(summary)
    assert not (out / "per_frequency.json").exists()
    _, full_out = run_in(tmp_path / "full", records, coco_gt_json=COCO100 / "instances_val2014_100.json")
    exported = json.loads((out / "coco_preds.json").read_text())
    assert exported == json.loads((full_out / "coco_preds.json").read_text())


def test_image_info_file_cannot_score_a_results_file(tmp_path: Path) -> None:
    info_path = image_info_file(tmp_path)
    settings = attrs.evolve(
        EvalConfig(), coco_gt_json=info_path, coco_results_json=COCO100 / "fakebbox100_results.json"
    )
    with pytest.raises(ArtifactError, match="image-info file"):
        run_evaluation(
            settings,
            None,
            tmp_path / "eval",
            coco=wiring.make_coco_evaluator("faster_coco_eval"),
            semantic=OFF,artifacts=wiring.make_artifact_store())
    assert not (tmp_path / "eval").exists()


def test_empty_annotations_list_is_still_scored(tmp_path: Path) -> None:
    """``"annotations": []`` is a ground truth without objects, not an image-info file: it is scored."""
    gt = json.loads((COCO100 / "instances_val2014_100.json").read_text())
    gt_path = write_json(tmp_path / "no_objects.json", {**gt, "annotations": []})
    records, _ = non_uniform_records()
    summary, out = run_in(tmp_path / "empty", records, coco_gt_json=gt_path)
    assert "bbox_AP" in summary.metrics and "no_metrics_reason" not in summary.meta
    assert (out / "per_class.csv").exists()


def test_lvis_synonym_maps_like_the_name(tmp_path: Path) -> None:
    gt_path, records = not_exhaustive_case(tmp_path)
    gt = json.loads(gt_path.read_text())
    gt["categories"][0]["synonyms"] = ["cup", "coffee_mug"]
    gt_path.write_text(json.dumps(gt))
    records[0]["pred"] = [{"type": "bbox_2d", "points": [10, 10, 60, 60], "desc": "coffee_mug", "score": 0.6}]
    summary, out = run(tmp_path, records, "faster_coco_eval", dataset_style="lvis", coco_gt_json=gt_path)
    assert summary.counters["exact_mapped"] == 1 and summary.counters["unmapped_dropped"] == 0
    assert json.loads((out / "coco_preds.json").read_text())[0]["category_id"] == 1
    assert summary.metrics["bbox_AP"] >= 1.0 - 1e-12


def test_report_shows_per_frequency_ap(tmp_path: Path) -> None:
    from PIL import Image

    from application.visualize import PER_FREQUENCY_AP_PNG, write_report

    gt_path, records = not_exhaustive_case(tmp_path)
    summary, eval_dir = run(tmp_path, records, "faster_coco_eval", dataset_style="lvis", coco_gt_json=gt_path)
    out = tmp_path / "vis"
    out.mkdir()
    page = write_report(
        eval_dir, out, [], renderer=wiring.make_image_renderer(),
        report_renderer=wiring.make_report_renderer(), store=wiring.make_artifact_store(),
    )  # fmt: skip
    text = page.read_text(encoding="utf-8")
    assert f'<img src="{PER_FREQUENCY_AP_PNG}"' in text
    assert f'<td>bbox_APc</td><td class="v">{summary.metrics["bbox_APc"]:.4f}</td>' in text
    assert summary.metrics["bbox_APr"] == -1.0  # no rare category has ground truth: drawn as n/a
    with Image.open(out / PER_FREQUENCY_AP_PNG) as image:
        assert image.format == "PNG" and image.width > 100
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == np.array([0x1F, 0x77, 0xB4])).all(axis=-1).sum() > 100  # the bbox bar of 'common'
