"""The few numbers a person reads at the end of a run: bbox AP, AP50, F1 at IoU 0.5, the parse drops, and
where the report is. Printed by ``application.infer`` when its eval stage ran (and so by the main job)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from domain.evaluation import f1ish_metric_keys
from domain.inference import (
    EMPTY_PRED,
    GENERATION_FAILED,
    PARSE_FAILED,
    PRED_OBJECTS_DROPPED,
    PRED_OBJECTS_VALID,
    TRUNCATED,
)

HEADLINE_F1_IOU = 0.5
RECORD_CODES_SHOWN = (PARSE_FAILED, TRUNCATED, EMPTY_PRED, GENERATION_FAILED)


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    if value < 0:  # COCO's -1: undefined (no ground truth, or nothing to score)
        return "undefined"
    return f"{value:.3f}"


def f1_key(thr: float = HEADLINE_F1_IOU) -> str:
    """``f1ish@0.50_f1_full_micro``: the F1 (localisation and description) at IoU ``thr``."""
    return next(k for k in f1ish_metric_keys(thr) if k.endswith("f1_full_micro"))


def empty_result_reason(infer_counters: Mapping[str, int], records: int) -> str | None:
    """Why a run has no valid prediction at all, e.g. ``0 predictions: 3 parse_failed, 3 truncated``;
    None when there are predictions."""
    if infer_counters.get(PRED_OBJECTS_VALID, 0) > 0:
        return None
    causes = [f"{infer_counters[c]} {c}" for c in RECORD_CODES_SHOWN if c != EMPTY_PRED and infer_counters.get(c)]
    dropped = infer_counters.get(PRED_OBJECTS_DROPPED, 0)
    if dropped:
        causes.append(f"{dropped} objects dropped by the parser")
    return f"0 predictions on {records} images: " + (", ".join(causes) if causes else "the model wrote no objects")


def headline_lines(
    metrics: Mapping[str, Any],
    infer_counters: Mapping[str, int] | None,
    records: int | None,
    report: Path | None,
) -> list[str]:
    """Lines to print: the metrics, the parse drops (when the artifact's counters are known), the report."""
    lines = [
        "Headline: "
        f"bbox AP {_number(metrics.get('bbox_AP'))} | AP50 {_number(metrics.get('bbox_AP50'))} | "
        f"F1@{HEADLINE_F1_IOU:.2f} {_number(metrics.get(f1_key()))}"
    ]
    if infer_counters is not None:
        records_part = ", ".join(f"{infer_counters.get(c, 0)} {c}" for c in RECORD_CODES_SHOWN)
        lines.append(
            f"Parse drops: {infer_counters.get(PRED_OBJECTS_DROPPED, 0)} objects dropped, "
            f"{infer_counters.get(PRED_OBJECTS_VALID, 0)} kept; records: {records_part}"
        )
        reason = empty_result_reason(infer_counters, records or 0)
        if reason is not None:
            lines.append(reason)
    if report is not None:
        lines.append(f"Report: {report}")
    return lines
