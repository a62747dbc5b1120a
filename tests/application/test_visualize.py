"""The vis use case and entry point (infer-eval-config.md §5, §2.3; §9 tests 49 and 33, image-root part).

Artifacts are hand-made ``gt_vs_pred.jsonl`` files over small generated PNGs in a temporary
directory; the report test uses the real evaluator for its outputs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from application import wiring
from application.config.schema import EvalConfig
from application.evaluate import evaluate_artifact
from application.visualize import (
    ERROR_CODES,
    POINTER_FILENAME,
    ImageRoot,
    discover_image_root,
    main,
    read_artifact,
    run_vis_stage,
)
from domain.errors import ArtifactError, DataContractError
from ports.evaluation import SemanticStep

REPO = Path(__file__).resolve().parents[2]
GREEN = (0x2C, 0xA0, 0x2C)
RED = (0xD6, 0x27, 0x28)


# --- builders ---------------------------------------------------------------------------------------


def bbox(points: Sequence[int], desc: str, score: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "bbox_2d", "points": list(points), "desc": desc}
    if score is not None:
        out["score"] = score
    return out


def record(index: int, image: str, gt: list[Any], pred: list[Any], *, w: int = 64, h: int = 48,
           errors: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    return {
        "index": index, "image": image, "width": w, "height": h, "coord_mode": "pixel", "gt": gt, "pred": pred,
        "raw_output": "{}", "raw_ends_with_im_end": True, "num_generated_tokens": 3, "errors": list(errors),
    }  # fmt: skip


def write_image(path: Path, w: int = 64, h: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (0, 0, 0)).save(path)
    return path


def write_artifact(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def resolved_doc(artifact: Path, image_root: Path, *, kind: str = "infer_pipeline") -> dict[str, Any]:
    run_dir = artifact.parent
    return {
        "schema_version": 1, "kind": kind, "config_path": "x.yaml", "config_path_abs": "/x.yaml",
        "resolved_config_sha256": "0" * 64, "infer_fingerprint": None,
        "image_root": str(image_root), "image_root_source": "val_jsonl_dir",
        "stages": {"infer": True, "eval": False, "vis": True},
        "artifacts": {"run_dir": str(run_dir), "gt_vs_pred_jsonl": str(artifact.absolute()),
                      "summary_json": str(run_dir / "summary.json"), "eval_dir": None, "vis_dir": None},
        "prompt": {"variant": "default", "field_order": "desc_first"}, "resolved": {},
    }  # fmt: skip


def vis(artifact: Path, out: Path, *, limit: int | None = 20, image_root: Path | None = None,
        eval_dir: Path | None = None, warnings: list[str] | None = None) -> Any:  # fmt: skip
    sink: list[str] = [] if warnings is None else warnings
    return run_vis_stage(
        artifact, out, limit=limit, image_root=image_root, eval_dir=eval_dir,
        renderer=wiring.make_image_renderer(), report_renderer=wiring.make_report_renderer(),
        images=wiring.make_image_store(), store=wiring.make_artifact_store(), warn=sink.append,
    )  # fmt: skip


def png(path: Path) -> np.ndarray[Any, Any]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# --- spec test 49: vis-only run ---------------------------------------------------------------------


def test_vis_only_run_renders_from_the_artifact_and_skips_a_missing_image(tmp_path: Path) -> None:
    run = tmp_path / "out" / "r"
    write_image(run / "images" / "a.png")
    artifact = write_artifact(run / "gt_vs_pred.jsonl", [
        record(0, "images/a.png", [bbox([4, 4, 30, 30], "cat")], [bbox([34, 10, 60, 40], "dog", 0.9)]),
        record(1, "images/missing.png", [], []),
    ])  # fmt: skip
    warnings: list[str] = []
    summary = vis(artifact, run / "vis", warnings=warnings)
    assert (run / "vis" / "vis_000000.png").is_file()
    assert not (run / "vis" / "vis_000001.png").exists()  # the gap marks the skip
    assert (summary.rendered, summary.skipped_missing_image) == (1, 1)
    assert len(warnings) == 1 and "index 1" in warnings[0] and "missing.png" in warnings[0]
    written = json.loads((run / "vis" / "vis_summary.json").read_text())
    assert written["rendered"] == 1 and written["skipped_missing_image"] == 1
    assert written["image_root_source"] == "artifact_dir" and written["image_root"] == str(run.absolute())
    # the drawn file carries the GT and prediction strokes on the box edges of the record
    drawn = png(run / "vis" / "vis_000000.png")
    assert drawn.shape[1] == 64 and drawn.shape[0] >= 48
    assert tuple(drawn[17, 4]) == GREEN and tuple(drawn[17, 30]) == GREEN
    assert tuple(drawn[25, 34]) == RED and tuple(drawn[25, 60]) == RED
    assert tuple(drawn[17, 17]) == (0, 0, 0) and tuple(drawn[25, 47]) == (0, 0, 0)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vis.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def test_entry_point_needs_no_model_and_imports_no_model_library(tmp_path: Path) -> None:
    run = tmp_path / "out" / "r"
    write_image(run / "images" / "a.png")
    write_artifact(run / "gt_vs_pred.jsonl", [record(0, "images/a.png", [bbox([4, 4, 30, 30], "cat")], [])])
    config = write_config(tmp_path, f"""
        run: {{name: r, output_dir: {tmp_path / 'out'}}}
        vis: {{limit: null}}
    """)  # fmt: skip
    script = (
        "import sys\n"
        "from application.visualize import main\n"
        f"rc = main(['--config', {str(config)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'swift', 'vllm', 'sentence_transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert (run / "vis" / "vis_000000.png").is_file()
    printed = json.loads(done.stdout.splitlines()[0])
    assert printed["rendered"] == 1 and printed["output_dir"] == str((run / "vis").absolute())


def test_entry_point_in_process_never_asks_for_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the vis stage must not resolve or load a model")

    monkeypatch.setattr(wiring, "resolve_model_checkpoint", no_model)
    monkeypatch.setattr(wiring, "make_training_engine", no_model)
    artifact = write_artifact(tmp_path / "a" / "gt_vs_pred.jsonl", [record(0, "x.png", [], [])])
    write_image(tmp_path / "a" / "x.png")
    config = write_config(tmp_path, f"""
        infer: {{gt_vs_pred_jsonl: {artifact}}}
        vis: {{output_dir: {tmp_path / 'v'}}}
    """)  # fmt: skip
    assert main(["--config", str(config)]) == 0
    assert (tmp_path / "v" / "vis_000000.png").is_file()


def test_entry_point_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "vis: {limit: 3}\n")
    assert main(["--config", str(config)]) == 1  # neither run_dir nor explicit paths
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'run.output_dir'" in err and "Traceback" not in err
    config = write_config(tmp_path, f"""
        data: {{image_root: {tmp_path / 'nowhere'}}}
        infer: {{gt_vs_pred_jsonl: {tmp_path / 'a.jsonl'}}}
        vis: {{output_dir: {tmp_path / 'v'}}}
    """)  # fmt: skip
    assert main(["--config", str(config)]) == 1
    assert re.fullmatch(r"error: 'data\.image_root' .*\n", capsys.readouterr().err)
    assert not (tmp_path / "v").exists()  # config errors before any output directory is touched
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "--limit", "3"])
    assert exit_info.value.code == 2


def test_missing_artifact_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        ArtifactError, match=r"gt_vs_pred.jsonl not found at .*nope.jsonl; enable stages.infer"
    ):
        vis(tmp_path / "nope.jsonl", tmp_path / "v")


# --- limit, order, stale files, rejected paths ------------------------------------------------------


def test_limit_takes_the_first_records_by_index(tmp_path: Path) -> None:
    for i in range(5):
        write_image(tmp_path / f"{i}.png")
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl",
                              [record(i, f"{i}.png", [], []) for i in (3, 0, 4, 1, 2)])  # fmt: skip
    summary = vis(artifact, tmp_path / "v", limit=2)
    assert sorted(p.name for p in (tmp_path / "v").glob("vis_*.png")) == ["vis_000000.png", "vis_000001.png"]
    assert (summary.rendered, summary.records_total) == (2, 5)
    vis(artifact, tmp_path / "all", limit=None)
    assert len(list((tmp_path / "all").glob("vis_*.png"))) == 5


def test_an_earlier_overlay_never_hides_a_skip(tmp_path: Path) -> None:
    out = tmp_path / "v"
    out.mkdir()
    (out / "vis_000001.png").write_bytes(b"stale")
    (out / "report.html").write_text("stale")
    (out / "keep.txt").write_text("not ours")
    write_image(tmp_path / "0.png")
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl",
                              [record(0, "0.png", [], []), record(1, "gone.png", [], [])])  # fmt: skip
    vis(artifact, out)
    assert not (out / "vis_000001.png").exists() and not (out / "report.html").exists()
    assert (out / "keep.txt").read_text() == "not ours"


@pytest.mark.parametrize("image", ["/etc/passwd", "../outside.png", "a/../../outside.png"])
def test_an_image_path_escaping_the_root_is_rejected(tmp_path: Path, image: str) -> None:
    artifact = write_artifact(tmp_path / "run" / "gt_vs_pred.jsonl", [record(0, image, [], [])])
    with pytest.raises(ArtifactError, match=r"record index 0 \(.*gt_vs_pred.jsonl:1\): image: "):
        vis(artifact, tmp_path / "v")


def test_unreadable_image_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", [record(0, "bad.png", [], [])])
    warnings: list[str] = []
    summary = vis(artifact, tmp_path / "v", warnings=warnings)
    assert (summary.rendered, summary.skipped_missing_image) == (0, 1) and len(warnings) == 1


def test_invalid_predictions_are_not_drawn_but_counted_and_invalid_gt_raises(tmp_path: Path) -> None:
    write_image(tmp_path / "0.png")
    preds = [bbox([1, 1, 10, 10], "ok", 0.5), bbox([1, 1, 10], "arity"), bbox([1, 1, 70, 10], "range")]
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", [record(0, "0.png", [], preds)])
    assert vis(artifact, tmp_path / "v").pred_objects_not_drawn == 2
    bad_gt = write_artifact(
        tmp_path / "bad" / "gt_vs_pred.jsonl", [record(0, "0.png", [bbox([9, 9, 1, 1], "x")], [])]
    )
    with pytest.raises(DataContractError, match=r"gt_vs_pred.jsonl:1"):
        vis(bad_gt, tmp_path / "v2")


def test_malformed_artifact_line_raises_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gt_vs_pred.jsonl"
    path.write_text(json.dumps(record(0, "0.png", [], [])) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"Malformed JSONL at .*gt_vs_pred.jsonl:2"):
        vis(path, tmp_path / "v")


def test_error_codes_are_counted_per_occurrence_over_all_records(tmp_path: Path) -> None:
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", [
        record(0, "0.png", [], [], errors=["wrong_arity", "wrong_arity", "incomplete_tail", "truncated"]),
        record(1, "1.png", [], [], errors=["parse_failed", "empty_pred", "something_new"]),
    ])  # fmt: skip
    counts = dict(read_artifact(artifact, wiring.make_artifact_store()).error_counts)
    assert list(counts)[: len(ERROR_CODES)] == list(ERROR_CODES)  # every §3.2 code, zeros included
    assert counts["wrong_arity"] == 2 and counts["incomplete_tail"] == 1 and counts["truncated"] == 1
    assert counts["parse_failed"] == 1 and counts["empty_pred"] == 1 and counts["something_new"] == 1
    assert counts["other"] == 0 and sum(counts.values()) == 7


# --- image root discovery (§2.3; spec test 33, image-root part) -------------------------------------


def test_configured_image_root_wins(tmp_path: Path) -> None:
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", [])
    (tmp_path / "resolved_config.json").write_text(json.dumps(resolved_doc(artifact, tmp_path / "elsewhere")))
    assert discover_image_root(artifact, tmp_path / "imgs") == ImageRoot(
        (tmp_path / "imgs").absolute(), "config"
    )


def test_artifact_outside_run_dir_finds_the_image_root_through_the_pointer_file(tmp_path: Path) -> None:
    images = tmp_path / "dataset" / "images"
    write_image(images / "val" / "0001.png")
    artifact = write_artifact(tmp_path / "shared" / "gt_vs_pred.jsonl",
                              [record(0, "val/0001.png", [bbox([2, 2, 20, 20], "cat")], [])])  # fmt: skip
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    resolved = run_dir / "resolved_config.json"
    resolved.write_text(json.dumps(resolved_doc(artifact, images)))
    (artifact.parent / POINTER_FILENAME).write_text(f"{resolved.absolute()}\n")
    warnings: list[str] = []
    assert discover_image_root(artifact, None, warn=warnings.append) == ImageRoot(images, "producer")
    summary = vis(artifact, tmp_path / "v", warnings=warnings)
    assert summary.rendered == 1 and summary.image_root.source == "producer" and not warnings
    assert json.loads((tmp_path / "v" / "vis_summary.json").read_text())["image_root_source"] == "producer"


def test_resolved_config_next_to_the_artifact_is_used_without_a_pointer(tmp_path: Path) -> None:
    artifact = write_artifact(tmp_path / "run" / "gt_vs_pred.jsonl", [])
    (artifact.parent / "resolved_config.json").write_text(
        json.dumps(resolved_doc(artifact, tmp_path / "imgs"))
    )
    assert discover_image_root(artifact, None) == ImageRoot(tmp_path / "imgs", "producer")


@pytest.mark.parametrize("problem", ["other_artifact", "kind_train", "string_version", "no_image_root"])
def test_a_producer_config_that_does_not_match_falls_back_to_the_artifact_dir(
    tmp_path: Path, problem: str
) -> None:
    artifact = write_artifact(tmp_path / "run" / "gt_vs_pred.jsonl", [])
    doc = resolved_doc(artifact, tmp_path / "imgs")
    if problem == "other_artifact":
        doc["artifacts"]["gt_vs_pred_jsonl"] = str(tmp_path / "other" / "gt_vs_pred.jsonl")
    elif problem == "kind_train":
        doc["kind"] = "train"
    elif problem == "string_version":
        doc["schema_version"] = "1"
    else:
        del doc["image_root"]
    (artifact.parent / "resolved_config.json").write_text(json.dumps(doc))
    warnings: list[str] = []
    root = discover_image_root(artifact, None, warn=warnings.append)
    assert root == ImageRoot(artifact.parent.absolute(), "artifact_dir")
    assert len(warnings) == 1 and "resolved_config.json" in warnings[0]


def test_parent_directories_are_never_searched(tmp_path: Path) -> None:
    artifact = write_artifact(tmp_path / "run" / "sub" / "gt_vs_pred.jsonl", [])
    (tmp_path / "run" / "resolved_config.json").write_text(
        json.dumps(resolved_doc(artifact, tmp_path / "imgs"))
    )
    assert discover_image_root(artifact, None) == ImageRoot(artifact.parent.absolute(), "artifact_dir")


def test_the_pointer_wins_over_a_resolved_config_next_to_the_artifact(tmp_path: Path) -> None:
    artifact = write_artifact(tmp_path / "shared" / "gt_vs_pred.jsonl", [])
    (artifact.parent / "resolved_config.json").write_text(
        json.dumps(resolved_doc(artifact, tmp_path / "wrong"))
    )
    target = tmp_path / "runs" / "r" / "resolved_config.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(resolved_doc(artifact, tmp_path / "right")))
    (artifact.parent / POINTER_FILENAME).write_text(f"{target}\n")
    assert discover_image_root(artifact, None) == ImageRoot(tmp_path / "right", "producer")


# --- report from the evaluator's outputs ------------------------------------------------------------


def evaluated_run(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    records = []
    for i in range(3):
        write_image(run / f"{i}.png")
        gt = [bbox([4, 4, 30, 30], "cat"), bbox([34, 10, 60, 40], "dog")]
        pred = [bbox([4, 5, 30, 30], "cat", 0.9), bbox([10, 10, 20, 20], "dog", 0.4)]
        records.append(record(i, f"{i}.png", gt, pred, errors=["wrong_arity"] * i))
    artifact = write_artifact(run / "gt_vs_pred.jsonl", records)
    coco = wiring.make_coco_evaluator("faster_coco_eval")
    evaluate_artifact(artifact, EvalConfig(), run / "eval", coco=coco, semantic=SemanticStep.off("test"), artifacts=wiring.make_artifact_store())
    return artifact, run / "eval"


def metrics_of(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["metrics"])


def test_report_page_shows_plots_that_exist(tmp_path: Path) -> None:
    artifact, eval_dir = evaluated_run(tmp_path)
    out = tmp_path / "run" / "vis"
    summary = vis(artifact, out, eval_dir=eval_dir)
    assert summary.report == out / "report.html"
    text = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', text)
    figures = [s for s in sources if s.startswith("report_")]
    assert sorted(figures) == ["report_parse_drops.png", "report_per_class_ap.png", "report_pr_curves.png"]
    # the overlays are on the page as thumbnails, one per drawn record, in index order
    assert [s for s in sources if not s.startswith("report_")] == [f"vis_{i:06d}.png" for i in range(3)]
    assert "index 2 · 2.png · 2 GT, 2 predictions · wrong_arity" in text
    assert "§" not in text  # the page cites no spec section numbers
    assert 'class="summary"' not in text  # nothing to explain: there are predictions
    assert metrics_of(tmp_path)["bbox_APl"] == -1.0  # no large objects: COCO's -1 reads as undefined
    assert '<td>bbox_APl</td><td class="v">undefined</td>' in text
    for name in figures:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert f'<td>bbox_AP</td><td class="v">{metrics["bbox_AP"]:.4f}</td>' in text
    assert "f1ish@0.50_f1_full_micro" in text
    assert f'<td>dup/raw/excess_object_frac</td><td class="v">{metrics["dup/raw/excess_object_frac"]:.4f}</td>' in text


def test_no_report_without_evaluator_outputs(tmp_path: Path) -> None:
    write_image(tmp_path / "0.png")
    artifact = write_artifact(tmp_path / "gt_vs_pred.jsonl", [record(0, "0.png", [], [])])
    summary = vis(artifact, tmp_path / "v", eval_dir=tmp_path / "eval")
    assert summary.report is None and "metrics.json" in (summary.report_skipped_reason or "")
    assert not (tmp_path / "v" / "report.html").exists()
    assert not list((tmp_path / "v").glob("report_*.png"))


def test_prediction_scores_come_from_the_artifact_and_skip_invalid_predictions() -> None:
    from application.visualize import overlay_objects, raw_scores
    from domain.evaluation import ScoreMode, prepare_record
    from ports.rendering import OverlayRole

    preds = [bbox([1, 1, 10, 10], "a", 0.25), bbox([1, 1, 10], "bad", 0.9), bbox([2, 2, 9, 9], "b")]
    image = prepare_record(
        record(0, "0.png", [bbox([0, 0, 5, 5], "g")], preds), image_id=0, path="x", line=1,
        score_mode=ScoreMode.CONSTANT,
    )  # fmt: skip
    objects = overlay_objects(image, raw_scores(image, preds))
    assert [(o.role, o.desc, o.score) for o in objects] == [
        (OverlayRole.GT, "g", None), (OverlayRole.PRED, "a", 0.25), (OverlayRole.PRED, "b", None),
    ]  # fmt: skip
    assert [o.score for o in overlay_objects(image)] == [None, 1.0, 1.0]  # the evaluator's own scores
    with pytest.raises(ValueError, match="2 valid predictions"):
        overlay_objects(image, [0.5])


def test_an_empty_result_is_explained_on_the_report(tmp_path: Path) -> None:
    """An untrained model writes no CoordJSON: the page says why there is nothing to see."""
    run = tmp_path / "run"
    records = []
    for i in range(3):
        write_image(run / f"{i}.png")
        codes = ["parse_failed", "truncated", "empty_pred"] if i < 2 else ["wrong_arity", "empty_pred"]
        records.append(record(i, f"{i}.png", [bbox([4, 4, 30, 30], "cat")], [], errors=codes))
    artifact = write_artifact(run / "gt_vs_pred.jsonl", records)
    coco = wiring.make_coco_evaluator("faster_coco_eval")
    evaluate_artifact(artifact, EvalConfig(), run / "eval", coco=coco, semantic=SemanticStep.off("test"), artifacts=wiring.make_artifact_store())
    vis(artifact, run / "vis", eval_dir=run / "eval")
    text = (run / "vis" / "report.html").read_text(encoding="utf-8")
    summary = re.findall(r'<p class="summary">([^<]+)</p>', text)
    assert summary == ["0 predictions on 3 images: 2 parse_failed, 2 truncated, 1 objects dropped by the parser"]
    assert "index 0 · 0.png · 1 GT, 0 predictions · empty_pred, parse_failed, truncated" in text
