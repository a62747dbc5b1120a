"""Benchmark: our COCO evaluation vs pycocotools on a synthetic 5,000-image set (equal stats asserted).

    .venv/bin/python bench/bench_evaluate.py [--images N]

Three timings on the same data:
1. pycocotools directly (COCO + loadRes + COCOeval evaluate/accumulate/summarize), the reference;
2. our ``CocoEvaluator`` port with the default faster-coco-eval backend on the same COCO dicts;
3. the eval use case with ``eval.metrics: coco`` (``application.evaluate.evaluate_artifact``: read and
   validate the gt_vs_pred.jsonl artifact, map descriptions, COCO bbox, write every output);
4. the same with ``eval.metrics: both`` (adds F1-ish at 0.3 / 0.5 and the matches files).
The 12 bbox stats of 2-4 must equal pycocotools' (1e-12); the script fails otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attrs

from application.config.schema import EvalConfig
from application.evaluate import evaluate_artifact
from application.wiring import make_artifact_store, make_coco_evaluator
from ports.evaluation import SemanticStep

NAMES = [f"class_{k}" for k in range(20)]


def synthetic(
    n_images: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Artifact records plus the equivalent COCO GT dict and results list (same ids, same order)."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for i in range(n_images):
        w, h = rng.choice([(640, 480), (512, 512), (800, 608)])
        gt, pred = [], []
        for _ in range(rng.randint(1, 12)):
            x1, y1 = rng.randint(0, w - 40), rng.randint(0, h - 40)
            x2, y2 = rng.randint(x1 + 4, min(w - 1, x1 + 400)), rng.randint(y1 + 4, min(h - 1, y1 + 400))
            name = rng.choice(NAMES)
            gt.append({"type": "bbox_2d", "points": [x1, y1, x2, y2], "desc": name})
            if rng.random() < 0.85:
                d = rng.randint(-6, 6)
                px1, py1 = min(max(x1 + d, 0), x2 - 1), min(max(y1 - d, 0), y2 - 1)
                desc = name if rng.random() < 0.9 else rng.choice(NAMES)
                pred.append(
                    {
                        "type": "bbox_2d",
                        "points": [px1, py1, x2, y2],
                        "desc": desc,
                        "score": round(rng.random(), 4),
                    }
                )
        for _ in range(rng.randint(0, 4)):
            x1, y1 = rng.randint(0, w - 30), rng.randint(0, h - 30)
            pred.append(
                {
                    "type": "bbox_2d",
                    "points": [x1, y1, x1 + 25, y1 + 25],
                    "desc": rng.choice(NAMES),
                    "score": round(rng.random(), 4),
                }
            )
        records.append({"index": i, "image": f"images/{i:06d}.jpg", "width": w, "height": h, "coord_mode": "pixel",
                        "gt": gt, "pred": pred, "raw_output": None, "raw_ends_with_im_end": True,
                        "num_generated_tokens": 0, "errors": []})  # fmt: skip

    first_seen: dict[str, int] = {}
    for r in records:
        for o in r["gt"]:
            first_seen.setdefault(o["desc"], len(first_seen) + 1)
    images, annotations, results = [], [], []
    for r in records:
        images.append({"id": r["index"], "file_name": r["image"], "width": r["width"], "height": r["height"]})
        for o in r["gt"]:
            x1, y1, x2, y2 = o["points"]
            annotations.append({"id": len(annotations) + 1, "image_id": r["index"], "category_id": first_seen[o["desc"]],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})  # fmt: skip
        for o in r["pred"]:
            x1, y1, x2, y2 = o["points"]
            results.append({"image_id": r["index"], "category_id": first_seen[o["desc"]],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": o["score"]})  # fmt: skip
    categories = [{"id": cid, "name": name} for name, cid in sorted(first_seen.items(), key=lambda kv: kv[1])]
    return (
        records,
        {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories},
        results,
    )


def pycocotools_direct(gt: dict[str, Any], results: list[dict[str, Any]]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = (
        copy.deepcopy(gt),
        copy.deepcopy(results),
    )  # outside the caller's timer would be unfair: keep inside
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:12]]


def best_of(repeats: int, fn: Any) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    records, gt, results = synthetic(args.images)
    print(
        f"synthetic set: {len(records)} images, {len(gt['annotations'])} GT boxes, {len(results)} predictions"
    )

    t_ref, ref = best_of(args.repeats, lambda: pycocotools_direct(gt, results))
    evaluator = make_coco_evaluator("faster_coco_eval")
    store = make_artifact_store()
    t_port, port = best_of(args.repeats, lambda: list(evaluator.evaluate(gt, results, "bbox").stats))

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "gt_vs_pred.jsonl"
        artifact.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

        def use_case(metrics: str) -> list[float]:
            settings = attrs.evolve(EvalConfig(), use_segm=False, metrics=metrics)
            summary = evaluate_artifact(artifact, settings, Path(tmp) / "eval", coco=evaluator,
                                        semantic=SemanticStep.off("benchmark"), artifacts=store)  # fmt: skip
            return [float(summary.metrics[f"bbox_{k}"]) for k in
                    ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")]  # fmt: skip

        t_coco, coco = best_of(args.repeats, lambda: use_case("coco"))
        t_both, both = best_of(args.repeats, lambda: use_case("both"))

    for name, stats in (("port", port), ("use case (coco)", coco), ("use case (both)", both)):
        diff = max(abs(a - b) for a, b in zip(stats, ref))
        if diff > 1e-12:
            print(f"FAIL: {name} stats differ from pycocotools by {diff}: {stats} vs {ref}")
            return 1
    print(f"bbox AP {ref[0]:.6f}, AP50 {ref[1]:.6f}, AR100 {ref[8]:.6f} (all 12 stats equal to pycocotools)")
    print(f"pycocotools direct             : {t_ref:7.3f} s")
    print(f"CocoEvaluator (faster-coco-eval): {t_port:7.3f} s   speed-up x{t_ref / t_port:.2f}")
    print(f"use case, eval.metrics: coco   : {t_coco:7.3f} s   speed-up x{t_ref / t_coco:.2f} "
          "(reads + validates the artifact, maps descs, writes all outputs)")  # fmt: skip
    print(f"use case, eval.metrics: both   : {t_both:7.3f} s   speed-up x{t_ref / t_both:.2f} "
          "(adds F1-ish at 0.3 / 0.5 and the matches files)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
