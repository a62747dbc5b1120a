"""The evaluator use case on hand-made artifacts (infer-eval-config.md §9 tests 35-48) and on the
published fixtures (/work/shared/data/README.md)."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from application import wiring
from application.config.schema import EvalConfig, SemanticConfig
from application.evaluate import evaluate_artifact, main, run_evaluation
from domain.errors import ArtifactError, ConfigError, DataContractError
from domain.evaluation import COCO_STAT_NAMES
from ports.evaluation import SemanticStep

DATA = Path(__file__).resolve().parents[2] / "data"
COCO100 = DATA / "coco_val2014_100"
SHAPES = DATA / "shapes3"
OFF = SemanticStep.off("off in this test")

BBOX_PUBLISHED = (
    0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
    0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
    0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982,
)  # fmt: skip
SEGM_PUBLISHED = (
    0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
    0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
    0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099,
)  # fmt: skip


# --- builders ---------------------------------------------------------------------------------------


def obj(kind: str, points: Sequence[Any], desc: str, score: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "points": list(points), "desc": desc}
    if score is not None:
        out["score"] = score
    return out


def rec(
    index: int,
    gt: list[Any],
    pred: list[Any],
    *,
    w: int = 640,
    h: int = 480,
    image: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "index": index,
        "image": image or f"images/val/{index:04d}.jpg",
        **extra,
        "width": w,
        "height": h,
        "coord_mode": "pixel",
        "gt": gt,
        "pred": pred,
        "raw_output": None,
        "raw_ends_with_im_end": True,
        "num_generated_tokens": 1,
        "errors": [],
    }


def write_artifact(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records))
    return path


def cfg(**changes: Any) -> EvalConfig:
    return attrs.evolve(EvalConfig(), **changes)


def run(
    tmp_path: Path,
    records: Sequence[dict[str, Any]],
    *,
    backend: str = "faster_coco_eval",
    step: SemanticStep = OFF,
    out: str = "eval",
    **changes: Any,
) -> tuple[Any, Path]:
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", records)
    output_dir = tmp_path / out
    summary = evaluate_artifact(
        artifact, cfg(coco_backend=backend, **changes), output_dir,
        coco=wiring.make_coco_evaluator(backend), semantic=step,artifacts=wiring.make_artifact_store())  # fmt: skip
    return summary, output_dir


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class FakeEncoder:
    """Unit vectors given per string; any other string gets its own orthogonal axis."""

    model_path = "/fake/encoder"

    def __init__(self, vectors: dict[str, Sequence[float]], dim: int = 64) -> None:
        self.dim = dim
        self.vectors = {k: self._unit(v) for k, v in vectors.items()}
        self.calls: list[list[str]] = []

    def _unit(self, v: Sequence[float]) -> np.ndarray:
        arr = np.zeros(self.dim, dtype=np.float64)
        arr[: len(v)] = v
        return arr / np.linalg.norm(arr)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        for t in texts:
            if t not in self.vectors:
                axis = 16 + len([k for k in self.vectors if k.startswith("\0")])
                self.vectors[t] = np.eye(self.dim)[axis]
                self.vectors["\0" + t] = self.vectors[t]
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def with_cos(c: float) -> tuple[float, float]:
    return (c, math.sqrt(1 - c * c))


# --- 35, 36: fixture, backends ----------------------------------------------------------------------


def three_image_fixture() -> list[dict[str, Any]]:
    square = [10, 10, 50, 10, 50, 50, 10, 50]
    return [
        rec(
            0, [obj("bbox_2d", [8, 19, 192, 197], "chair")], [obj("bbox_2d", [8, 19, 192, 197], "chair", 0.9)]
        ),
        rec(1, [obj("poly", square, "square")], [obj("poly", square, "square", 0.8)], w=64, h=64),
        rec(
            2,
            [obj("bbox_2d", [20, 20, 60, 60], "box")],
            [obj("poly", [20, 20, 60, 20, 60, 60, 20, 60], "box", 0.7)],
            w=96,
            h=64,
        ),
    ]


def test_35_perfect_predictions_and_metrics_file_equals_summary(tmp_path: Path) -> None:
    summary, out = run(tmp_path, three_image_fixture())
    assert summary.metrics["bbox_AP50"] > 0.9
    assert summary.metrics["segm_AP50"] > 0.9
    for key in ("invalid_geometry", "invalid_coord", "degenerate", "unmapped_dropped", "empty_pred"):
        assert summary.counters[key] == 0
    assert read_json(out / "metrics.json") == summary.to_json()
    assert summary.metrics["f1ish@0.50_f1_full_micro"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "per_image.json", "per_class.csv", "coco_gt.json", "coco_preds.json",
         "matches.jsonl", "matches@0.30.jsonl", "pr_curves.json"]
    )  # fmt: skip
    rows = list(csv.reader((out / "per_class.csv").open()))
    assert rows[0] == ["category", "AP"] and [r[0] for r in rows[1:]] == ["chair", "square", "box"]


def randomized_records(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = ["cat", "dog", "car", "tree", "cup"]
    records = []
    for i in range(n):
        w, h = rng.choice([(320, 256), (640, 480), (128, 96)])
        gt, pred = [], []
        for _ in range(rng.randint(0, 5)):
            x1, y1 = rng.randint(0, w - 20), rng.randint(0, h - 20)
            x2, y2 = rng.randint(x1 + 2, w - 1), rng.randint(y1 + 2, h - 1)
            name = rng.choice(names)
            if rng.random() < 0.3:
                gt.append(obj("poly", [x1, y1, x2, y1, (x1 + x2) // 2, y2], name))
            else:
                gt.append(obj("bbox_2d", [x1, y1, x2, y2], name))
            if rng.random() < 0.8:
                dx = rng.randint(-5, 5)
                px1 = min(max(x1 + dx, 0), x2 - 1)
                desc = name if rng.random() < 0.8 else rng.choice(names + ["Cat", "thing"])
                pred.append(obj("bbox_2d", [px1, y1, x2, y2], desc, round(rng.random(), 3)))
        for _ in range(rng.randint(0, 2)):
            x1, y1 = rng.randint(0, w - 10), rng.randint(0, h - 10)
            pred.append(obj("bbox_2d", [x1, y1, x1 + 8, y1 + 8], rng.choice(names), round(rng.random(), 3)))
        records.append(rec(i, gt, pred, w=w, h=h))
    return records


@pytest.mark.parametrize(
    "records", [three_image_fixture(), randomized_records(50, 7)], ids=["fixture", "random50"]
)
def test_36_backends_give_the_same_numbers(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    a, out_a = run(tmp_path, records, backend="faster_coco_eval", out="a")
    b, out_b = run(tmp_path, records, backend="pycocotools", out="b")
    coco_keys = [k for k in a.metrics if k.startswith(("bbox_", "segm_"))]
    assert len(coco_keys) == 24 and coco_keys == [k for k in b.metrics if k.startswith(("bbox_", "segm_"))]
    for key in coco_keys:
        assert abs(a.metrics[key] - b.metrics[key]) <= 1e-9, key
    rows_a = list(csv.reader((out_a / "per_class.csv").open()))[1:]
    rows_b = list(csv.reader((out_b / "per_class.csv").open()))[1:]
    assert [r[0] for r in rows_a] == [r[0] for r in rows_b]
    for (_, x), (_, y) in zip(rows_a, rows_b):
        assert (x == y == "nan") or abs(float(x) - float(y)) <= 1e-9


def test_duplicate_monitor_counts_spammed_boxes(tmp_path: Path) -> None:
    # stage2.md §18.7 in metrics.json: image 0 spams one cat box four times (one copy a pixel off, one
    # with another case), image 1 has a cat and a dog on the same box (no duplicate: other desc).
    cat = [0, 0, 100, 100]
    records = [
        rec(0, [obj("bbox_2d", cat, "cat")], [
            obj("bbox_2d", cat, "cat", 0.9), obj("bbox_2d", cat, "Cat", 0.8),
            obj("bbox_2d", [1, 0, 100, 100], "cat", 0.7), obj("bbox_2d", cat, "cat", 0.6),
        ]),
        rec(1, [obj("bbox_2d", cat, "dog")], [obj("bbox_2d", cat, "cat", 0.9), obj("bbox_2d", cat, "dog", 0.8)]),
    ]  # fmt: skip
    summary, out = run(tmp_path, records, metrics="f1ish")
    m = summary.metrics
    assert m["dup/raw/pairs"] == pytest.approx((6 + 0) / 2)  # 4 boxes in one cluster: 6 pairs
    assert m["dup/raw/max_cluster_size"] == pytest.approx((4 + 1) / 2)
    assert m["dup/raw/excess_object_frac"] == pytest.approx(3 / 6)
    assert read_json(out / "metrics.json")["metrics"]["dup/raw/pairs"] == pytest.approx(3.0)


# --- 37, 38, 39 -----------------------------------------------------------------------------------


def test_37_empty_gt_middle_record(tmp_path: Path) -> None:
    records = [
        rec(0, [obj("bbox_2d", [0, 0, 100, 100], "cat")], [obj("bbox_2d", [0, 0, 100, 100], "cat", 0.8)]),
        rec(1, [], [obj("bbox_2d", [10, 10, 200, 200], "cat", 0.9)]),
        rec(2, [obj("bbox_2d", [50, 50, 300, 300], "dog")], [obj("bbox_2d", [50, 50, 300, 300], "dog", 0.8)]),
    ]
    # Scope 'all': under the default 'annotated' scope a prediction on an image without GT has no GT
    # desc to agree with and is ignored (§4.4), which would hide the misalignment this test is about.
    summary, out = run(tmp_path, records, f1ish_pred_scope="all")
    m = summary.metrics
    assert (m["f1ish@0.50_tp_loc"], m["f1ish@0.50_fp_loc"], m["f1ish@0.50_fn_loc"]) == (2, 1, 0)
    annotated, _ = run(tmp_path, records, out="annotated")
    assert (annotated.metrics["f1ish@0.50_fp_loc"], annotated.metrics["f1ish@0.50_pred_ignored"]) == (0, 1)
    assert summary.counters["images"] == 3
    # COCO: the X box (image 1, scored above the true positive) is an FP of 'cat' -> AP_cat = 0.5, AP_dog = 1
    assert m["bbox_AP50"] == pytest.approx(0.75)
    preds = read_json(out / "coco_preds.json")
    assert [p["image_id"] for p in preds] == [0, 1, 2]
    assert [im["id"] for im in read_json(out / "coco_gt.json")["images"]] == [0, 1, 2]
    rows = read_jsonl(out / "matches.jsonl")
    assert [r["image_id"] for r in rows] == [0, 1, 2] and rows[1]["unmatched_pred_indices"] == [0]


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_38_zero_predictions(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import faster_coco_eval
    import pycocotools.coco

    def forbidden(self: Any, res: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(res, list) and not res:
            raise AssertionError("the result loader was called with an empty list")
        raise AssertionError("no predictions: the loader must not be called at all")

    monkeypatch.setattr(faster_coco_eval.COCO, "loadRes", forbidden)
    monkeypatch.setattr(pycocotools.coco.COCO, "loadRes", forbidden)
    records = [
        rec(0, [obj("bbox_2d", [0, 0, 10, 10], "cat")], []),
        rec(
            1,
            [obj("bbox_2d", [0, 0, 20, 20], "dog")],
            [obj("bbox_2d", [0, 0, 20, 20], "nothing like it", 0.5)],
        ),
    ]
    summary, _ = run(tmp_path, records, backend=backend)
    for name in COCO_STAT_NAMES:
        assert f"bbox_{name}" in summary.metrics
    assert summary.metrics["bbox_AP"] == 0.0 and summary.metrics["bbox_APs"] == 0.0
    assert summary.metrics["bbox_APl"] == -1.0  # no GT in the large bucket
    assert summary.counters["unmapped_dropped"] == 1 and summary.counters["empty_pred"] == 1


def test_39_annotation_ids_and_areas(tmp_path: Path) -> None:
    records = [
        rec(
            0,
            [obj("poly", [0, 0, 10, 0, 10, 10, 0, 10], "sq"), obj("bbox_2d", [8, 19, 192, 197], "chair")],
            [],
        ),
        rec(1, [obj("bbox_2d", [1, 2, 5, 10], "chair")], []),
    ]
    _, out = run(tmp_path, records)
    anns = read_json(out / "coco_gt.json")["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert anns[0]["area"] == 100
    assert anns[1]["area"] == 184 * 178 and anns[1]["bbox"] == [8, 19, 184, 178]
    assert anns[2]["area"] == 32


# --- 40, 41, 42, 43 -------------------------------------------------------------------------------------


def test_40_iou_thrs_without_050_075_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="0.75"):
        run(tmp_path, three_image_fixture(), iou_thrs=(0.6, 0.7))
    assert not (tmp_path / "eval").exists()
    summary, _ = run(tmp_path, three_image_fixture(), iou_thrs=(0.5, 0.75))
    assert summary.meta["iou_thrs"] == [0.5, 0.75]


def test_41_official_gt_join_and_scaling(tmp_path: Path) -> None:
    official = {
        "images": [
            {"id": 101, "file_name": "a.jpg", "width": 1280, "height": 960},
            {"id": 102, "file_name": "b.jpg", "width": 640, "height": 480},
            {"id": 103, "file_name": "c.jpg", "width": 640, "height": 480},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 101,
                "category_id": 5,
                "bbox": [20, 40, 200, 200],
                "area": 40000,
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 102, "category_id": 9, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 3, "image_id": 103, "category_id": 9, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
        ],
    }
    gt_path = tmp_path / "official.json"
    gt_path.write_text(json.dumps(official))
    records = [
        rec(
            0,
            [obj("bbox_2d", [10, 20, 110, 120], "cat")],
            [obj("bbox_2d", [10, 20, 110, 120], "cat", 0.9)],
            image_id=101,
        ),
        rec(
            1,
            [obj("bbox_2d", [0, 0, 50, 50], "dog")],
            [obj("bbox_2d", [0, 0, 50, 50], "Dog", 0.8)],
            image="x/b.jpg",
        ),
    ]
    summary, out = run(tmp_path, records, coco_gt_json=gt_path)
    preds = read_json(out / "coco_preds.json")
    assert preds[0] == {"image_id": 101, "category_id": 5, "bbox": [20.0, 40.0, 200.0, 200.0], "score": 0.9}
    assert preds[1]["image_id"] == 102 and preds[1]["category_id"] == 9
    assert summary.meta["gt_source"] == "official" and not (out / "coco_gt.json").exists()
    assert summary.metrics["bbox_AP"] == pytest.approx(1.0)  # image 103 is not joined: not evaluated
    bad = [*records, rec(2, [], [], image="nowhere.jpg")]
    with pytest.raises(DataContractError, match=r"gt_vs_pred.jsonl:3: image: no image in"):
        run(tmp_path, bad, coco_gt_json=gt_path)


def test_41_official_gt_scaling_is_per_axis(tmp_path: Path) -> None:
    """A real COCO image is resized non-uniformly (640x427 stored as 640x416): x scales by 1, y by 427/416.
    A uniform-scale test cannot tell the two factors apart (issue 11, surviving mutant of _run_coco)."""
    sy = 427 / 416
    official = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "width": 640, "height": 427}],
        "categories": [{"id": 5, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 20 * sy, 100, 100 * sy],
             "area": 100 * 100 * sy, "iscrowd": 0},
        ],
    }  # fmt: skip
    gt_path = tmp_path / "official.json"
    gt_path.write_text(json.dumps(official))
    box = obj("bbox_2d", [10, 20, 110, 120], "cat", 0.9)
    records = [rec(0, [box], [box], w=640, h=416, image="val/000000000007.jpg")]
    summary, out = run(tmp_path, records, coco_gt_json=gt_path)
    (pred,) = read_json(out / "coco_preds.json")
    assert pred["image_id"] == 7
    assert pred["bbox"] == pytest.approx([10.0, 20 * sy, 100.0, 100 * sy], rel=1e-12)
    assert summary.metrics["bbox_AP"] == pytest.approx(1.0)


def test_42_mapping_rules_with_a_fake_encoder(tmp_path: Path) -> None:
    encoder = FakeEncoder(
        {"dog": (1, 0, 0), "traffic light": (0, 0, 1), "puppy": with_cos(0.65), "kitten": with_cos(0.55)}
    )
    records = [
        rec(
            0,
            [obj("bbox_2d", [0, 0, 10, 10], "dog"), obj("bbox_2d", [20, 20, 40, 40], "traffic light")],
            [
                obj("bbox_2d", [0, 0, 10, 10], "Dog", 0.9),
                obj("bbox_2d", [20, 20, 40, 40], "traffic_light", 0.9),
                obj("bbox_2d", [0, 0, 10, 10], "puppy", 0.8),
                obj("bbox_2d", [0, 0, 10, 10], "kitten", 0.7),
                obj("bbox_2d", [0, 0, 10, 10], "dog", 0.6),
            ],
        )
    ]
    semantic = SemanticStep(encoder)
    settings = {"semantic": SemanticConfig(model_path=tmp_path)}
    summary, out = run(tmp_path, records, step=semantic, **settings)
    c = summary.counters
    assert (c["exact_mapped"], c["normalized_mapped"], c["semantic_mapped"], c["unmapped_dropped"]) == (
        1,
        2,
        1,
        1,
    )
    preds = read_json(out / "coco_preds.json")
    assert [p["category_id"] for p in preds] == [1, 2, 1, 1]  # dog, traffic light, puppy -> dog, dog
    report = read_json(out / "semantic_desc_report.json")
    assert {r["pred_desc"]: (r["best_category"], r["mapped"]) for r in report["rows"]} == {
        "puppy": ("dog", True),
        "kitten": ("dog", False),
    }
    assert report["unmapped_total_preds"] == 1 and report["behavior"] == "map-or-drop"
    assert summary.meta["semantic"]["enabled"] is True
    # every string is encoded once per run
    encoded = [t for call in encoder.calls for t in call]
    assert len(encoded) == len(set(encoded))


def test_43_semantic_step_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="eval.semantic.model_path"):
        wiring.make_semantic_step(SemanticConfig(model_path=tmp_path / "missing"))
    with pytest.raises(ConfigError, match="eval.semantic.model_path"):
        run(tmp_path, three_image_fixture(), semantic=SemanticConfig(model_path=tmp_path / "missing"))
    off = wiring.make_semantic_step(SemanticConfig())
    assert off.encoder is None and "model_path" in (off.disabled_reason or "")
    assert wiring.make_semantic_step(SemanticConfig(enabled=False, model_path=tmp_path)).encoder is None
    summary, _ = run(tmp_path, three_image_fixture(), step=off)
    assert summary.meta["semantic"] == {
        "enabled": False,
        "model_path": None,
        "threshold": 0.6,
        "disabled_reason": off.disabled_reason,
    }
    import adapters.semantic.encoder as enc

    monkeypatch.setattr(enc, "sentence_transformers_installed", lambda: False)
    step = wiring.make_semantic_step(SemanticConfig(model_path=tmp_path))
    assert step.encoder is None and "not installed" in (step.disabled_reason or "")
    # a load failure raises (no fallback): tests/adapters/test_semantic_encoder.py


# --- 44 - 48 ----------------------------------------------------------------------------------------


def worked_records() -> list[dict[str, Any]]:
    return [
        rec(
            0,
            [obj("bbox_2d", [0, 0, 100, 100], "cat"), obj("bbox_2d", [200, 200, 300, 300], "dog")],
            [
                obj("bbox_2d", [0, 0, 100, 90], "cat", 0.9),
                obj("bbox_2d", [200, 200, 300, 300], "cat", 0.8),
                obj("bbox_2d", [400, 400, 450, 450], "car", 0.7),
            ],
        )
    ]


WORKED = {"cat": (1, 0, 0), "dog": (0.3, math.sqrt(1 - 0.09), 0), "car": (0, 0, 1)}


@pytest.mark.parametrize("scope", ["annotated", "all"])
def test_44_worked_example(tmp_path: Path, scope: str) -> None:
    semantic = SemanticStep(FakeEncoder(dict(WORKED)))
    summary, out = run(
        tmp_path, worked_records(), step=semantic, f1ish_pred_scope=scope, f1ish_iou_thrs=(0.5,),
        semantic=SemanticConfig(model_path=tmp_path),
    )  # fmt: skip
    m = {k.removeprefix("f1ish@0.50_"): v for k, v in summary.metrics.items() if k.startswith("f1ish@0.50_")}
    if scope == "annotated":
        expected = {
            "tp_loc": 2, "fp_loc": 0, "fn_loc": 0, "pred_total": 3, "pred_eval": 2, "pred_ignored": 1,
            "tp_full": 1, "fp_full": 1, "fn_full": 1, "precision_loc_micro": 1.0, "recall_loc_micro": 1.0,
            "f1_loc_micro": 1.0, "precision_full_micro": 0.5, "recall_full_micro": 0.5, "f1_full_micro": 0.5,
            "sem_acc_on_matched": 0.5, "matched_sem_ok": 1, "matched_sem_bad": 1,
        }  # fmt: skip
    else:
        expected = {
            "pred_eval": 3, "pred_ignored": 0, "fp_loc": 1, "precision_loc_micro": 2 / 3, "recall_loc_micro": 1.0,
            "f1_loc_micro": 0.8, "fp_full": 2, "precision_full_micro": 1 / 3, "recall_full_micro": 0.5,
            "f1_full_micro": 0.4,
        }  # fmt: skip
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    row = read_jsonl(out / "matches.jsonl")[0]
    assert [(x["pred_idx"], x["gt_idx"]) for x in row["matches"]] == [(1, 1), (0, 0)]
    assert row["matches"][0]["sem_sim"] == pytest.approx(0.3) and row["matches"][0]["sem_ok"] is False
    assert row["ignored_pred_indices"] == ([2] if scope == "annotated" else [])
    assert not list(out.glob("matches@*.jsonl"))  # 0.50 is the only (primary) threshold


def test_45_nested_points_are_counted(tmp_path: Path) -> None:
    nested = obj("bbox_2d", [[0, 0], [10, 10]], "cat", 0.5)
    records = [
        rec(0, [obj("bbox_2d", [0, 0, 10, 10], "cat")], [nested, obj("bbox_2d", [0, 0, 10, 10], "cat", 0.5)])
    ]
    summary, out = run(tmp_path, records)
    assert summary.counters["geometry_points"] == 1 and summary.counters["invalid_geometry"] == 1
    entry = read_json(out / "per_image.json")[0]
    assert entry["invalid_pred"] == [{"reason": "geometry_points", "raw": nested}]
    assert entry["pred_count"] == 1 and entry["f1ish"]["0.50"]["tp_loc"] == 1
    row = read_jsonl(out / "matches.jsonl")[0]
    assert row["matches"][0]["pred_idx"] == 0  # index into the validated list


def test_46_score_modes(tmp_path: Path) -> None:
    records = [rec(0, [obj("bbox_2d", [0, 0, 10, 10], "cat")], [obj("bbox_2d", [0, 0, 10, 10], "cat")])]
    with pytest.raises(ArtifactError, match=r"gt_vs_pred.jsonl:1; set eval.score_mode: constant"):
        run(tmp_path, records)
    records[0]["pred"].append(obj("bbox_2d", [0, 0, 5, 5], "cat", 0.25))
    summary, out = run(tmp_path, records, score_mode="constant")
    assert [p["score"] for p in read_json(out / "coco_preds.json")] == [1.0, 1.0]
    assert summary.meta["score_mode"] == "constant"


def test_47_workers_change_nothing(tmp_path: Path) -> None:
    records = randomized_records(600, 3)
    _, serial = run(tmp_path, records, out="serial", num_workers=0)
    _, parallel = run(tmp_path, records, out="parallel", num_workers=2)
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in parallel.iterdir())
    for name in names:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_48_rerun_replaces_the_directory(tmp_path: Path) -> None:
    _, out = run(tmp_path, three_image_fixture(), f1ish_iou_thrs=(0.3, 0.5, 0.7))
    assert (out / "matches@0.70.jsonl").exists() and (out / "matches@0.30.jsonl").exists()
    (out / "stale.txt").write_text("from an earlier run")
    _, out = run(tmp_path, three_image_fixture(), f1ish_iou_thrs=(0.5,))
    assert not list(out.glob("matches@*.jsonl")) and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.")]  # no temp dirs left


# --- input errors, COCO results input, entry point ---------------------------------------------------


def test_malformed_line_raises_and_keeps_the_previous_output(tmp_path: Path) -> None:
    _, out = run(tmp_path, three_image_fixture())
    before = (out / "metrics.json").read_bytes()
    artifact = tmp_path / "bad.jsonl"
    artifact.write_text(json.dumps(three_image_fixture()[0]) + "\n\n{not json\n")
    with pytest.raises(ArtifactError, match=rf"Malformed JSONL at {artifact}:3: {{not json"):
        evaluate_artifact(
            artifact, cfg(), out, coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF, artifacts=wiring.make_artifact_store())
    assert (out / "metrics.json").read_bytes() == before


def test_records_without_index_use_line_ordinals(tmp_path: Path) -> None:
    records = three_image_fixture()
    for r in records:
        del r["index"]
    _, out = run(tmp_path, records)
    assert [e["image_id"] for e in read_json(out / "per_image.json")] == [0, 1, 2]
    records[1]["index"] = 1
    with pytest.raises(DataContractError, match="index"):
        run(tmp_path, records)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
@pytest.mark.parametrize(("iou_type", "results", "published"), [
    ("bbox", "fakebbox100_results.json", BBOX_PUBLISHED),
    ("segm", "fakesegm100_results.json", SEGM_PUBLISHED),
])  # fmt: skip
def test_coco_results_input_reproduces_published_numbers(
    tmp_path: Path, backend: str, iou_type: str, results: str, published: tuple[float, ...]
) -> None:
    settings = cfg(
        coco_backend=backend,
        coco_gt_json=COCO100 / "instances_val2014_100.json",
        coco_results_json=COCO100 / results,
    )
    summary = run_evaluation(
        settings, None, tmp_path / "eval", coco=wiring.make_coco_evaluator(backend), semantic=OFF, artifacts=wiring.make_artifact_store())
    for name, want in zip(COCO_STAT_NAMES, published):
        assert abs(summary.metrics[f"{iou_type}_{name}"] - want) <= 1e-10, name
    assert read_json(tmp_path / "eval" / "metrics.json") == summary.to_json()
    assert summary.meta["gt_source"] == "official"


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_crowd_case_through_the_use_case(tmp_path: Path, backend: str) -> None:
    dets = [
        d for d in read_json(SHAPES / "dt_ignore_test.json") if d["score"] >= 0.1
    ]  # README: min_score 0.1
    results = tmp_path / "dets.json"
    results.write_text(json.dumps(dets))
    settings = cfg(
        coco_backend=backend, coco_gt_json=SHAPES / "gt_ignore_test.json", coco_results_json=results
    )
    m = run_evaluation(
        settings, None, tmp_path / "eval", coco=wiring.make_coco_evaluator(backend), semantic=OFF, artifacts=wiring.make_artifact_store()).metrics
    assert abs(m["bbox_AP"] - 0.7099009900990099) <= 1e-10
    assert abs(m["bbox_AP75"] - 0.8415841584158416) <= 1e-10
    assert abs(m["bbox_AR100"] - 0.7153846153846154) <= 1e-10


def test_entry_point_with_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", three_image_fixture())
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"infer:\n  gt_vs_pred_jsonl: {artifact}\neval:\n  output_dir: {tmp_path / 'out'}\n  f1ish_iou_thrs: [0.5]\n"
    )
    assert main(["--config", str(config)]) == 0
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert metrics["meta"]["f1ish_iou_thrs"] == [0.5] and metrics["metrics"]["bbox_AP50"] > 0.9
    assert "bbox_AP" in capsys.readouterr().out
    config.write_text(
        f"infer:\n  gt_vs_pred_jsonl: {artifact}\neval:\n  output_dir: {tmp_path / 'o2'}\n  iou_thrs: [0.6, 0.7]\n"
    )
    capsys.readouterr()
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "iou_thrs" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--out", "x"])
    assert exit_info.value.code == 2


def test_overlays_with_the_shared_renderer(tmp_path: Path) -> None:
    import shutil

    from application.evaluate import OverlaySetup

    for name in ("img_1.jpg", "img_2.jpg"):
        shutil.copy(SHAPES / name, tmp_path / name)
    box = obj("bbox_2d", [20, 30, 120, 140], "heart")
    records = [
        rec(0, [box], [obj("bbox_2d", [22, 30, 120, 141], "heart", 0.9)], w=256, h=256, image="img_1.jpg"),
        rec(1, [box], [], w=256, h=256, image="missing.jpg"),
        rec(
            2, [box], [obj("poly", [20, 30, 120, 30, 70, 140], "heart", 0.4)], w=256, h=256, image="img_2.jpg"
        ),
        rec(3, [box], [], w=256, h=256, image="img_2.jpg"),
    ]
    warnings_seen: list[str] = []
    setup = OverlaySetup(wiring.make_image_renderer(), wiring.make_image_store(), None)
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", records)
    evaluate_artifact(
        artifact, cfg(overlay=True, overlay_k=3), tmp_path / "eval",
        coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF, overlays=setup, warn=warnings_seen.append,artifacts=wiring.make_artifact_store())  # fmt: skip
    drawn = sorted(p.name for p in (tmp_path / "eval" / "overlays").iterdir())
    assert drawn == [
        "overlay_000000.png",
        "overlay_000002.png",
    ]  # first 3 by image_id, the missing one skipped
    assert (tmp_path / "eval" / "overlays" / drawn[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(warnings_seen) == 1 and "image_id 1" in warnings_seen[0]
    # without a renderer the overlays are skipped with a warning, the evaluation still runs
    evaluate_artifact(
        artifact, cfg(overlay=True), tmp_path / "eval",
        coco=wiring.make_coco_evaluator("faster_coco_eval"), semantic=OFF, warn=warnings_seen.append,artifacts=wiring.make_artifact_store())  # fmt: skip
    assert not (tmp_path / "eval" / "overlays").exists() and "overlays skipped" in warnings_seen[-1]
