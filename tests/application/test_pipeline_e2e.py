"""The whole Stage-1 product end to end on CPU (issue 6 acceptance "End to end on CPU").

shapes3 (three real JPEGs) converted by the project's converter -> a few Stage-1 steps on the embedded
tiny Qwen3-VL with a checkpoint saved -> ``python -m application.infer`` (through ``main``) with
infer + eval + vis on that checkpoint -> every artifact checked against infer-eval-config.md §3-§5:

- ``gt_vs_pred.jsonl``: one line per record, ``index`` 0..n-1, the evaluator's strict reader accepts every
  line, and an explicit §3.1 schema check (key order, types, GT in pixels from the codec);
- ``summary.json``: counters recomputed here from the artifact lines (§3.2/§3.3);
- ``metrics.json``: every bbox COCO key and the F1-ish keys (§4.3-§4.5);
- ``resolved_config.json``: kind ``infer_pipeline`` (§3.4);
- ``vis/vis_000000.png``: GT box edges in the GT colour, box interiors untouched (§5); ``report.html``.

Everything runs in tmp dirs; nothing under output/ is read or written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from PIL import Image, ImageColor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("USE_HF", "1")

pytestmark = pytest.mark.slow

# The shapes3 fixture the repository ships (data/README.md).
SHAPES3 = Path(__file__).resolve().parents[2] / "data" / "shapes3"

TRAIN_STEPS = 3
MAX_NEW_TOKENS = 48

# §3.2, spelled out from the spec (not imported from the implementation).
OBJECT_CODES = (
    "other", "unexpected_keys", "missing_desc", "missing_geom", "order_violation", "non_coord_token",
    "wrong_arity", "incomplete_tail", "bbox_invalid", "degenerate",
)  # fmt: skip
RECORD_CODES = ("truncated", "parse_failed", "empty_pred", "generation_failed")
# §3.1 key order (image_id present because the converter keeps COCO's int image ids in metadata).
LINE_KEYS = (
    "index", "image", "image_id", "width", "height", "coord_mode", "gt", "pred", "raw_output",
    "raw_ends_with_im_end", "num_generated_tokens", "errors",
)  # fmt: skip
GT_KEYS = ("type", "points", "desc")
PRED_KEYS = ("type", "points", "desc", "score")
# §4.3 COCO stats and §4.4 F1-ish suffixes.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
F1ISH_SUFFIXES = (
    "tp_loc", "fp_loc", "fn_loc", "pred_total", "pred_eval", "pred_ignored",
    *(f"{m}_loc_{a}" for m in ("precision", "recall", "f1") for a in ("micro", "macro")),
    "matched_sem_ok", "matched_sem_bad", "sem_acc_on_matched", "tp_full", "fp_full", "fn_full",
    *(f"{m}_full_{a}" for m in ("precision", "recall", "f1") for a in ("micro", "macro")),
)  # fmt: skip
F1ISH_DEFAULT_THRS = ("0.30", "0.50")  # §4.6 default eval.f1ish_iou_thrs
EVAL_COUNTERS = (
    "images", "gt_objects", "pred_objects", "invalid_geometry", "invalid_coord", "degenerate", "empty_pred",
    "exact_mapped", "normalized_mapped", "semantic_mapped", "unmapped_dropped", "semantic_report_failed",
)  # fmt: skip

# A label box is at most the adapter's largest font (28 px) plus padding tall; a band of this many rows
# around a label's anchor edge is left out of the pixel checks (labels are translucent over strokes).
LABEL_REACH = 40


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- the run ---------------------------------------------------------------------------------------------


@attrs.frozen
class Run:
    data_dir: Path  # the converted split's directory (image root)
    input_jsonl: Path
    inputs: tuple[dict[str, Any], ...]  # the converted records (norm1000 bins)
    checkpoint: Path
    run_dir: Path


def convert_shapes3(out: Path) -> Path:
    """shapes3 through the project's converter (``geometry: bbox``); the train JSONL."""
    from application import wiring
    from application.config import load_config
    from application.prepare_data import ConvertSettings, convert_dataset

    cfg = out / "convert.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"convert": {
        "source": "coco", "annotations": str(SHAPES3 / "gt_dataset.json"), "image_root": str(SHAPES3),
        "output_dir": str(out / "data"), "split": "train", "geometry": "bbox", "workers": 1}}}))  # fmt: skip
    loaded = load_config(cfg, entry_point="prepare_data")
    convert_dataset(ConvertSettings.from_config(loaded.config.data), artifacts=wiring.make_artifact_store(),
                    images=wiring.make_image_store(), progress=False, echo=lambda _m: None)  # fmt: skip
    return out / "data" / "train.jsonl"


def train_stage1(out: Path, train_jsonl: Path) -> Path:
    """A few Stage-1 steps on the tiny model (fp32, CPU) saving one checkpoint; its directory."""
    from application.config import load_config
    from train_runner import run_train

    config = {
        "run": {"name": "stage1", "output_dir": str(out / "train"), "seed": 17},
        "model": {"tiny": {"seed": 0}, "dtype": "float32", "attn_implementation": "eager"},
        "data": {"train_jsonl": str(train_jsonl)},
        "objective": {
            "trainer_variant": "stage1",
            "coord_soft_ce_w1": {"enabled": True, "target_sigma": 2.0, "target_truncate": 16},
        },
        "training": {
            "max_steps": TRAIN_STEPS, "max_length": 4096, "learning_rate": 1.0e-3, "logging_steps": 1,
            "save_strategy": "steps", "save_steps": TRAIN_STEPS, "lr_scheduler_type": "constant",
        },
    }  # fmt: skip
    path = out / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_train(load_config(path, entry_point="train"))
    assert outcome.global_step == TRAIN_STEPS
    checkpoint = out / "train" / "stage1" / f"checkpoint-{TRAIN_STEPS}"
    marker = json.loads((checkpoint / "checkpoint_complete.json").read_text())
    assert marker["global_step"] == TRAIN_STEPS  # a complete checkpoint (infer-eval-config.md §7.3)
    return checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from application.infer import main

    out = tmp_path_factory.mktemp("e2e")
    input_jsonl = convert_shapes3(out)
    checkpoint = train_stage1(out, input_jsonl)
    config = {
        "run": {"name": "pipeline", "output_dir": str(out / "infer"), "seed": 17},
        "model": {"path": str(checkpoint), "dtype": "float32", "attn_implementation": "eager"},
        "data": {"val_jsonl": str(input_jsonl)},
        "stages": {"infer": True, "eval": True, "vis": True},
        "infer": {
            "backend": "hf", "device": "cpu",
            "generation": {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": MAX_NEW_TOKENS,
                           "batch_size": 2},
        },
    }  # fmt: skip
    path = out / "infer.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path)]) == 0
    inputs = tuple(json.loads(ln) for ln in input_jsonl.read_text().splitlines() if ln.strip())
    return Run(input_jsonl.parent, input_jsonl, inputs, checkpoint, out / "infer" / "pipeline")


def artifact_texts(run: Run) -> list[str]:
    return (run.run_dir / "gt_vs_pred.jsonl").read_text(encoding="utf-8").splitlines()


def artifact_lines(run: Run) -> list[dict[str, Any]]:
    return [json.loads(text) for text in artifact_texts(run)]


# --- gt_vs_pred.jsonl ------------------------------------------------------------------------------------


def test_artifact_has_one_line_per_record_in_index_order_and_passes_the_evaluators_reader(run: Run) -> None:
    from application.evaluate import read_artifact_records
    from domain.evaluation import ScoreMode, assign_image_ids, prepare_record

    path = run.run_dir / "gt_vs_pred.jsonl"
    records, numbers = read_artifact_records(path)  # strict: a non-JSON / non-object line raises
    assert len(records) == len(run.inputs) == 3
    assert [r["index"] for r in records] == list(range(len(run.inputs)))
    ids = assign_image_ids(records, str(path), numbers)
    assert ids == list(range(len(run.inputs)))
    for record, image_id, number in zip(records, ids, numbers):
        image = prepare_record(record, image_id=image_id, path=str(path), line=number,
                               score_mode=ScoreMode.TOKEN_PROB)  # fmt: skip
        # every prediction is either kept or counted by a §4.1 code; GT survives re-validation whole
        assert len(image.gt) == len(record["gt"])
        assert image.pred_total == len(record["pred"])


def check_object(obj: Any, keys: Sequence[str], width: int, height: int, where: str) -> None:
    assert isinstance(obj, dict) and tuple(obj) == tuple(keys), f"{where}: keys {list(obj)}"
    assert obj["type"] in ("bbox_2d", "poly"), where
    points = obj["points"]
    assert isinstance(points, list) and all(is_int(v) for v in points), f"{where}: points {points}"
    if obj["type"] == "bbox_2d":
        assert len(points) == 4, where
    else:
        assert len(points) >= 6 and len(points) % 2 == 0, where
    assert all(0 <= x <= width - 1 for x in points[0::2]) and all(0 <= y <= height - 1 for y in points[1::2])
    assert isinstance(obj["desc"], str) and obj["desc"] == obj["desc"].strip(), where


def test_artifact_lines_follow_the_3_1_schema(run: Run) -> None:
    from domain.codec import bins_to_pixels

    texts = artifact_texts(run)
    for ordinal, (text, source) in enumerate(zip(texts, run.inputs, strict=True)):
        line = json.loads(text)
        where = f"gt_vs_pred.jsonl line {ordinal + 1}"
        # serialization: ensure_ascii=False, separators (",", ":"), keys in §3.1 order, nothing else
        assert text == json.dumps(line, ensure_ascii=False, separators=(",", ":")), where
        assert tuple(line) == LINE_KEYS, f"{where}: keys {list(line)}"
        assert is_int(line["index"]) and line["index"] == ordinal
        assert isinstance(line["image"], str) and line["image"] == source["images"][0]
        assert is_int(line["image_id"]) and line["image_id"] == source["metadata"]["image_id"]
        assert is_int(line["width"]) and line["width"] == source["width"]
        assert is_int(line["height"]) and line["height"] == source["height"]
        width, height = line["width"], line["height"]
        assert line["coord_mode"] == "pixel"
        # GT: the input's objects in input order, bins -> pixels with the codec (/999 convention)
        assert isinstance(line["gt"], list) and len(line["gt"]) == len(source["objects"])
        for i, (gt, obj) in enumerate(zip(line["gt"], source["objects"])):
            check_object(gt, GT_KEYS, width, height, f"{where} gt[{i}]")
            assert gt == {
                "type": "bbox_2d",
                "points": bins_to_pixels(obj["bbox_2d"], width, height),
                "desc": obj["desc"].strip(),
            }, f"{where} gt[{i}]"
        assert isinstance(line["pred"], list)
        for i, pred in enumerate(line["pred"]):
            check_object(pred, PRED_KEYS, width, height, f"{where} pred[{i}]")
            score = pred["score"]
            assert isinstance(score, (int, float)) and not isinstance(score, bool) and 0.0 <= score <= 1.0
        # default on_generation_error is raise: no failed generations, so raw_output is the decoded text
        assert isinstance(line["raw_output"], str)
        assert isinstance(line["raw_ends_with_im_end"], bool)
        if line["raw_ends_with_im_end"]:
            assert line["raw_output"].endswith("<|im_end|>")
        assert is_int(line["num_generated_tokens"]) and 1 <= line["num_generated_tokens"] <= MAX_NEW_TOKENS
        errors = line["errors"]
        assert isinstance(errors, list) and all(isinstance(c, str) for c in errors)
        assert set(errors) <= set(OBJECT_CODES + RECORD_CODES), errors
        assert all(errors.count(code) <= 1 for code in RECORD_CODES), errors
        assert "generation_failed" not in errors
        assert (line["pred"] == []) == ("empty_pred" in errors), where  # empty_pred: no valid prediction


# --- summary.json ----------------------------------------------------------------------------------------


def test_summary_counters_equal_the_counts_recomputed_from_the_artifact(run: Run) -> None:
    lines = artifact_lines(run)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    expected = {
        code: sum(line["errors"].count(code) for line in lines) for code in OBJECT_CODES + RECORD_CODES
    }
    expected["pred_objects_valid"] = sum(len(line["pred"]) for line in lines)
    expected["pred_objects_dropped"] = sum(expected[code] for code in OBJECT_CODES)
    assert summary["counters"] == expected
    assert summary["error_codes"] == sorted(
        code for code in OBJECT_CODES + RECORD_CODES if expected[code] > 0
    )
    assert summary["schema_version"] == 1 and summary["kind"] == "infer_summary"
    assert summary["records_total"] == summary["records_written"] == len(lines) == len(run.inputs)
    assert summary["determinism"] == "strict"  # hf backend
    assert summary["generation"] == {
        "temperature": 0.0, "top_p": summary["generation"]["top_p"], "max_new_tokens": MAX_NEW_TOKENS,
        "repetition_penalty": 1.0, "batch_size": 2, "seed": 17,
    }  # fmt: skip
    assert summary["backend"]["type"] == "hf" and summary["backend"]["model_path"] == str(run.checkpoint)
    assert summary["score_mode"] == "token_prob" and summary["resumed_from_index"] is None
    assert summary["data"]["val_jsonl"] == str(run.input_jsonl)
    assert Path(summary["data"]["image_root"]) == run.data_dir.absolute()


# --- eval ------------------------------------------------------------------------------------------------


def test_metrics_have_every_bbox_coco_key_and_the_f1ish_keys(run: Run) -> None:
    lines = artifact_lines(run)
    document = json.loads((run.run_dir / "eval" / "metrics.json").read_text())
    metrics, counters = document["metrics"], document["counters"]
    for stat in COCO_STATS:
        value = metrics[f"bbox_{stat}"]
        assert isinstance(value, float) and (value == -1.0 or 0.0 <= value <= 1.0), (stat, value)
    assert not any(key.startswith("segm_") for key in metrics)  # bbox-only GT: segm does not run (§4.3)
    for thr in F1ISH_DEFAULT_THRS:
        for suffix in F1ISH_SUFFIXES:
            assert f"f1ish@{thr}_{suffix}" in metrics, f"f1ish@{thr}_{suffix}"
    assert set(EVAL_COUNTERS) <= set(counters)
    gt_total = sum(len(line["gt"]) for line in lines)
    assert counters["images"] == len(lines) and counters["gt_objects"] == gt_total == 9
    for thr in F1ISH_DEFAULT_THRS:
        assert metrics[f"f1ish@{thr}_tp_loc"] + metrics[f"f1ish@{thr}_fn_loc"] == gt_total
        assert (metrics[f"f1ish@{thr}_pred_eval"] + metrics[f"f1ish@{thr}_pred_ignored"]
                == metrics[f"f1ish@{thr}_pred_total"])  # fmt: skip
    if sum(len(line["pred"]) for line in lines) == 0:
        # §4.3: zero predictions -> 0.0 where a bucket has non-crowd GT (every shapes3 box is 'all')
        assert metrics["bbox_AP"] == 0.0 and metrics["bbox_AR100"] == 0.0


def test_resolved_config_is_an_infer_pipeline_document(run: Run) -> None:
    from application.config import load_resolved_config

    document = load_resolved_config(run.run_dir / "resolved_config.json")  # the strict §3.4 loader
    assert document["kind"] == "infer_pipeline"
    assert document["stages"] == {"infer": True, "eval": True, "vis": True}
    assert Path(document["artifacts"]["gt_vs_pred_jsonl"]) == run.run_dir / "gt_vs_pred.jsonl"
    assert document["image_root_source"] == "val_jsonl_dir"


# --- vis -------------------------------------------------------------------------------------------------


Box = tuple[int, int, int, int]


def extent(points: Sequence[int], grow: int = 0) -> Box:
    xs, ys = points[0::2], points[1::2]
    return (min(xs) - grow, min(ys) - grow, max(xs) + grow, max(ys) + grow)


def inside(x: int, y: int, box: Box) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def drawn_elsewhere(line: Mapping[str, Any], own: int, width: int) -> list[Box]:
    """Regions where something other than GT object ``own``'s stroke may be drawn: the other GT boxes,
    every label band (GT labels sit on the top edge, prediction labels on the bottom edge) and every
    prediction with its stroke."""
    regions: list[Box] = []
    for i, gt in enumerate(line["gt"]):
        x1, y1, x2, y2 = extent(gt["points"])
        if i != own:
            regions.append((x1, y1, x2, y2))
        regions.append((0, y1 - LABEL_REACH, width - 1, y1 + LABEL_REACH))
    for pred in line["pred"]:
        regions.append(extent(pred["points"], grow=3))
        bottom = extent(pred["points"])[3]
        regions.append((0, bottom - LABEL_REACH, width - 1, bottom + LABEL_REACH))
    return regions


def edge_pixels(box: Box) -> Iterator[tuple[int, int]]:
    x1, y1, x2, y2 = box
    for x in range(x1, x2 + 1):
        yield x, y1
        yield x, y2
    for y in range(y1 + 1, y2):
        yield x1, y
        yield x2, y


def interior_pixels(box: Box, inset: int) -> Iterator[tuple[int, int]]:
    x1, y1, x2, y2 = box
    for fx in range(1, 8):
        for fy in range(1, 8):
            yield (x1 + inset + (x2 - x1 - 2 * inset) * fx // 8, y1 + inset + (y2 - y1 - 2 * inset) * fy // 8)


def test_overlay_shows_the_gt_boxes_on_the_source_image(run: Run) -> None:
    from application.visualize import DEFAULT_STYLE
    from domain.codec import bins_to_pixels
    from ports.rendering import OverlayRole

    source_record = run.inputs[0]
    line = artifact_lines(run)[0]
    width, height = source_record["width"], source_record["height"]
    gt_rgb = ImageColor.getrgb(DEFAULT_STYLE.color_of(OverlayRole.GT))[:3]
    source = Image.open(run.data_dir / source_record["images"][0]).convert("RGB")
    overlay = Image.open(run.run_dir / "vis" / "vis_000000.png").convert("RGB")
    assert source.size == (width, height)
    assert overlay.width == width and overlay.height >= height  # never resized; a legend strip may follow
    few_preds = line["pred"] == []
    recoloured = 0
    for i, obj in enumerate(source_record["objects"]):
        box = tuple(bins_to_pixels(obj["bbox_2d"], width, height))
        assert len(box) == 4
        box4: Box = (box[0], box[1], box[2], box[3])
        others = drawn_elsewhere(line, i, width)
        edges = [p for p in edge_pixels(box4) if not any(inside(*p, r) for r in others)]
        for x, y in edges:
            assert overlay.getpixel((x, y)) == gt_rgb, f"gt[{i}] {box4}: edge pixel {(x, y)}"
            recoloured += source.getpixel((x, y)) != gt_rgb
        interior = [p for p in interior_pixels(box4, DEFAULT_STYLE.line_width + 3)
                    if not any(inside(*p, r) for r in others)]  # fmt: skip
        for x, y in interior:
            assert overlay.getpixel((x, y)) == source.getpixel((x, y)), f"gt[{i}] {box4}: interior {(x, y)}"
        if few_preds:  # enough of each box was left to check for the test to mean something
            assert len(edges) >= 40 and len(interior) >= 10, (i, box4, len(edges), len(interior))
    assert recoloured > 0  # the edge colour came from the overlay, not from the photo


def test_vis_summary_and_report(run: Run) -> None:
    vis_dir = run.run_dir / "vis"
    summary = json.loads((vis_dir / "vis_summary.json").read_text())
    assert summary["rendered"] == len(run.inputs) and summary["skipped_missing_image"] == 0
    assert sorted(p.name for p in vis_dir.glob("vis_*.png")) == [f"vis_{i:06d}.png" for i in range(3)]
    html = (vis_dir / "report.html").read_text(encoding="utf-8")  # eval ran: the report exists
    sources = re.findall(r'src="([^"]+)"', html)
    assert sources, "the report shows no plot"
    for src in sources:
        assert (vis_dir / src).is_file(), src
