"""The LVIS side of the evaluator use case (``eval.dataset_style: lvis``, docs/evaluation.md).

LVIS federated AP needs what only an LVIS annotation file has (per image ``neg_category_ids`` and
``not_exhaustive_category_ids``, per category ``frequency``), so ``eval.coco_gt_json`` must name one;
predictions are mapped to its categories as for COCO (exact name, synonyms, normalised, semantic)
and scored by an :class:`ports.evaluation.LvisEvaluator` chosen in :mod:`application.wiring`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from application.config.schema import EvalConfig
from domain.errors import ConfigError
from domain.lvis import FREQUENCY_NAMES, LVIS_FREQUENCIES, LvisEvaluation, check_lvis_gt
from ports.evaluation import LvisEvaluator

PER_FREQUENCY_JSON = "per_frequency.json"


def lvis_setting_problems(settings: EvalConfig) -> list[str]:
    """Cross-field rules of ``eval.dataset_style: lvis``; ``[]`` for COCO style."""
    if settings.dataset_style != "lvis":
        return []
    problems: list[str] = []
    if settings.coco_gt_json is None and settings.metrics != "f1ish":
        problems.append(
            "'eval.dataset_style: lvis' needs 'eval.coco_gt_json' naming an LVIS annotation file "
            "(neg_category_ids, not_exhaustive_category_ids and frequency are not in gt_vs_pred.jsonl)"
        )
    return problems


def require_lvis(
    settings: EvalConfig, lvis: LvisEvaluator | None, gt: Mapping[str, Any], source: str
) -> LvisEvaluator:
    """The evaluator of an LVIS-style run, with its ground truth checked (located errors)."""
    if lvis is None:
        raise ConfigError(
            "'eval.dataset_style' is lvis but no LVIS evaluator was given "
            "(application.wiring.make_lvis_evaluator(eval.lvis_backend))"
        )
    check_lvis_gt(gt, source)
    return lvis


def lvis_evaluations(
    lvis: LvisEvaluator,
    gt: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    *,
    with_segm: bool,
    iou_thrs: Sequence[float] | None,
    img_ids: Sequence[int] | None,
) -> list[LvisEvaluation]:
    out = [lvis.evaluate(gt, predictions, "bbox", iou_thrs=iou_thrs, img_ids=img_ids)]
    if with_segm:
        out.append(lvis.evaluate(gt, predictions, "segm", iou_thrs=iou_thrs, img_ids=img_ids))
    return out


def per_frequency_document(evaluations: Sequence[LvisEvaluation]) -> dict[str, Any]:
    """``per_frequency.json``: AP per frequency group and iou type, and how many categories each holds."""
    counts = {FREQUENCY_NAMES[f]: 0 for f in LVIS_FREQUENCIES}
    if evaluations:
        for _, freq in evaluations[0].frequencies:
            counts[FREQUENCY_NAMES[freq]] += 1
    return {
        "categories": counts,
        "AP": {
            ev.iou_type: {FREQUENCY_NAMES[f]: ap for f, ap in ev.per_frequency_ap().items()}
            for ev in evaluations
        },
    }
