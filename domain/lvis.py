"""LVIS federated evaluation: the rules the project owns around the library (D17, issue 16).

What lives here: the LVIS stat and metric key names, the checks of an LVIS-format ground truth
(``neg_category_ids`` / ``not_exhaustive_category_ids`` on every image, ``frequency`` on every
category), the normalisation that makes faster-coco-eval's ``lvis_style`` read a ground truth the way
``lvis.LVISEval`` reads it, and LVIS's per-image detection limit (300 per image across categories,
applied before the federated filter).

What does not: the federated AP itself (faster-coco-eval or ``lvis`` behind
``ports.evaluation.LvisEvaluator``; never re-implemented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from domain.errors import ArtifactError
from domain.evaluation import IOU_TYPES, PrecisionCurves

# LVISEval.results order; ``AR@300`` is LVIS's own spelling of recall at 300 detections per image.
LVIS_MAX_DETS = 300
LVIS_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    f"AR@{LVIS_MAX_DETS}", f"ARs@{LVIS_MAX_DETS}", f"ARm@{LVIS_MAX_DETS}", f"ARl@{LVIS_MAX_DETS}",
)  # fmt: skip
# Frequency groups in the order of LVISEval's ``img_count_lbl``: rare (< 10 training images),
# common (10-99), frequent (>= 100).
LVIS_FREQUENCIES: tuple[str, ...] = ("r", "c", "f")
FREQUENCY_NAMES: Mapping[str, str] = {"r": "rare", "c": "common", "f": "frequent"}


def lvis_metric_keys(iou_type: str) -> tuple[str, ...]:
    """``bbox_AP`` .. ``bbox_ARl@300`` (or ``segm_``), in :data:`LVIS_STAT_NAMES` order."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {list(IOU_TYPES)}, got {iou_type!r}")
    return tuple(f"{iou_type}_{name}" for name in LVIS_STAT_NAMES)


@attrs.frozen
class LvisEvaluation:
    """What an LVIS evaluation returns: the 13 LVIS stats, per-class AP with each class's frequency,
    and the class-averaged precision curves (area all, 300 detections)."""

    iou_type: str
    stats: tuple[float, ...]
    per_class_ap: tuple[tuple[int, float], ...]
    curves: PrecisionCurves
    frequencies: tuple[tuple[int, str], ...] = ()

    def metrics(self) -> dict[str, float]:
        return dict(zip(lvis_metric_keys(self.iou_type), self.stats))

    def per_frequency_ap(self) -> dict[str, float]:
        """``{"r": APr, "c": APc, "f": APf}`` (-1.0 where the group has no defined AP, as LVIS says)."""
        by_name = dict(zip(LVIS_STAT_NAMES, self.stats))
        return {freq: by_name[f"AP{freq}"] for freq in LVIS_FREQUENCIES}


def _int_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_lvis_gt(gt: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ArtifactError` listing every place an LVIS-format ground truth lacks what federated
    evaluation reads: per image ``neg_category_ids`` and ``not_exhaustive_category_ids`` (lists of
    declared category ids), per category ``frequency`` in ``r`` / ``c`` / ``f``."""
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            problems.append(f"{source}: '{key}' must be a list")
    if problems:
        raise ArtifactError("\n".join(problems))
    declared: set[int] = set()
    for i, cat in enumerate(gt["categories"]):
        where = f"{source}: categories[{i}]"
        if not isinstance(cat, Mapping) or not isinstance(cat.get("id"), int):
            problems.append(f"{where}.id: an int is required")
            continue
        declared.add(int(cat["id"]))
        if cat.get("frequency") not in LVIS_FREQUENCIES:
            problems.append(
                f"{where}.frequency: LVIS evaluation needs one of {list(LVIS_FREQUENCIES)}, "
                f"got {cat.get('frequency')!r} (is this an LVIS annotation file?)"
            )
    for i, img in enumerate(gt["images"]):
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            where = f"{source}: images[{i}].{key}"
            value = img.get(key) if isinstance(img, Mapping) else None
            if not isinstance(value, list) or not _int_ids(value):
                problems.append(f"{where}: a list of category ids is required, got {value!r}")
                continue
            unknown = sorted(set(value) - declared)
            if unknown:
                problems.append(f"{where}: category ids {unknown[:5]} are not declared in 'categories'")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ArtifactError("\n".join(shown))


def federated_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """The ground truth as ``LVISEval`` reads it, for either backend: no crowd regions (LVIS has none;
    LVISEval treats every annotation as non-crowd) and no annotation of area <= 0 (``get_ann_ids``
    keeps ``area > 0`` only). Fresh dicts: the libraries write into what they are given."""
    annotations = [{**ann, "iscrowd": 0} for ann in gt["annotations"] if float(ann.get("area", 0.0)) > 0.0]
    return {
        **gt,
        "images": [dict(img) for img in gt["images"]],
        "annotations": annotations,
        "categories": [dict(cat) for cat in gt["categories"]],
    }


def top_detections_per_image(
    results: Sequence[Mapping[str, Any]], max_dets: int = LVIS_MAX_DETS
) -> list[dict[str, Any]]:
    """LVIS's detection limit: at most ``max_dets`` per image across all categories, the highest scores,
    before the federated filter (``LVISResults.limit_dets_per_image``). Images are kept in first-seen
    order; an image over the limit gets its kept detections by descending score (ties in input order),
    the others keep input order, so the libraries' stable sorts break score ties the same way."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for row in results:
        by_image.setdefault(int(row["image_id"]), []).append(dict(row))
    out: list[dict[str, Any]] = []
    for rows in by_image.values():
        if len(rows) > max_dets:
            rows = sorted(rows, key=lambda r: float(r["score"]), reverse=True)[:max_dets]
        out.extend(rows)
    return out


def frequencies_of(gt: Mapping[str, Any]) -> tuple[tuple[int, str], ...]:
    """``(category_id, frequency)`` by ascending id, from a checked LVIS ground truth."""
    return tuple(sorted((int(c["id"]), str(c["frequency"])) for c in gt["categories"]))
