"""A small LVIS-format set built from the shipped COCO-100 annotations (issue 16), generated in tests.

Federated fields as LVIS has them: categories get a ``frequency`` (r / c / f by id), every image a
``neg_category_ids`` (categories verified absent) and a ``not_exhaustive_category_ids`` (some present
categories); crowd annotations are dropped (LVIS has none). Detections: the shipped fake results plus
detections on negative, not-exhaustive and unverified categories, and one image flooded with more than
300 detections (LVIS's per-image limit then decides which count), and zero-area boxes.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "data"
COCO100 = DATA / "coco_val2014_100"


def _load(name: str) -> Any:
    return json.loads((COCO100 / name).read_text())


def lvis_gt(seed: int = 0) -> dict[str, Any]:
    gt = _load("instances_val2014_100.json")
    rng = random.Random(seed)
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    for ann in gt["annotations"]:
        del ann["iscrowd"]
    cat_ids = sorted(c["id"] for c in gt["categories"])
    for cat in gt["categories"]:
        cat["frequency"] = "rcf"[cat["id"] % 3]
        cat["synonyms"] = [cat["name"]]
    present: dict[int, set[int]] = {}
    for ann in gt["annotations"]:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    for img in gt["images"]:
        here = present.get(img["id"], set())
        absent = [c for c in cat_ids if c not in here]
        img["neg_category_ids"] = sorted(rng.sample(absent, 6))
        img["not_exhaustive_category_ids"] = sorted(c for c in here if rng.random() < 0.3)
    return gt


def _box(rng: random.Random, img: dict[str, Any]) -> list[float]:
    w, h = img["width"], img["height"]
    x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
    return [round(x, 2), round(y, 2), round(rng.uniform(4, w / 2), 2), round(rng.uniform(4, h / 2), 2)]


def lvis_results(gt: dict[str, Any], iou_type: str = "bbox", seed: int = 1) -> list[dict[str, Any]]:
    """Detections for :func:`lvis_gt` (bbox: boxes; segm: the shipped RLE masks)."""
    rng = random.Random(seed)
    if iou_type == "segm":
        return list(_load("fakesegm100_results.json"))
    results: list[dict[str, Any]] = list(_load("fakebbox100_results.json"))
    cat_ids = sorted(c["id"] for c in gt["categories"])
    present: dict[int, list[int]] = {}
    for ann in gt["annotations"]:
        present.setdefault(ann["image_id"], []).append(ann["category_id"])
    for img in gt["images"][:50]:
        choices = cat_ids + img["neg_category_ids"] * 3 + img["not_exhaustive_category_ids"] * 6
        for _ in range(8):
            results.append(
                {"image_id": img["id"], "category_id": rng.choice(choices), "bbox": _box(rng, img),
                 "score": round(rng.random(), 3)}
            )  # fmt: skip
    for img in gt["images"][50:60]:  # zero-area boxes: LVISEval never evaluates a detection of area 0
        for cat in sorted(set(present.get(img["id"], [])))[:1]:
            x, y, _, h = _box(rng, img)
            results.append({"image_id": img["id"], "category_id": cat, "bbox": [x, y, 0.0, h], "score": 0.99})
    flooded = gt["images"][0]
    choices = sorted(set(present.get(flooded["id"], []))) + flooded["neg_category_ids"]
    for _ in range(420):
        results.append(
            {"image_id": flooded["id"], "category_id": rng.choice(choices), "bbox": _box(rng, flooded),
             "score": round(rng.random(), 2)}
        )  # fmt: skip
    return results


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value))
    return path


@contextlib.contextmanager
def np_float() -> Iterator[None]:
    """The reference ``lvis.LVISEval`` run needs numpy's removed ``np.float`` alias (lvis 0.5.3, numpy >= 1.24)."""
    had = "float" in np.__dict__
    np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.float  # type: ignore[attr-defined]
