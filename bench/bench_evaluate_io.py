"""Benchmark: the evaluator's artifact reader and output writers, msgspec fast paths vs the stdlib ``json``.

    .venv/bin/python bench/bench_evaluate_io.py [--images N]

Side by side in one process on the 5,000-image synthetic set of ``bench_evaluate.py``:
1. reading ``gt_vs_pred.jsonl`` (``application.evaluate.read_artifact_records``) vs ``json.loads`` per line;
2. encoding the large outputs (``json_compact``: COCO GT, COCO results, per-image rows) vs ``json.dumps``;
3. where the ``eval.metrics: coco`` use case spends its time (read + validate, COCO part, writes, the
   duplicate monitor when present, rest), and its ratio to pycocotools direct measured in the same run.
Values must be equal (the script fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attrs
from bench_evaluate import pycocotools_direct, synthetic

import application.evaluate as use_case
from application.config.schema import EvalConfig
from application.wiring import make_artifact_store, make_coco_evaluator
from ports.evaluation import SemanticStep


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def stdlib_read(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    records, gt, results = synthetic(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "gt_vs_pred.jsonl"
        artifact.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        t_json, ref = best_of(args.repeats, lambda: stdlib_read(artifact))
        t_fast, (got, _) = best_of(args.repeats, lambda: use_case.read_artifact_records(artifact))
        if got != ref:
            print("FAIL: the reader's records differ from json.loads")
            return 1
        print(f"read {len(records)} records : json {t_json:6.3f} s   msgspec path {t_fast:6.3f} s   x{t_json / t_fast:.2f}")

        per_image = [{"image_id": r["index"], "file_name": r["image"], "pred": r["pred"]} for r in records]
        for name, doc in (("coco_gt.json", gt), ("coco_preds.json", results), ("per_image-like", per_image)):
            t_json, a = best_of(
                args.repeats,
                lambda doc=doc: json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n",
            )
            t_fast, b = best_of(args.repeats, lambda doc=doc: use_case.json_compact(doc))
            if json.loads(a) != json.loads(b):
                print(f"FAIL: {name} encodes to different values")
                return 1
            print(f"write {name:16s}: json {t_json:6.3f} s   msgspec     {t_fast:6.3f} s   x{t_json / t_fast:.2f}")

        phases: dict[str, float] = {}
        names = ("prepare_images", "_run_coco", "json_compact", "_write_file", "summarize_duplicates")
        for fn_name in [n for n in names if hasattr(use_case, n)]:
            inner = getattr(use_case, fn_name)

            def timed(*a: Any, _inner: Any = inner, _name: str = fn_name, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **k)
                finally:
                    phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - t0

            setattr(use_case, fn_name, timed)
        settings = attrs.evolve(EvalConfig(), use_segm=False, metrics="coco")
        evaluator = make_coco_evaluator("faster_coco_eval")
        t0 = time.perf_counter()
        use_case.evaluate_artifact(artifact, settings, Path(tmp) / "eval", coco=evaluator,
                                   semantic=SemanticStep.off("benchmark"), artifacts=make_artifact_store())  # fmt: skip
        total = time.perf_counter() - t0
        t_port, _ = best_of(1, lambda: evaluator.evaluate(gt, results, "bbox"))
        t_ref, _ = best_of(1, lambda: pycocotools_direct(gt, results))
    dup = phases.get("summarize_duplicates", 0.0)
    rest = total - sum(phases.values())
    print(f"use case (coco) {total:6.2f} s = read+validate {phases['prepare_images']:.2f} + COCO part "
          f"{phases['_run_coco']:.2f} (the evaluator port alone: {t_port:.2f}) + encode "
          f"{phases.get('json_compact', 0.0):.2f} + write {phases.get('_write_file', 0.0):.2f} "
          f"+ duplicate monitor {dup:.2f} + rest {rest:.2f}")  # fmt: skip
    print(f"pycocotools direct {t_ref:.2f} s: use case x{t_ref / total:.2f}, without the duplicate monitor "
          f"x{t_ref / (total - dup):.2f}, evaluator port x{t_ref / t_port:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
